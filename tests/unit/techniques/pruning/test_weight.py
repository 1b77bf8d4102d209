"""Weight (unstructured) pruning: exact sparsity, per-layer overrides, iterative pruning with fine-tuning
that keeps the zeros, random importance as the worse baseline, distillation without labels."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compression.data import Arrays
from compression.errors import InvalidSpec
from testkit.helpers import accuracy, apply_step


def _prunable(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    names = [n.input[1] for n in model.graph.node if n.op_type in ("Gemm", "MatMul", "Conv") and n.input[1] in inits]
    return {n: inits[n] for n in names}


def test_global_weight_pruning_hits_exact_sparsity(lenet, tmp_path):
    model, data = lenet
    res = apply_step({"method": "prune", "sparsity": 0.7}, model, data, tmp_path)
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
    res = apply_step({"method": "prune", "sparsity": 0.5, "scope": "layer", "layers": {names[-1]: 0.2}},
                     model, data, tmp_path)
    w = _prunable(res.model)
    for n in names[:-1]:
        assert abs(float((w[n] == 0).mean()) - 0.5) < 2e-3
    assert abs(float((w[names[-1]] == 0).mean()) - 0.2) < 5e-3


def test_unknown_layer_override_is_refused(lenet, tmp_path):
    model, data = lenet
    with pytest.raises(InvalidSpec, match="unknown layers"):
        apply_step({"method": "prune", "scope": "layer", "layers": {"nope": 0.3}}, model, data, tmp_path)


def test_iterative_pruning_with_finetune_recovers_and_keeps_zeros(lenet, tmp_path):
    model, data = lenet
    base = accuracy(model, data)
    one_shot = apply_step({"method": "prune", "sparsity": 0.9}, model, data, tmp_path)
    tuned = apply_step({"method": "prune", "sparsity": 0.9, "iterations": 3,
                        "finetune": {"epochs": 2, "lr": 1e-3, "batch_size": 64}}, model, data, tmp_path)
    w = _prunable(tuned.model)
    sparsity = sum(int((a == 0).sum()) for a in w.values()) / sum(a.size for a in w.values())
    assert sparsity >= 0.899  # fine-tuning did not regrow pruned weights
    assert len(tuned.report["rounds"]) == 3
    assert accuracy(tuned.model, data) > accuracy(one_shot.model, data)
    assert accuracy(tuned.model, data) >= base - 0.03


def test_random_importance_is_the_worse_baseline(lenet, tmp_path):
    model, data = lenet
    l1 = apply_step({"method": "prune", "sparsity": 0.85}, model, data, tmp_path)
    rnd = apply_step({"method": "prune", "sparsity": 0.85, "importance": "random"}, model, data, tmp_path)
    assert accuracy(l1.model, data) > accuracy(rnd.model, data) + 0.05


def test_distillation_finetune_without_labels(lenet, tmp_path):
    model, data = lenet
    unlabelled = type(data)(Arrays(data.train.inputs, None), data.holdout, data.meta)
    res = apply_step({"method": "prune", "sparsity": 0.8, "finetune": {"epochs": 2}}, model, unlabelled, tmp_path)
    assert any("distillation" in n for n in res.report["notes"])
    one_shot = apply_step({"method": "prune", "sparsity": 0.8}, model, data, tmp_path)
    assert accuracy(res.model, data) >= accuracy(one_shot.model, data)
