"""The gated ``If`` model: it picks the exit the simulation picks, and later blocks really do not run."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort

from compression.metrics import session
from compression.techniques.early_exit.cuts import choose_cuts, find_cuts
from compression.techniques.early_exit.gating import build_gated, confidence, simulate
from compression.techniques.early_exit.heads import add_exit_heads


def test_gated_graph_picks_the_simulated_exit_on_every_sample(trained, cnn, x1):
    model, data = cnn
    facts = find_cuts(model, x1)
    _, layout = add_exit_heads(model, choose_cuts(facts, "auto"), facts.classes)  # same layout as the step's
    x = data.holdout.inputs["input"][:60]
    multi_outs = session(trained.model, 1, quiet=True).run(None, {"input": x})
    for criterion in ("max_prob", "entropy"):
        gated = build_gated(trained.model, layout, criterion=criterion, threshold=0.9)
        onnx.checker.check_model(gated, full_check=True)
        sess = session(gated, 1, quiet=True)
        seen = set()
        for t in (0.0, 0.6, 0.9, 0.99, 2.0):
            where = simulate(multi_outs[1:], t, criterion)
            confs = [confidence(o, criterion) for o in multi_outs[1:]]
            for i in range(len(x)):
                logits, idx = sess.run(None, {"input": x[i:i + 1], "threshold": np.array(t, np.float32)})
                tie = any(abs(float(c[i]) - t) < 1e-6 for c in confs)
                if not tie:
                    assert idx[0] == where[i], (criterion, t, i)
                chosen = multi_outs[0] if idx[0] == 3 else multi_outs[idx[0]]
                np.testing.assert_allclose(logits[0], chosen[i], rtol=1e-5, atol=1e-5)
                seen.add(int(idx[0]))
            if t == 0.0:
                assert (where == 1).all()
            if t == 2.0:
                assert (where == 3).all()
        assert seen == {1, 2, 3}


def _conv_events(gated: onnx.ModelProto, x: np.ndarray, threshold: float, tmp_path) -> list[str]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / f"p{threshold}")
    sess = ort.InferenceSession(gated.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    sess.run(None, {"input": x, "threshold": np.array(threshold, np.float32)})
    events = json.loads(open(sess.end_profiling()).read())
    return [e["name"] for e in events if e.get("cat") == "Node" and "Conv" in e.get("args", {}).get("op_name", "")]


def test_profiling_shows_later_blocks_are_skipped(trained, x1, tmp_path):
    gated = trained.extra_models["early_exit_gated.onnx"]
    x = x1["input"]
    early = _conv_events(gated, x, 0.0, tmp_path)   # every sample leaves at exit 1
    full = _conv_events(gated, x, 1.5, tmp_path)    # no sample is ever confident enough
    # ORT renames fused/NCHWc convs, so compare the sets: the second block's conv ran only when it had to
    assert len(early) == 1 and len(full) == 2 and set(early) < set(full)
