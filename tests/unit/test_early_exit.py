"""Early exits: cut points, exit heads, the confidence-gated ``If`` graph, and the technique's numbers."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from compression.analysis import macs
from compression.context import StepContext
from compression.data import Arrays, split
from compression.errors import InvalidSpec
from compression.exits import add_exit_heads, build_gated, choose_cuts, confidence, find_cuts, simulate
from compression.registry import get_technique
from compression.spec import parse_spec
from testkit.zoo import TinyResNet, export_onnx

SPEC = {"method": "early_exit", "epochs": 3, "threshold": "auto", "latency_samples": 30, "latency_rounds": 1}


def _sess(model: onnx.ModelProto, **opts) -> ort.InferenceSession:  # noqa: ANN003
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    for k, v in opts.items():
        setattr(so, k, v)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _apply(spec: dict, model: onnx.ModelProto, data, tmp_path):  # noqa: ANN001
    step = parse_spec({"steps": [spec]}).steps[0]
    ctx = StepContext(workdir=tmp_path, data=data, original=model, seed=0, threads=1)
    return get_technique("early_exit").apply(model, step, ctx)


@pytest.fixture(scope="module")
def cnn(cnn_onnx, mnist_data):
    X, y = mnist_data
    data = split(Arrays({"input": X[4000:5000]}, y[4000:5000]), holdout=0.4, seed=0, max_eval=1000)
    return onnx.load(str(cnn_onnx["legacy"])), data


@pytest.fixture(scope="module")
def trained(cnn, tmp_path_factory):
    model, data = cnn
    torch.set_num_threads(1)
    return _apply(SPEC, model, data, tmp_path_factory.mktemp("ee"))


@pytest.fixture(scope="module", params=[False, True], ids=["legacy", "dynamo"])
def resnet(request, tmp_path_factory) -> onnx.ModelProto:
    torch.manual_seed(0)
    path = export_onnx(TinyResNet(width=4), torch.zeros(2, 1, 28, 28), tmp_path_factory.mktemp("res") / "r.onnx",
                       dynamo=request.param)
    return onnx.load(str(path))


X1 = {"input": np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)}


def test_skip_connections_are_never_cuts(resnet):
    facts = find_cuts(resnet, X1)
    nodes = {n.name: n for n in resnet.graph.node}
    cut_ops = [nodes[c.node].op_type for c in facts.cuts]
    # Inside a residual block the block input is still live: only block outputs (Add → Relu), the stem and
    # the pooled features qualify.
    assert cut_ops.count("Add") == 3 and cut_ops.count("Relu") == 4 and cut_ops.count("Conv") == 1
    inner = [n.output[0] for n in resnet.graph.node if n.op_type == "Conv"][1:]
    assert not {c.value for c in facts.cuts} & set(inner)
    assert facts.total_macs == macs(resnet, X1)
    assert [c.macs for c in facts.cuts] == sorted(c.macs for c in facts.cuts)
    auto = choose_cuts(facts, "auto", 2)  # ~1/3 and ~2/3 of the MACs: after blocks 0 and 1
    assert [nodes[c.node].op_type for c in auto] == ["Relu", "Relu"]
    assert 0.2 < auto[0].macs / facts.total_macs < 0.5 < auto[1].macs / facts.total_macs < 0.85


def test_a_named_exit_must_be_a_cut(resnet):
    facts = find_cuts(resnet, X1)
    inside = next(n.name for n in resnet.graph.node if n.op_type == "Relu")  # stem: fine
    block_inner = [n.name for n in resnet.graph.node if n.op_type == "Relu"][1]  # inside block 0
    assert [c.node for c in choose_cuts(facts, [inside])] == [inside]
    with pytest.raises(InvalidSpec, match="valid: ") as e:
        choose_cuts(facts, [inside, block_inner, "nope"])
    assert [err["loc"] for err in e.value.errors] == [["exits", 1], ["exits", 2]]
    assert facts.cuts[-1].node in str(e.value)


def test_heads_keep_the_original_output_first(cnn):
    model, data = cnn
    facts = find_cuts(model, X1)
    assert len(choose_cuts(facts, "auto", 3)) == 2  # after fc1 too little work is left to be worth an exit
    cuts = choose_cuts(facts, ["/features/features.3/MaxPool", "/features/features.7/MaxPool",
                               "/classifier/classifier.2/Relu"])
    multi, layout = add_exit_heads(model, cuts, facts.classes, pool_size=4, hidden=16)
    onnx.checker.check_model(multi, full_check=True)
    assert [o.name for o in multi.graph.output] == ["logits", "exit_1", "exit_2", "exit_3"]
    x = data.holdout.inputs["input"][:50]
    outs = _sess(multi).run(None, {"input": x})
    np.testing.assert_array_equal(outs[0], _sess(model).run(None, {"input": x})[0])
    assert all(o.shape == (50, 10) for o in outs)
    heads = multi.graph.node[layout.backbone_nodes:]
    assert [n.op_type for n in heads[:5]] == ["AveragePool", "Flatten", "Gemm", "Relu", "Gemm"]
    # 14×14 pooled 3×3/3 → 4×4, 7×7 flattened as is (then hidden 16); the [N, 128] exit needs neither
    assert layout.head_macs == [16 * 4 * 4 * 16 + 16 * 10, 32 * 7 * 7 * 16 + 16 * 10, 128 * 16 + 16 * 10]
    ops = [n.op_type for n in heads]
    assert ops.count("AveragePool") == 1 and ops.count("Flatten") == 2 and ops.count("Gemm") == 6


def test_gated_graph_picks_the_simulated_exit_on_every_sample(trained, cnn):
    model, data = cnn
    facts = find_cuts(model, X1)
    _, layout = add_exit_heads(model, choose_cuts(facts, "auto"), facts.classes)  # same layout as the step's
    x = data.holdout.inputs["input"][:60]
    multi_outs = _sess(trained.model).run(None, {"input": x})
    for criterion in ("max_prob", "entropy"):
        gated = build_gated(trained.model, layout, criterion=criterion, threshold=0.9)
        onnx.checker.check_model(gated, full_check=True)
        sess = _sess(gated)
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


def _conv_events(gated: onnx.ModelProto, x: np.ndarray, threshold: float, tmp_path) -> list[str]:  # noqa: ANN001
    sess = _sess(gated, enable_profiling=True, profile_file_prefix=str(tmp_path / f"p{threshold}"))
    sess.run(None, {"input": x, "threshold": np.array(threshold, np.float32)})
    events = json.loads(open(sess.end_profiling()).read())
    return [e["name"] for e in events if e.get("cat") == "Node" and "Conv" in e.get("args", {}).get("op_name", "")]


def test_profiling_shows_later_blocks_are_skipped(trained, tmp_path):
    gated = trained.extra_models["early_exit_gated.onnx"]
    x = X1["input"]
    early = _conv_events(gated, x, 0.0, tmp_path)   # every sample leaves at exit 1
    full = _conv_events(gated, x, 1.5, tmp_path)    # no sample is ever confident enough
    # ORT renames fused/NCHWc convs, so compare the sets: the second block's conv ran only when it had to
    assert len(early) == 1 and len(full) == 2 and set(early) < set(full)


def test_step_report_and_artifacts(trained, cnn):
    model, data = cnn
    res, r = trained, trained.report
    assert [o.name for o in res.model.graph.output] == ["logits", "exit_1", "exit_2"]
    x = data.holdout.inputs["input"]
    # Backbone frozen: the final head is the original, bit for bit.
    np.testing.assert_array_equal(_sess(res.model).run(["logits"], {"input": x})[0],
                                  _sess(model).run(None, {"input": x})[0])
    orig_acc = float((_sess(model).run(None, {"input": x})[0].argmax(1) == data.holdout.labels).mean())
    assert abs(r["full"]["accuracy"] - orig_acc) < 1e-6
    assert r["exits"][0]["holdout_accuracy"] > 0.75 and r["exits"][1]["holdout_accuracy"] > 0.9
    assert r["exits"][0]["macs_fraction"] < 0.15 < 0.8 < r["exits"][1]["macs_fraction"] < 1.0
    rows = r["thresholds"]
    assert [row["threshold"] for row in rows] == sorted(row["threshold"] for row in rows) and len(rows) >= 10
    for row in rows:
        assert abs(sum(row["exit_fractions"]) - 1) < 1e-5 and row["latency_ms"] > 0
    assert [row["mean_macs"] for row in rows] == sorted(row["mean_macs"] for row in rows)
    assert rows[0]["macs_ratio"] > 2.5 and rows[0]["exit_fractions"][0] > 0.5
    rec = next(row for row in rows if row["threshold"] == r["recommended_threshold"])
    assert rec["accuracy"] >= r["full"]["accuracy"] - 0.005 - 1e-9 and rec["macs_ratio"] > 1.2
    assert r["gated_default_threshold"] == r["recommended_threshold"] and r["gated_matches_simulation"] == 1.0
    json.dumps(r)
    gated = res.extra_models["early_exit_gated.onnx"]
    onnx.checker.check_model(gated, full_check=True)
    assert [n.op_type for n in gated.graph.node].count("If") == 1  # nested: the second If is inside the first
    then = next(a.g for a in next(n for n in gated.graph.node if n.op_type == "If").attribute
                if a.name == "then_branch")
    assert any(n.op_type == "If" for n in then.node)
    # a nested block's weights are its subgraph's own initializers (ORT only fuses/re-lays-out those)
    conv2_w = [n.input[1] for n in model.graph.node if n.op_type == "Conv"][1]
    assert conv2_w in {t.name for t in then.initializer} - {t.name for t in gated.graph.initializer}
    default = next(t for t in gated.graph.initializer if t.name == "threshold")
    assert abs(float(numpy_helper.to_array(default)) - r["recommended_threshold"]) < 1e-6
    assert [o.name for o in gated.graph.output] == ["logits", "exit_index"]
    logits, idx = _sess(gated).run(None, {"input": x[:1]})  # the default threshold needs no feed
    assert logits.shape == (1, 10) and idx.dtype == np.int64


def test_backbone_trains_when_not_frozen_and_unlabelled_data_distills(cnn, tmp_path):
    model, data = cnn
    unlabelled = type(data)(Arrays(data.train.inputs, None), Arrays(data.holdout.inputs, None), data.meta)
    res = _apply({**SPEC, "freeze_backbone": False, "lr": 1e-3, "epochs": 2, "exits": ["/features/features.3/MaxPool"],
                  "criterion": "entropy", "threshold": 0.8}, model, unlabelled, tmp_path)
    r = res.report
    assert r["metric"].startswith("agreement") and any("distillation" in n for n in r["notes"])
    assert [e["after_node"] for e in r["exits"]] == ["/features/features.3/MaxPool"]
    conv_w = next(n.input[1] for n in model.graph.node if n.op_type == "Conv")
    before = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == conv_w)
    after = next(numpy_helper.to_array(t) for t in res.model.graph.initializer if t.name == conv_w)
    assert not np.array_equal(before, after)  # the backbone moved
    x = data.holdout.inputs["input"]
    agree = (_sess(res.model).run(["logits"], {"input": x})[0].argmax(1) == _sess(model).run(None, {"input": x})[0]
             .argmax(1)).mean()
    assert agree > 0.93
    # no labels: "accuracy" is agreement with the trained final head, so the untrained model's is exactly `agree`
    assert abs(r["full"]["accuracy_before_training"] - agree) < 1e-6
    assert r["gated_default_threshold"] == 0.8 and 0.8 in [row["threshold"] for row in r["thresholds"]]


@pytest.mark.parametrize("bad", [
    {"threshold": 1.5}, {"thresholds": []}, {"thresholds": [0.5, -0.1]}, {"exits": []}, {"exits": ["a", "a"]},
    {"exits": ["a"], "num_exits": 2}, {"criterion": "margin"}, {"num_exits": 0}, {"epochs": 0}, {"threshold": "best"},
])
def test_bad_specs_are_refused(bad):
    with pytest.raises(InvalidSpec):
        parse_spec({"steps": [{"method": "early_exit", **bad}]})


def test_needs_a_dataset_and_a_classifier(cnn, tmp_path):
    model, data = cnn
    assert parse_spec({"steps": [{"method": "early_exit", "threshold": "auto"}]}).steps[0].needs_data
    with pytest.raises(InvalidSpec, match="needs a dataset"):
        _apply(SPEC, model, None, tmp_path)
    flat = onnx.helper.make_model(onnx.helper.make_graph(  # output [N·784]: not class scores
        [onnx.helper.make_node("Relu", ["input"], ["r"]), onnx.helper.make_node("Reshape", ["r", "shape"], ["out"])],
        "g", [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 1, 28, 28])],
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([-1], np.int64), "shape")]), opset_imports=[onnx.helper.make_opsetid("", 17)])
    with pytest.raises(InvalidSpec, match="need a classifier"):
        _apply(SPEC, flat, data, tmp_path)
