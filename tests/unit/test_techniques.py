"""Techniques: a contract over every registered technique, then structure and numbers per technique."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from compression.context import StepContext
from compression.data import Arrays, split
from compression.registry import get_technique, list_techniques
from compression.spec import parse_spec

CONTRACT_SPECS = {
    "prune": {"method": "prune", "sparsity": 0.5, "finetune": {"epochs": 1}},
    "quantize": {"method": "quantize", "mode": "static", "calibration_samples": 64},
    "distill": {"method": "distill", "epochs": 1},
    "lowrank": {"method": "lowrank", "energy": 0.9},
    "depthwise_separable": {"method": "depthwise_separable", "finetune": {"epochs": 1}},
    "early_exit": {"method": "early_exit", "epochs": 1, "latency_samples": 20, "latency_rounds": 1},
    "slimmable": {"method": "slimmable", "widths": [0.5, 1.0], "epochs": 1},
}


def _ctx(tmp_path, model, data, seed=0):
    return StepContext(workdir=tmp_path, data=data, original=model, seed=seed, threads=1)


def _run(model: onnx.ModelProto, X: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": X})[0]


def _acc(model, data) -> float:
    return float((_run(model, data.holdout.inputs["input"]).argmax(1) == data.holdout.labels).mean())


def _apply(name_or_spec, model, data, tmp_path):
    step = parse_spec({"steps": [name_or_spec]}).steps[0]
    return get_technique(step.method).apply(model, step, _ctx(tmp_path, model, data))


def test_every_technique_has_a_contract_spec():
    assert set(CONTRACT_SPECS) == set(list_techniques())


@pytest.mark.parametrize("name", list_techniques())
def test_contract(name, lenet, tmp_path):
    model, data = lenet
    res = _apply(CONTRACT_SPECS[name], model, data, tmp_path)
    onnx.checker.check_model(res.model)
    out = _run(res.model, data.holdout.inputs["input"])
    ref = _run(model, data.holdout.inputs["input"])
    assert out.shape == ref.shape and np.isfinite(out).all()
    assert float((out.argmax(1) == ref.argmax(1)).mean()) > 0.8
    assert isinstance(res.report, dict) and res.report


def _prunable(model):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    names = [n.input[1] for n in model.graph.node if n.op_type in ("Gemm", "MatMul", "Conv") and n.input[1] in inits]
    return {n: inits[n] for n in names}


def test_static_int8_cnn_size_and_accuracy(trained_cnn, cnn_onnx, mnist_data, tmp_path):
    X, y = mnist_data
    model = onnx.load(str(cnn_onnx["legacy"]))
    data = split(Arrays({"input": X[4000:5000]}, y[4000:5000]), holdout=0.5, seed=0, max_eval=1000)
    res = _apply({"method": "quantize", "mode": "static", "per_channel": True}, model, data, tmp_path)
    q = res.model
    assert len(q.SerializeToString()) * 3.5 < len(model.SerializeToString())
    assert {n.op_type for n in q.graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv"}
    assert _acc(q, data) >= _acc(model, data) - 0.01
    assert res.report["per_channel"] and res.report["calibration"] == "minmax"


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_static_int8_other_calibrations(lenet, tmp_path, method):
    model, data = lenet
    res = _apply({"method": "quantize", "mode": "static", "calibration": method, "calibration_samples": 64},
                 model, data, tmp_path)
    assert _acc(res.model, data) >= _acc(model, data) - 0.02


def test_dynamic_int8_rewrites_gemm_and_shrinks(lenet, tmp_path):
    model, data = lenet
    res = _apply({"method": "quantize", "mode": "dynamic"}, model, data, tmp_path)
    ops = {n.op_type for n in res.model.graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeLinear" in ops
    assert len(res.model.SerializeToString()) * 3.5 < len(model.SerializeToString())
    assert _acc(res.model, data) >= _acc(model, data) - 0.01


def test_pruned_zeros_survive_static_quantization(lenet, tmp_path):
    from compression.analysis import count_params

    model, data = lenet
    pruned = _apply({"method": "prune", "sparsity": 0.6}, model, data, tmp_path).model
    q = _apply({"method": "quantize", "mode": "static", "calibration_samples": 64}, pruned, data, tmp_path).model
    p_params, p_nz = count_params(pruned)
    q_params, q_nz = count_params(q)
    weights = sum(a.size for a in _prunable(pruned).values())
    assert p_nz <= p_params - int(0.6 * weights) + 1
    assert q_nz <= p_nz  # symmetric int8: a zero stays exactly zero
