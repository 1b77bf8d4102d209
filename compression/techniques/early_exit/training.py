"""Training of the exit heads: the sum of the per-exit losses in the shared loop, backbone frozen or trained along.

Each exit learns from cross-entropy on labels and/or distillation (the original's outputs or the model's own
final head); when the backbone trains too, the final head keeps learning from labels and the original.
"""
from __future__ import annotations

from typing import Literal, Protocol

import numpy as np
import torch

from compression.context import StepContext
from compression.data import Arrays
from compression.training import LossConfig, Recipe, TrainLog, carve_indices, carve_validation, loss_fn, run_epochs


class ExitTraining(Protocol):
    """The settings :func:`train_exits` reads (``EarlyExitSpec`` has them all)."""

    freeze_backbone: bool
    epochs: int
    lr: float
    batch_size: int
    distill: bool
    teacher: Literal["original", "final"]
    temperature: float
    alpha: float
    validation: float  # and the rest of compression.spec.RecoveryOptions (Recipe.of reads them)


def _tensors(batch: Arrays, names: list[str], device: str) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(batch.inputs[n])).to(device) for n in names]


def train_exits(module: torch.nn.Module, names: list[str], arrays: Arrays, spec: ExitTraining,
                teacher: np.ndarray | None, head_keys: set[str], ctx: StepContext) -> tuple[TrainLog, list[str]]:
    """The sum of per-exit losses (plus the final head's when the backbone trains), through the shared loop
    (:func:`compression.training.run_epochs`: schedule, validation slice, best epoch, time budget). An
    epoch's validation score is the exits' mean accuracy with labels, else their summed loss."""
    notes: list[str] = []
    has_labels = arrays.labels is not None
    distill = spec.distill or not has_labels
    if not has_labels:
        notes.append("dataset has no labels: the exits learned by distillation only")
    cfg = LossConfig(use_labels=has_labels, distill=distill, temperature=spec.temperature, alpha=spec.alpha)
    # The final head learns from labels and the original only: distilling it from itself teaches nothing.
    final_cfg = LossConfig(use_labels=has_labels, distill=distill and spec.teacher == "original",
                           temperature=spec.temperature, alpha=spec.alpha)
    train_final = not spec.freeze_backbone and (final_cfg.use_labels or final_cfg.distill)
    for key, p in module.named_parameters():
        p.requires_grad_(key in head_keys or not spec.freeze_backbone)
    params = [p for p in module.parameters() if p.requires_grad]
    torch.manual_seed(ctx.seed)
    train_split, val = carve_validation(arrays, spec.validation, ctx.seed)
    val_teacher = None
    if val is not None and teacher is not None:
        _, val_idx = carve_indices(arrays.samples, spec.validation, ctx.seed)
        val_teacher = teacher[val_idx]
        teacher = teacher[carve_indices(arrays.samples, spec.validation, ctx.seed)[0]]
    recipe = Recipe.of(spec, epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size, augment=None)
    module.to(ctx.device)

    def losses(batch: Arrays, t: np.ndarray | None) -> torch.Tensor:
        final, *exits = module(*_tensors(batch, names, ctx.device))
        labels = torch.from_numpy(batch.labels).to(ctx.device) if has_labels else None
        target = (torch.from_numpy(t).to(ctx.device) if spec.teacher == "original" else final.detach()) \
            if distill else None
        loss = sum(loss_fn(e, labels, target, cfg) for e in exits)
        if train_final:
            loss = loss + loss_fn(final, labels, target if spec.teacher == "original" else None, final_cfg)
        return loss

    def batch_loss(batch: Arrays, idx: np.ndarray, mix: object, first: bool) -> torch.Tensor:
        return losses(batch, teacher[idx] if teacher is not None else None)

    def validate(log: TrainLog) -> tuple[float, float]:
        module.eval()
        with torch.no_grad():
            value = float(losses(val, val_teacher))
            if has_labels:
                _, *exits = module(*_tensors(val, names, ctx.device))
                labels = torch.from_numpy(val.labels).to(ctx.device)
                acc = float(np.mean([float((e.argmax(1) == labels).float().mean()) for e in exits]))
                log.metric = "accuracy"
                log.validation.append(acc)
                return acc, -value
        log.metric = "loss"
        log.validation.append(value)
        return -value, 0.0

    def on_epoch(epoch: int, loss: float) -> None:
        ctx.progress("finetuning", 0.8 * (epoch + 1) / spec.epochs, f"exits epoch {epoch + 1}/{spec.epochs}: loss {loss:.4f}")

    # Frozen: eval mode throughout, so BatchNorm statistics and dropout of the backbone do not move either.
    history = run_epochs(module, train_split, recipe, seed=ctx.seed, batch_loss=batch_loss,
                         validate=validate if val is not None else None, params=params, on_epoch=on_epoch,
                         train_mode=not spec.freeze_backbone)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(True)
    return history, notes
