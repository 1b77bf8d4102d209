"""Fine-tuning a converted module: cross-entropy on labels and/or distillation from a teacher.

The loss is the lecture's: ``alpha * CE(s, y) + (1 - alpha) * KL(softmax(t/T) || softmax(s/T)) * T²``
for class scores; outputs that are not class scores (embeddings, regressions) use MSE (or cosine) to the
teacher. Several teachers are one target: :func:`ensemble_targets`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from compression.data import Arrays
from compression.metrics import run_batched, session


@dataclass
class LossConfig:
    use_labels: bool
    distill: bool
    temperature: float
    alpha: float
    # Distillation term: "auto" = KL·T² for class scores, MSE otherwise; "kl", "mse" or "cosine" to force one.
    kd_loss: str = "auto"


def teacher_outputs(teacher, arrays: Arrays, threads: int = 0) -> np.ndarray:  # teacher: onnx.ModelProto
    """The teacher's first output on every sample, computed once in ONNX Runtime (fast, no grads)."""
    return run_batched(session(teacher, threads), arrays.inputs)[0]


def is_class_scores(out: torch.Tensor) -> bool:
    return out.dim() == 2 and out.shape[1] > 1


def loss_fn(student: torch.Tensor, labels: torch.Tensor | None, teacher: torch.Tensor | None,
            cfg: LossConfig) -> torch.Tensor:
    """CE and/or KD (KL·T² for class scores, MSE otherwise)."""
    terms: list[tuple[float, torch.Tensor]] = []
    classes = is_class_scores(student)
    if cfg.use_labels and labels is not None and classes:
        terms.append((cfg.alpha if cfg.distill else 1.0, F.cross_entropy(student, labels)))
    if cfg.distill and teacher is not None:
        kind = cfg.kd_loss if cfg.kd_loss != "auto" else ("kl" if classes else "mse")
        if kind == "kl":
            if not classes:
                raise ValueError("KL distillation needs class scores [N, C]; use mse or cosine for this output")
            t = cfg.temperature
            kd = F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t
        elif kind == "mse":
            kd = F.mse_loss(student, teacher)
        elif kind == "cosine":
            kd = (1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)).mean()
        else:
            raise ValueError(f"unknown distillation loss {kind!r}")
        terms.append((1.0 - cfg.alpha if terms else 1.0, kd))
    if not terms:
        raise ValueError("nothing to train on: no labels and no teacher")
    return sum(w * l for w, l in terms)


def ensemble_targets(outputs: list[np.ndarray], temperature: float, class_scores: bool) -> np.ndarray:
    """One teacher target from several teachers' outputs.

    Class scores: the average of the softened distributions, returned as logits ``T·log(mean_i
    softmax(t_i/T))`` so that ``softmax(target/T)`` is exactly that average and :func:`loss_fn` needs no
    special case. Other outputs: the mean output. One teacher is returned unchanged.

    Example:
        >>> ensemble_targets([np.zeros((1, 3), np.float32)], 4.0, True).shape
        (1, 3)
    """
    if len(outputs) == 1:
        return outputs[0]
    if not class_scores:
        return np.mean(np.stack(outputs), axis=0).astype(outputs[0].dtype)
    probs = [torch.softmax(torch.from_numpy(o).double() / temperature, 1) for o in outputs]
    mean = torch.stack(probs).mean(0).clamp_min(1e-30)
    return (temperature * mean.log()).float().numpy()


def predict(module: torch.nn.Module, input_names: list[str], arrays: Arrays, batch_size: int = 256,
            device: str = "cpu") -> np.ndarray:
    """The module's first output on every sample (eval mode, no grad)."""
    module.to(device).eval()
    outs = []
    with torch.no_grad():
        for s in range(0, arrays.samples, batch_size):
            batch = arrays.take(np.arange(s, min(s + batch_size, arrays.samples)))
            out = module(*_to_tensors(batch, input_names, device))
            outs.append((out[0] if isinstance(out, (tuple, list)) else out).cpu().numpy())
    return np.concatenate(outs)


def accumulate_grads(module: torch.nn.Module, input_names: list[str], arrays: Arrays, cfg: LossConfig,
                     teacher: np.ndarray | None, batch_size: int, batches: int = 8, device: str = "cpu") -> None:
    """Leave in every parameter's ``.grad`` the training-loss gradient summed over a few batches
    (for Taylor importance). Runs in eval mode: BatchNorm statistics are not touched by scoring."""
    module.to(device).eval()
    module.zero_grad(set_to_none=True)
    n = min(arrays.samples, batches * batch_size)
    for s in range(0, n, batch_size):
        idx = np.arange(s, min(s + batch_size, n))
        b = arrays.take(idx)
        out = module(*_to_tensors(b, input_names, device))
        out = out[0] if isinstance(out, (tuple, list)) else out
        labels = torch.from_numpy(b.labels).to(device) if b.labels is not None else None
        t = torch.from_numpy(teacher[idx]).to(device) if teacher is not None else None
        loss_fn(out, labels, t, cfg).backward()
    module.eval()


def _to_tensors(batch: Arrays, names: list[str], device: str) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(batch.inputs[n])).to(device) for n in names]


def train(
    module: torch.nn.Module,
    input_names: list[str],
    arrays: Arrays,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    loss: LossConfig,
    teacher: np.ndarray | None,
    seed: int,
    device: str = "cpu",
    after_step: Callable[[], None] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``module`` in place; returns the mean loss per epoch.

    Args:
        after_step: called after every optimizer step (pruning masks re-applied here).
        on_epoch: ``(epoch, mean_loss)`` after each epoch; may raise ``Cancelled``.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    module.to(device).train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    idx_all = np.arange(arrays.samples)
    history = []
    for epoch in range(epochs):
        order = rng.permutation(idx_all)
        total, count = 0.0, 0
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = arrays.take(idx)
            out = module(*_to_tensors(batch, input_names, device))
            out = out[0] if isinstance(out, (tuple, list)) else out
            labels = torch.from_numpy(batch.labels).to(device) if batch.labels is not None else None
            t_out = torch.from_numpy(teacher[idx]).to(device) if teacher is not None else None
            l = loss_fn(out, labels, t_out, loss)
            opt.zero_grad(set_to_none=True)
            l.backward()
            opt.step()
            if after_step is not None:
                after_step()
            total += float(l.detach()) * len(idx)
            count += len(idx)
        history.append(total / max(count, 1))
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    module.eval()
    return history


def loss_config(finetune: Any, has_labels: bool) -> tuple[LossConfig, list[str]]:
    """Resolve the fine-tune spec against the data: unlabelled data forces distillation (noted)."""
    notes = []
    distill = bool(finetune.distill)
    if not has_labels and not distill:
        distill = True
        notes.append("dataset has no labels: fine-tuned by distillation from the original")
    return LossConfig(use_labels=has_labels, distill=distill, temperature=finetune.temperature,
                      alpha=finetune.alpha), notes
