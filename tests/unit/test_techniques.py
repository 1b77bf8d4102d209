"""Techniques: a contract over every registered technique, then structure and numbers per technique."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from compression.context import StepContext
from compression.data import Arrays, split
from compression.registry import get_technique, list_techniques
from testkit.refdata import fit
from compression.spec import parse_spec
from testkit.zoo import LeNet300100, export_onnx

CONTRACT_SPECS = {
    "prune": {"method": "prune", "sparsity": 0.5, "finetune": {"epochs": 1}},
    "quantize": {"method": "quantize", "mode": "static", "calibration_samples": 64},
    "distill": {"method": "distill", "epochs": 1},
    "lowrank": {"method": "lowrank", "energy": 0.9},
    "depthwise_separable": {"method": "depthwise_separable", "finetune": {"epochs": 1}},
    "early_exit": {"method": "early_exit", "epochs": 1, "latency_samples": 20, "latency_rounds": 1},
    "slimmable": {"method": "slimmable", "widths": [0.5, 1.0], "epochs": 1},
}


@pytest.fixture(scope="module")
def lenet(mnist_data, tmp_path_factory):
    X, y = mnist_data
    Xf = X.reshape(len(X), -1)
    torch.manual_seed(0)
    net = fit(LeNet300100(), Xf[:3000], y[:3000], epochs=2)
    path = export_onnx(net, torch.zeros(2, 784), tmp_path_factory.mktemp("lenet") / "lenet.onnx", dynamo=True)
    data = split(Arrays({"input": Xf[3000:4000]}, y[3000:4000]), holdout=0.4, seed=0, max_eval=1000)
    return onnx.load(str(path)), data


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


def test_global_weight_pruning_hits_exact_sparsity(lenet, tmp_path):
    model, data = lenet
    res = _apply({"method": "prune", "sparsity": 0.7}, model, data, tmp_path)
    w = _prunable(res.model)
    zeros = sum(int((a == 0).sum()) for a in w.values())
    total = sum(a.size for a in w.values())
    assert abs(zeros / total - 0.7) < 1e-3
    # Global scope: layers end up with different sparsities (big layers give more).
    per_layer = sorted(float((a == 0).mean()) for a in w.values())
    assert per_layer[-1] - per_layer[0] > 0.05


def test_layer_scope_and_overrides(lenet, tmp_path):
    model, data = lenet
    names = list(_prunable(model))
    res = _apply({"method": "prune", "sparsity": 0.5, "scope": "layer", "layers": {names[-1]: 0.2}},
                 model, data, tmp_path)
    w = _prunable(res.model)
    for n in names[:-1]:
        assert abs(float((w[n] == 0).mean()) - 0.5) < 2e-3
    assert abs(float((w[names[-1]] == 0).mean()) - 0.2) < 5e-3


def test_unknown_layer_override_is_refused(lenet, tmp_path):
    from compression.errors import InvalidSpec

    model, data = lenet
    with pytest.raises(InvalidSpec, match="unknown layers"):
        _apply({"method": "prune", "scope": "layer", "layers": {"nope": 0.3}}, model, data, tmp_path)


def test_iterative_pruning_with_finetune_recovers_and_keeps_zeros(lenet, tmp_path):
    model, data = lenet
    base = _acc(model, data)
    one_shot = _apply({"method": "prune", "sparsity": 0.9}, model, data, tmp_path)
    tuned = _apply({"method": "prune", "sparsity": 0.9, "iterations": 3,
                    "finetune": {"epochs": 2, "lr": 1e-3, "batch_size": 64}}, model, data, tmp_path)
    w = _prunable(tuned.model)
    sparsity = sum(int((a == 0).sum()) for a in w.values()) / sum(a.size for a in w.values())
    assert sparsity >= 0.899  # fine-tuning did not regrow pruned weights
    assert len(tuned.report["rounds"]) == 3
    assert _acc(tuned.model, data) > _acc(one_shot.model, data)
    assert _acc(tuned.model, data) >= base - 0.03


def test_random_importance_is_the_worse_baseline(lenet, tmp_path):
    model, data = lenet
    l1 = _apply({"method": "prune", "sparsity": 0.85}, model, data, tmp_path)
    rnd = _apply({"method": "prune", "sparsity": 0.85, "importance": "random"}, model, data, tmp_path)
    assert _acc(l1.model, data) > _acc(rnd.model, data) + 0.05


def test_distillation_finetune_without_labels(lenet, tmp_path):
    model, data = lenet
    unlabelled = type(data)(Arrays(data.train.inputs, None), data.holdout, data.meta)
    res = _apply({"method": "prune", "sparsity": 0.8, "finetune": {"epochs": 2}}, model, unlabelled, tmp_path)
    assert any("distillation" in n for n in res.report["notes"])
    one_shot = _apply({"method": "prune", "sparsity": 0.8}, model, data, tmp_path)
    assert _acc(res.model, data) >= _acc(one_shot.model, data)
