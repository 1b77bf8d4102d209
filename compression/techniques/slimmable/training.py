"""Training a slimmable network: the widths of each step, the loop, and BatchNorm calibration.

Slimmable Networks (Yu et al. 2018) sum every width's loss each step (``rule: sum``); Universally
Slimmable Networks (Yu & Huang 2019) train the widest, the narrowest and a few random widths each step
(the sandwich rule) with in-place distillation from the widest, then re-estimate each width's BatchNorm
statistics with the final weights. One Adam optimizer holds the shared weights and every width's
BatchNorm, so each step's gradients are summed over its widths before the one update.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from compression.channels import first_output
from compression.data import Arrays
from compression.techniques.slimmable.network import SlimmableNet
from compression.augment import Mix
from compression.training import (BatchTargets, LossConfig, Recipe, Teacher, TrainLog, Validation, loss_fn,
                                  mixed_labels, run_epochs, validate_module)


def step_widths(widths: list[float], rule: str, random_widths: int, rng: np.random.Generator) -> list[float]:
    """The widths one optimizer step trains, widest first.

    ``sum``: all of them (Slimmable Networks). ``sandwich``: the widest, the narrowest and
    ``random_widths`` others drawn without replacement (US-Nets, over a discrete set of widths).

    Example:
        >>> step_widths([0.25, 0.5, 0.75, 1.0], "sandwich", 1, np.random.default_rng(0))
        [1.0, 0.25, 0.75]
    """
    ordered = sorted(widths, reverse=True)
    if rule == "sum" or len(ordered) <= 2:
        return ordered
    middle = ordered[1:-1]
    n = min(random_widths, len(middle))
    picked = [middle[i] for i in sorted(rng.choice(len(middle), size=n, replace=False))] if n else []
    return [ordered[0], ordered[-1], *picked]


def _tensors(batch: Arrays, names: list[str], device: str) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(batch.inputs[n])).to(device) for n in names]


def train_slimmable(net: SlimmableNet, input_names: list[str], arrays: Arrays, *, recipe: Recipe, loss: LossConfig,
                    teacher: np.ndarray | Teacher | None, rule: str, random_widths: int, inplace_distill: bool,
                    seed: int, device: str = "cpu", validation: Validation | None = None,
                    on_epoch: Callable[[int, float], None] | None = None) -> TrainLog:
    """Train the shared weights and every width's BatchNorm; returns the mean summed loss per epoch.

    Each step accumulates the gradients of the widths :func:`step_widths` picks and takes one optimizer
    step (the shared loop, :func:`compression.training.run_epochs`: schedule, validation, best epoch).
    The widest learns from ``loss`` (labels and/or the original's outputs); with ``inplace_distill`` the
    others learn the widest's detached outputs of the same batch (KL at T = 1 for class scores, MSE
    otherwise), weighted ``1 - loss.alpha`` against CE on the labels when there are labels; without
    ``inplace_distill`` they learn from ``loss`` too. An epoch's validation score is the mean over the
    widths, so the epoch kept is the best for the family, not for the widest alone.

    Args:
        teacher: the original's outputs on ``arrays`` or the original itself (when ``loss.distill``).
        on_epoch: ``(epoch, mean_loss)`` after each epoch; may raise ``Cancelled``.
    """
    torch.manual_seed(seed)
    net.to(device).train()
    # In-place distillation at T = 1 (US-Nets), mixed with the labels when there are any: on the short
    # fine-tunes this service runs, the widest is still moving and labels keep the narrow widths anchored.
    kd = LossConfig(use_labels=loss.use_labels, distill=True, temperature=1.0, alpha=loss.alpha)
    widest = net.widths[-1]
    targets = BatchTargets(teacher, arrays, augmenting=recipe.augment is not None)
    width_rng = np.random.default_rng(seed + 1)

    def batch_loss(batch: Arrays, idx: np.ndarray, mix: Mix | None, first: bool) -> torch.Tensor | None:
        if len(idx) < 2 and net.norms_of(widest):
            return None  # BatchNorm cannot train on one sample
        xs = _tensors(batch, input_names, device)
        labels = torch.from_numpy(batch.labels).to(device) if batch.labels is not None else None
        t = targets(batch, idx, mix)
        t_out = torch.from_numpy(t).to(device) if t is not None else None
        mixed = mixed_labels(labels, mix)
        soft = None
        step_loss = 0.0
        for w in step_widths(net.widths, rule, random_widths, width_rng):
            net.select(w)
            out = first_output(net(*xs))
            if w == widest or not inplace_distill:
                l = loss_fn(out, labels, t_out, loss, mixed=mixed)
                if w == widest:
                    soft = out.detach()
            else:
                l = loss_fn(out, labels, soft, kd, mixed=mixed)
            l.backward()  # each width's graph freed before the next: one step, summed gradients
            step_loss += float(l.detach())
        net.select(widest)
        return torch.tensor(step_loss)

    def validate(log: TrainLog) -> tuple[float, float]:
        scores = []
        for w in net.widths:
            net.select(w)
            scratch = TrainLog()
            scores.append(validate_module(net, input_names, validation, loss, device, scratch))
            log.metric = scratch.metric
        net.select(widest)
        mean = tuple(float(np.mean([sc[i] for sc in scores])) for i in range(2))
        log.validation.append(mean[0] if log.metric == "accuracy" else -mean[0])
        return mean

    params = list({id(p): p for p in net.parameters() if p.requires_grad}.values())
    log = run_epochs(net, arrays, recipe, seed=seed, batch_loss=batch_loss,
                     validate=validate if validation is not None else None, params=params, on_epoch=on_epoch)
    net.select(widest)
    net.eval()
    return log


def calibrate_bn(net: SlimmableNet, input_names: list[str], arrays: Arrays, *, samples: int, batch_size: int,
                 seed: int, device: str = "cpu") -> int:
    """Re-estimate every width's BatchNorm statistics with the final weights (US-Nets' BN calibration).

    Running averages gathered while the weights moved lag behind them; an exact average over
    ``samples`` training samples (momentum None: a cumulative mean) at each width is cheap and fixes
    that. Returns the number of samples used (0 when the model has no BatchNorm).
    """
    n = min(samples, arrays.samples)
    if n < 2 or not net.norms_of(net.widths[-1]):
        return 0
    idx_all = np.sort(np.random.default_rng(seed).permutation(arrays.samples)[:n])
    net.to(device).eval()
    with torch.no_grad():
        for w in net.widths:
            net.select(w)
            bns = net.norms_of(w)
            momenta = [bn.momentum for bn in bns]
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None
                bn.train()
            for s in range(0, n, batch_size):
                idx = idx_all[s:s + batch_size]
                if len(idx) < 2:
                    continue
                net(*_tensors(arrays.take(idx), input_names, device))
            for bn, m in zip(bns, momenta, strict=True):
                bn.momentum = m
                bn.eval()
    net.select(net.widths[-1])
    return n
