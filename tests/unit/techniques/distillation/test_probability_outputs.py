"""Models that end in a Softmax: distillation and label loss must see log-probabilities, not probabilities
treated as logits (softmax(p/T) of p in [0, 1] is nearly uniform: the old behaviour)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from compression.converter import to_torch
from compression.data import Arrays, DataSplit
from compression.training import (LossConfig, log_prob_outputs, loss_fn, output_kind, teacher_outputs,
                                  teacher_targets, train)
from testkit.helpers import apply_step, run_ort
from testkit.refdata import fit
from testkit.zoo import export_onnx


class _WithHead(nn.Module):
    """``net`` followed by the head the graph is exported with (softmax, log_softmax, sigmoid or none)."""

    def __init__(self, net: nn.Module, head: str) -> None:
        super().__init__()
        self.net, self.head = net, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        return {"softmax": lambda: torch.softmax(z, -1), "log_softmax": lambda: torch.log_softmax(z, -1),
                "sigmoid": lambda: torch.sigmoid(z), "logits": lambda: z}[self.head]()


def _mlp(hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _export(net: nn.Module, head: str, path) -> onnx.ModelProto:
    return onnx.load(str(export_onnx(_WithHead(net, head).eval(), torch.zeros(2, 64), path, dynamo=False)))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A digits classifier exported WITH its softmax (≈95% held out), an untrained 16-unit student exported
    the same way, and a 1,200 / 597 split."""
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(X))
    X, y = X[order], y[order]
    d = tmp_path_factory.mktemp("probs")
    teacher = _export(fit(_mlp(64, 0), X[:1200], y[:1200], epochs=30, lr=3e-3), "softmax", d / "teacher.onnx")
    student = _export(_mlp(16, 1), "softmax", d / "student.onnx")
    data = DataSplit(Arrays({"input": X[:1200]}, y[:1200]), Arrays({"input": X[1200:]}, y[1200:]))
    return teacher, student, data


@pytest.mark.parametrize("head, kind", [("softmax", "probs"), ("log_softmax", "log_probs"), ("sigmoid", "sigmoid"),
                                        ("logits", "logits")])
def test_output_kind_reads_the_final_activation(head, kind, tmp_path):
    model = _export(_mlp(8, 0), head, tmp_path / "m.onnx")
    assert output_kind(model) == kind
    module = to_torch(model)
    x = torch.rand(3, 64)
    with torch.no_grad(), log_prob_outputs(module) as seen:
        inside = module(x)
    assert seen == kind
    with torch.no_grad():
        outside = module(x)
    np.testing.assert_allclose(outside.numpy(), run_ort(model, x.numpy()), atol=1e-6)  # restored
    expected = np.log(outside.numpy()) if kind == "probs" else outside.numpy()
    np.testing.assert_allclose(inside.numpy(), expected, atol=1e-5)


def test_probabilities_as_logits_give_a_much_weaker_gradient(digits):
    """The same student, batch and teacher: the old loss (softmax of probabilities) against the new one
    (log-probabilities), for the distillation term and for CE on labels."""
    teacher, student, data = digits
    batch = data.train.take(np.arange(256))
    x, y = torch.from_numpy(batch.inputs["input"]), torch.from_numpy(batch.labels)
    probs = torch.from_numpy(teacher_outputs(teacher, batch))
    log_probs = torch.from_numpy(teacher_targets(teacher, batch))

    def grad_norm(labels: bool, new: bool) -> float:
        module = to_torch(student)
        cfg = LossConfig(use_labels=labels, distill=not labels, temperature=4.0, alpha=0.5,
                         output="probs" if new else "logits")
        with log_prob_outputs(module) if new else _nothing():
            loss_fn(module(x), y if labels else None, None if labels else (log_probs if new else probs), cfg).backward()
        return float(torch.cat([p.grad.reshape(-1) for p in module.parameters()]).norm())

    kd_old, kd_new = grad_norm(False, False), grad_norm(False, True)
    ce_old, ce_new = grad_norm(True, False), grad_norm(True, True)
    print(f"grad norm  KD: old {kd_old:.3g} new {kd_new:.3g} ({kd_new / kd_old:.0f}x)   "
          f"CE: old {ce_old:.3g} new {ce_new:.3g} ({ce_new / ce_old:.1f}x)")
    assert kd_new > 20 * kd_old
    assert ce_new > 3 * ce_old


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class _AsPlainModule(nn.Module):
    """The converted student behind a plain module: :func:`train` does not rewrite its Softmax, which is
    the old behaviour (its probabilities reach the loss as if they were logits)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.inner = module

    def forward(self, *xs):
        return self.inner(*xs)


def test_distilling_a_softmax_student_beats_the_old_behaviour(digits, tmp_path):
    teacher, student, data = digits
    # Like for like with the old loop below: constant rate, every training sample, the last epoch.
    spec = {"method": "distill", "student_model_id": "s", "epochs": 6, "lr": 1e-2, "temperature": 4, "alpha": 0.5,
            "schedule": "constant", "validation": 0}
    res = apply_step(spec, teacher, data, tmp_path, models={"s": student})
    r = res.report
    assert r["output"] == "probs" and r["loss"] == "kl" and r["labels_used"]
    assert r["loss_per_epoch"][-1] < 0.5 * r["loss_per_epoch"][0]
    new_acc = float((run_ort(res.model, data.holdout.inputs["input"]).argmax(1) == data.holdout.labels).mean())
    assert new_acc == pytest.approx(r["student_holdout_accuracy_after"], abs=1e-6)

    old = _AsPlainModule(to_torch(student))
    cfg = LossConfig(use_labels=True, distill=True, temperature=4.0, alpha=0.5)
    old_losses = train(old, ["input"], data.train, epochs=6, lr=1e-2, batch_size=64, loss=cfg,
                       teacher=teacher_outputs(teacher, data.train), seed=0)
    with torch.no_grad():
        out = old(torch.from_numpy(data.holdout.inputs["input"])).numpy()
    old_acc = float((out.argmax(1) == data.holdout.labels).mean())
    teacher_acc = r["teachers"][0]["holdout_accuracy"]
    print(f"teacher {teacher_acc:.3f}  student before {r['student_holdout_accuracy_before']:.3f}  "
          f"old {old_acc:.3f} (loss {old_losses[0]:.3f}→{old_losses[-1]:.3f})  "
          f"new {new_acc:.3f} (loss {r['loss_per_epoch'][0]:.3f}→{r['loss_per_epoch'][-1]:.3f})")
    assert new_acc >= old_acc + 0.05 and new_acc > 0.9
