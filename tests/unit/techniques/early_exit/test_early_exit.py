"""The early-exit step: its report's numbers, both artifacts, training the backbone, and refusals."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compression.data import Arrays
from compression.errors import InvalidSpec
from compression.metrics import session
from compression.spec import parse_spec
from testkit.helpers import apply_step, run_ort

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_step_report_and_artifacts(trained, cnn):
    model, data = cnn
    res, r = trained, trained.report
    assert [o.name for o in res.model.graph.output] == ["logits", "exit_1", "exit_2"]
    x = data.holdout.inputs["input"]
    # Backbone frozen: the final head is the original, bit for bit.
    np.testing.assert_array_equal(run_ort(res.model, x), run_ort(model, x))  # "logits" is the first output
    orig_acc = float((run_ort(model, x).argmax(1) == data.holdout.labels).mean())
    assert abs(r["full"]["accuracy"] - orig_acc) < 1e-6
    # the last exit measured 0.8975 on 2026-12-01 (numbers moved with the machine; the code is unchanged)
    assert r["exits"][0]["holdout_accuracy"] > 0.75 and r["exits"][1]["holdout_accuracy"] > 0.88
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
    logits, idx = session(gated, 1, quiet=True).run(None, {"input": x[:1]})  # the default threshold needs no feed
    assert logits.shape == (1, 10) and idx.dtype == np.int64


def test_backbone_trains_when_not_frozen_and_unlabelled_data_distills(cnn, spec, tmp_path):
    model, data = cnn
    unlabelled = type(data)(Arrays(data.train.inputs, None), Arrays(data.holdout.inputs, None), data.meta)
    res = apply_step({**spec, "freeze_backbone": False, "lr": 1e-3, "epochs": 2,
                      "exits": ["/features/features.3/MaxPool"], "criterion": "entropy", "threshold": 0.8},
                     model, unlabelled, tmp_path)
    r = res.report
    assert r["metric"].startswith("agreement") and any("distillation" in n for n in r["notes"])
    assert [e["after_node"] for e in r["exits"]] == ["/features/features.3/MaxPool"]
    conv_w = next(n.input[1] for n in model.graph.node if n.op_type == "Conv")
    before = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == conv_w)
    after = next(numpy_helper.to_array(t) for t in res.model.graph.initializer if t.name == conv_w)
    assert not np.array_equal(before, after)  # the backbone moved
    x = data.holdout.inputs["input"]
    agree = (run_ort(res.model, x).argmax(1) == run_ort(model, x).argmax(1)).mean()
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


def test_needs_a_dataset_and_a_classifier(cnn, spec, tmp_path):
    model, data = cnn
    assert parse_spec({"steps": [{"method": "early_exit", "threshold": "auto"}]}).steps[0].needs_data
    with pytest.raises(InvalidSpec, match="needs a dataset"):
        apply_step(spec, model, None, tmp_path)
    flat = onnx.helper.make_model(onnx.helper.make_graph(  # output [N·784]: not class scores
        [onnx.helper.make_node("Relu", ["input"], ["r"]), onnx.helper.make_node("Reshape", ["r", "shape"], ["out"])],
        "g", [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 1, 28, 28])],
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([-1], np.int64), "shape")]), opset_imports=[onnx.helper.make_opsetid("", 17)])
    with pytest.raises(InvalidSpec, match="need a classifier"):
        apply_step(spec, flat, data, tmp_path)
