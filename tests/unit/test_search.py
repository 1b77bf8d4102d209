"""Search to a target (compression.search, compression.search_space) on LeNet-300-100 in-process."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from compression.errors import Cancelled, InvalidSpec
from compression.pipeline import run_pipeline
from compression.search import pareto_front
from compression.search_space import expand
from compression.spec import parse_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EVAL = {"latency_runs": 5, "holdout": 0.4}


class DictCheckpoint(dict):
    """The Checkpoint protocol over a dict (the service uses the artifact store)."""

    def get(self, name):
        return dict.get(self, name)

    def put(self, name, data):
        self[name] = data


def _steps(spec):
    p = parse_spec(spec)
    return p.raw_steps(), p.search


def test_grid_is_the_product_without_duplicates_and_validated():
    steps, search = _steps({"steps": [{"method": "prune", "sparsity": 0.5},
                                      {"method": "quantize", "scheme": "int8", "mode": "dynamic"}],
                            "search": {"prune.sparsity": [0.5, 0.9], "quantize.scheme": ["int8", "cluster"],
                                       "cluster.bits": [4, 6]}})
    cands = expand(steps, search)
    # int8 ignores cluster.bits: 2 sparsities × (int8 + cluster×2 bits) = 6, not 8
    assert len(cands) == 6 and len({c.id for c in cands}) == 6
    clusters = [c for c in cands if c.steps[1]["scheme"] == "cluster"]
    assert sorted((c.steps[0]["sparsity"], c.steps[1]["bits"]) for c in clusters) == [(0.5, 4), (0.5, 6), (0.9, 4), (0.9, 6)]
    assert all("mode" not in c.steps[1] or c.steps[1]["mode"] is None for c in clusters)  # int8's option dropped


@pytest.mark.parametrize("search, loc", [
    ({"prune.sparsity": [1.5]}, ["search", "prune.sparsity"]),
    ({"quantize.bits": [4]}, ["search", "quantize.bits"]),
    ({"prune.nope": [1]}, ["search", "prune.nope"]),
    ({"bogus": [1]}, ["search", "bogus"]),
    ({"prune.sparsity": []}, ["search", "prune.sparsity"]),
    ({"steps[3].sparsity": [0.5]}, ["search", "steps[3].sparsity"]),
])
def test_bad_search_refused_with_its_key(search, loc):
    with pytest.raises(InvalidSpec) as e:
        parse_spec({"steps": [{"method": "prune"}], "search": search})
    assert e.value.errors[0]["loc"] == loc


def test_auto_grid_and_cheapest_first():
    steps, _ = _steps({"steps": [{"method": "prune", "sparsity": 0.5, "finetune": {"epochs": 3}},
                                 {"method": "quantize", "scheme": "int8"}], "target": {}})
    cands = expand(steps, "auto")
    sparsities = {c.steps[0]["sparsity"] for c in cands}
    assert sparsities == {0.5, 0.7, 0.8, 0.9, 0.95}
    assert {c.steps[1]["scheme"] for c in cands} == {"int8", "cluster"}
    assert any(c.sensitivity_steps == [0] for c in cands) and any(not c.sensitivity_steps for c in cands)
    costs = [c.cost for c in cands]
    assert costs == sorted(costs)
    # the first few already span the grid (bit-reversed order), not one corner
    assert len({c.steps[0]["sparsity"] for c in cands[:6]}) >= 3


def test_pareto_front():
    pts = [("a", 0.0, 10.0), ("b", 0.01, 5.0), ("c", 0.02, 6.0), ("d", 0.05, 1.0), ("e", 0.0, 12.0)]
    assert pareto_front(pts) == ["a", "b", "d"]


def test_search_finds_best_meeting_target_and_resumes(lenet, tmp_path):
    model, data = lenet
    spec = parse_spec({"steps": [{"method": "prune", "sparsity": 0.5}, {"method": "quantize", "scheme": "int8",
                                                                          "mode": "dynamic"}],
                       "search": {"prune.sparsity": [0.3, 0.6, 0.9, 0.97], "prune.allocation": ["uniform", "sensitivity"]},
                       "target": {"max_accuracy_drop": 0.01, "metric": "accuracy", "optimize": "compressed_bytes"},
                       "eval": EVAL})
    ck = DictCheckpoint()
    (tmp_path / "a").mkdir()
    res = run_pipeline(model, spec, data, tmp_path / "a", checkpoint=ck)
    s = res.metrics["search"]
    assert s["tried"] == s["finished"] == 8 and not s["partial"] and s["stopped_by"] == "grid exhausted"
    orig_acc = res.metrics["original"]["accuracy"]
    done = s["candidates"]
    for c in done:  # drops are the measured ones
        assert c["drop"] == pytest.approx(orig_acc - c["metrics"]["accuracy"], abs=1e-6)
        assert c["meets_target"] == (c["drop"] <= 0.01 + 1e-9)
    meeting = [c for c in done if c["meets_target"]]
    assert meeting and s["target_met"]
    assert s["best"]["objective"] == min(c["objective"] for c in meeting)
    # the published model is the best candidate: its compressed size is the objective
    assert res.metrics["result"]["compressed_bytes"] == s["best"]["objective"]
    # the front: no member is beaten on both axes by any candidate, and every non-member is
    pts = {c["id"]: (c["drop"], c["objective"]) for c in done}
    for pid, (d, o) in pts.items():
        beaten = any(d2 <= d and o2 <= o and (d2, o2) != (d, o) for d2, o2 in pts.values())
        assert beaten == (pid not in s["front"])
    names = {f.name for f in res.files}
    assert {"model.onnx", "pareto.svg", "report.json"} <= names
    fronts = sorted(n for n in names if n.startswith("front-"))
    assert len(fronts) == len(s["front"])
    for f in res.files:
        if f.name.startswith("front-") or f.name == "model.onnx":
            sess = ort.InferenceSession(str(f.path), providers=["CPUExecutionProvider"])
            out = sess.run(None, {"input": data.holdout.inputs["input"][:8]})[0]
            assert out.shape == (8, 10) and np.isfinite(out).all()
    svg = (tmp_path / "a" / "pareto.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<circle") >= len(done)
    # the sensitivity scan ran once and allocation used it: a sensitivity candidate prunes layers unevenly
    assert "sensitivity.json" in ck and set(s["sensitivity"])
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["metrics"]["search"]["best"]["id"] == s["best"]["id"]

    # a second run with the same checkpoint resumes every candidate and picks the same best
    (tmp_path / "b").mkdir()
    again = run_pipeline(model, spec, data, tmp_path / "b", checkpoint=ck)
    s2 = again.metrics["search"]
    assert s2["resumed"] == 8 and s2["best"]["id"] == s["best"]["id"]
    assert all(c["resumed"] for c in s2["candidates"])


def test_cancel_keeps_what_finished_and_trials_budget(lenet, tmp_path):
    model, data = lenet
    spec = parse_spec({"steps": [{"method": "prune", "sparsity": 0.5}],
                       "search": {"prune.sparsity": [0.2, 0.4, 0.6, 0.8, 0.9]},
                       "target": {"metric": "agreement", "max_accuracy_drop": 0.05, "optimize": "file_bytes"},
                       "eval": EVAL})
    seen = set()

    def progress(p):
        msg = p.get("message", "")
        seen.add(msg.split(" (")[0])
        if msg.startswith("candidate 3 "):
            raise Cancelled("cancelled by user")

    res = run_pipeline(model, spec, data, tmp_path, progress=progress)
    s = res.metrics["search"]
    assert s["partial"] and s["stopped_by"] == "cancelled" and s["finished"] == 2
    assert res.metrics["result"]["file_bytes"] == s["best"]["objective"]

    # cancelled before anything finished: the cancel stands
    def early(p):
        if p.get("message", "").startswith("candidate 1 "):
            raise Cancelled("cancelled by user")

    (tmp_path / "c").mkdir()
    with pytest.raises(Cancelled):
        run_pipeline(model, spec, data, tmp_path / "c", progress=early)

    budget = parse_spec({**spec.to_json(), "budget": {"trials": 2, "minutes": 30}})
    (tmp_path / "d").mkdir()
    s = run_pipeline(model, budget, data, tmp_path / "d").metrics["search"]
    assert s["tried"] == 2 and s["stopped_by"] == "trials budget" and not s["partial"] and s["grid_size"] == 5


def test_no_candidate_meets_target_still_returns_closest(lenet, tmp_path):
    model, data = lenet
    spec = parse_spec({"steps": [{"method": "prune"}], "search": {"prune.sparsity": [0.97, 0.99]},
                       # 97-99% sparsity breaks the model: past the quality gate, published here on purpose
                       "target": {"max_accuracy_drop": 0.0, "metric": "agreement"}, "eval": {**EVAL, "gate": False}})
    s = run_pipeline(model, spec, data, tmp_path).metrics["search"]
    assert not s["target_met"]
    assert s["best"]["drop"] == min(c["drop"] for c in s["candidates"])


def _tiny_lm():
    """logits = emb[ids] @ W (V 64, D 48) and text it predicts fairly well: each next token the argmax of the
    current one's logits, 30% of them replaced by noise."""
    from onnx import TensorProto, helper, numpy_helper

    from compression.data import Arrays, split

    rng = np.random.default_rng(0)
    emb, w = rng.standard_normal((64, 48)).astype(np.float32), (rng.standard_normal((48, 64)) * 0.5).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
                           helper.make_node("MatMul", ["h", "W"], ["logits"])], "lm",
                          [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["n", "t"])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", "t", 64])],
                          [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(w, "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    x = np.zeros((60, 16), np.int64)
    x[:, 0] = rng.integers(0, 64, 60)
    for t in range(1, 16):
        x[:, t] = np.where(rng.random(60) < 0.3, rng.integers(0, 64, 60), (emb @ w)[x[:, t - 1]].argmax(-1))
    return model, split(Arrays({"input_ids": x}), holdout=0.5, seed=0, max_eval=2000)


def test_a_perplexity_target_keeps_the_smallest_candidate_within_its_ratio(tmp_path):
    """target metric perplexity: a candidate's drop is its perplexity's relative rise, it meets the target
    within max_perplexity_ratio, and the best is the smallest file among those that do."""
    model, data = _tiny_lm()
    met = {}
    for ratio in (1.01, 1.5):
        spec = parse_spec({"steps": [{"method": "quantize", "mode": "dynamic"}], "eval": EVAL,
                           "search": {"quantize.scheme": ["int8", "cluster"], "cluster.bits": [2]},
                           "target": {"metric": "perplexity", "max_perplexity_ratio": ratio, "optimize": "file_bytes"}})
        wd = tmp_path / str(ratio)
        wd.mkdir()
        res = run_pipeline(model, spec, data, wd).metrics
        s, ppl0 = res["search"], res["original"]["perplexity"]
        assert s["allowed_drop"] == pytest.approx(ratio - 1)
        for c in s["candidates"]:
            assert c["drop"] == pytest.approx(c["metrics"]["perplexity"] / ppl0 - 1, abs=1e-6)
            met[ratio, c["values"]["quantize.scheme"]] = c["meets_target"]
        meeting = [c for c in s["candidates"] if c["meets_target"]]
        assert s["best"]["id"] == min(meeting, key=lambda c: c["objective"])["id"]
        assert "perplexity" in res["result"]["verdict"]["summary"]
    # 2-bit clusters raise the perplexity by more than 1% but less than 50% (measured: 17%); int8 keeps it
    assert met == {(1.01, "int8"): True, (1.01, "cluster"): False, (1.5, "int8"): True, (1.5, "cluster"): True}
