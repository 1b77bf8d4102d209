"""Training of the exit heads: Adam on the sum of the per-exit losses, backbone frozen or trained along.

Each exit learns from cross-entropy on labels and/or distillation (the original's outputs or the model's own
final head); when the backbone trains too, the final head keeps learning from labels and the original.
"""
from __future__ import annotations

from typing import Literal, Protocol

import numpy as np
import torch

from compression.context import StepContext
from compression.data import Arrays
from compression.training import LossConfig, loss_fn


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


def _tensors(batch: Arrays, names: list[str], device: str) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(batch.inputs[n])).to(device) for n in names]


def train_exits(module: torch.nn.Module, names: list[str], arrays: Arrays, spec: ExitTraining,
                teacher: np.ndarray | None, head_keys: set[str], ctx: StepContext) -> tuple[list[float], list[str]]:
    """Adam on the sum of per-exit losses (plus the final head's when the backbone trains)."""
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
    rng = np.random.default_rng(ctx.seed)
    opt = torch.optim.Adam(params, lr=spec.lr)
    module.to(ctx.device)
    # Frozen: eval mode throughout, so BatchNorm statistics and dropout of the backbone do not move either.
    module.train(not spec.freeze_backbone)
    history = []
    for epoch in range(spec.epochs):
        order = rng.permutation(arrays.samples)
        total, count = 0.0, 0
        for s in range(0, len(order), spec.batch_size):
            idx = order[s:s + spec.batch_size]
            batch = arrays.take(idx)
            final, *exits = module(*_tensors(batch, names, ctx.device))
            labels = torch.from_numpy(batch.labels).to(ctx.device) if has_labels else None
            target = (torch.from_numpy(teacher[idx]).to(ctx.device) if spec.teacher == "original"
                      else final.detach()) if distill else None
            loss = sum(loss_fn(e, labels, target, cfg) for e in exits)
            if train_final:
                loss = loss + loss_fn(final, labels, target if spec.teacher == "original" else None, final_cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        history.append(total / max(count, 1))
        ctx.progress("finetuning", 0.8 * (epoch + 1) / spec.epochs,
                     f"exits epoch {epoch + 1}/{spec.epochs}: loss {history[-1]:.4f}")
    module.eval()
    for p in module.parameters():
        p.requires_grad_(True)
    return history, notes
