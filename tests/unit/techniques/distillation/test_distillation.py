"""Distillation: teachers by name or id, ensembles, uploaded students, unlabelled data, non-class outputs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compression.data import Arrays, DataSplit
from compression.errors import InvalidSpec
from compression.spec import parse_spec
from compression.training import ensemble_targets
from testkit.helpers import apply_step, run_ort
from testkit.refdata import fit
from testkit.zoo import export_onnx


def _mlp(hidden: int, seed: int, out: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, out))


def _export(net: nn.Module, path) -> onnx.ModelProto:
    return onnx.load(str(export_onnx(net.eval(), torch.zeros(2, 784), path, dynamo=False)))


@pytest.fixture(scope="module")
def zoo(mnist_data, tmp_path_factory):
    """Three teachers (different seeds), an untrained small student, and a 1,500/500 split of unseen data."""
    X, y = mnist_data
    Xf = X.reshape(len(X), -1)
    d = tmp_path_factory.mktemp("kd")
    teachers = {f"t{i}": _export(fit(_mlp(128, i), Xf[:2500], y[:2500], epochs=2, seed=i), d / f"t{i}.onnx")
                for i in range(3)}
    student = _export(_mlp(16, 99), d / "student.onnx")
    data = DataSplit(Arrays({"input": Xf[2500:4000]}, y[2500:4000]), Arrays({"input": Xf[4500:5000]}, y[4500:5000]))
    return teachers, student, data


def test_ensemble_target_is_the_average_softened_distribution():
    rng = np.random.default_rng(0)
    outs = [rng.standard_normal((5, 4)).astype(np.float32) * 3 for _ in range(3)]
    t = 4.0
    target = ensemble_targets(outs, t, class_scores=True)
    soft = lambda z: np.exp(z / t) / np.exp(z / t).sum(1, keepdims=True)
    np.testing.assert_allclose(soft(target), np.mean([soft(o) for o in outs], 0), atol=1e-5)
    np.testing.assert_allclose(ensemble_targets(outs, t, class_scores=False), np.mean(outs, 0), atol=1e-6)
    assert ensemble_targets(outs[:1], t, True) is outs[0]


def test_uploaded_student_learns_from_the_original(zoo, tmp_path):
    teachers, student, data = zoo
    res = apply_step({"method": "distill", "student_model_id": "s", "epochs": 4, "lr": 3e-3, "temperature": 4},
                     teachers["t0"], data, tmp_path, models={"s": student})
    r = res.report
    assert r["student_holdout_accuracy_before"] < 0.3 and r["student_holdout_accuracy_after"] > 0.8
    assert r["loss"] == "kl" and r["labels_used"] and r["loss_per_epoch"][-1] < r["loss_per_epoch"][0]
    # The result is the student's graph (16 hidden units), not the teacher's.
    dims = sorted(tuple(t.dims) for t in res.model.graph.initializer if len(t.dims) == 2)
    assert (16, 784) in dims or (784, 16) in dims
    assert float((run_ort(res.model, data.holdout.inputs["input"]).argmax(1) == data.holdout.labels).mean()) > 0.8


def test_unlabelled_dataset_distils_from_teachers_alone(zoo, tmp_path):
    teachers, student, data = zoo
    unlabelled = DataSplit(Arrays(data.train.inputs, None), data.holdout)
    res = apply_step({"method": "distill", "student_model_id": "s", "epochs": 4, "lr": 3e-3},
                     teachers["t0"], unlabelled, tmp_path, models={"s": student})
    assert not res.report["labels_used"] and res.report["alpha"] == 0.0
    assert res.report["student_holdout_accuracy_after"] > 0.75
    assert any("no labels" in n for n in res.report["notes"])


def test_teacher_ensemble_differs_from_a_single_teacher(zoo, tmp_path):
    teachers, student, data = zoo
    spec = {"method": "distill", "student_model_id": "s", "epochs": 2, "lr": 3e-3, "alpha": 0.0}
    single = apply_step(spec, teachers["t0"], data, tmp_path, models={"s": student, **teachers})
    ens = apply_step({**spec, "teachers": ["original", "t1", "t2"]}, teachers["t0"], data, tmp_path,
                     models={"s": student, **teachers})
    assert ens.report["ensemble"] and len(ens.report["teachers"]) == 3
    accs = [t["holdout_accuracy"] for t in ens.report["teachers"]]
    assert ens.report["ensemble_holdout_accuracy"] >= min(accs)
    X = data.holdout.inputs["input"]
    a, b = run_ort(single.model, X), run_ort(ens.model, X)
    assert np.abs(a - b).max() > 1e-2  # same student, seed and data: only the target differs
    assert ens.report["student_holdout_accuracy_after"] > 0.5


def test_distill_recovers_a_pruned_pipeline_model(zoo, tmp_path):
    teachers, _, data = zoo
    original = teachers["t0"]
    pruned = apply_step({"method": "prune", "granularity": "channel", "sparsity": 0.9, "scope": "layer"},
                        original, data, tmp_path).model
    res = apply_step({"method": "distill", "epochs": 3, "lr": 3e-3}, pruned, data, tmp_path)
    assert res.report["student"] == "pipeline model"
    assert res.report["student_holdout_accuracy_after"] > res.report["student_holdout_accuracy_before"] + 0.02
    assert sum(int(np.prod(t.dims)) for t in res.model.graph.initializer) < 0.15 * sum(
        int(np.prod(t.dims)) for t in original.graph.initializer)


class _Tokens(nn.Module):
    """An embedding-like output [N, 4 tokens, 8 dims] (not class scores)."""

    def __init__(self, hidden: int, seed: int) -> None:
        super().__init__()
        self.net = _mlp(hidden, seed, out=32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).reshape(-1, 4, 8)


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_embedding_outputs_use_mse_or_cosine(mnist_data, tmp_path, loss):
    X, _ = mnist_data
    Xf = X.reshape(len(X), -1)
    teacher = _export(_Tokens(64, 1), tmp_path / "emb_t.onnx")
    student = _export(_Tokens(8, 2), tmp_path / "emb_s.onnx")
    data = DataSplit(Arrays({"input": Xf[:1000]}, None), Arrays({"input": Xf[1000:1200]}, None))
    res = apply_step({"method": "distill", "student_model_id": "s", "loss": loss, "epochs": 3, "lr": 3e-3},
                     teacher, data, tmp_path, models={"s": student})
    assert res.report["loss"] == loss and not res.report["class_scores"]
    def cosine(m: onnx.ModelProto) -> float:
        a, b = run_ort(m, Xf[1000:1200]), run_ort(teacher, Xf[1000:1200])
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())

    assert cosine(res.model) > max(0.7, cosine(student) + 0.3)
    assert res.report["student_teacher_cosine"] == pytest.approx(cosine(res.model), abs=1e-3)
    with pytest.raises(InvalidSpec, match="class scores"):
        apply_step({"method": "distill", "student_model_id": "s", "loss": "kl", "epochs": 1}, teacher, data, tmp_path,
                   models={"s": student})


def test_model_ids_need_a_resolver_and_must_exist(zoo, tmp_path):
    teachers, _, data = zoo
    with pytest.raises(InvalidSpec, match="cannot be resolved"):
        apply_step({"method": "distill", "teachers": ["original", "t1"], "epochs": 1}, teachers["t0"], data, tmp_path)
    with pytest.raises(InvalidSpec, match="no model"):
        apply_step({"method": "distill", "teachers": ["nope"], "epochs": 1}, teachers["t0"], data, tmp_path, models={})
    step = parse_spec({"steps": [{"method": "distill", "teachers": ["original", "m1"], "student_model_id": "m2"}]}).steps[0]
    assert step.model_refs == [(["teachers", 1], "m1"), (["student_model_id"], "m2")] and step.needs_data
    with pytest.raises(InvalidSpec):
        parse_spec({"steps": [{"method": "distill", "teachers": ["original", "original"]}]})
