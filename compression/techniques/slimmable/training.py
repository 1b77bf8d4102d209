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
from compression.training import LossConfig, loss_fn


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


def train_slimmable(net: SlimmableNet, input_names: list[str], arrays: Arrays, *, epochs: int, lr: float,
                    batch_size: int, loss: LossConfig, teacher: np.ndarray | None, rule: str, random_widths: int,
                    inplace_distill: bool, seed: int, device: str = "cpu",
                    on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Train the shared weights and every width's BatchNorm; returns the mean summed loss per epoch.

    Each step accumulates the gradients of the widths :func:`step_widths` picks and takes one Adam
    step. The widest learns from ``loss`` (labels and/or the original's outputs); with
    ``inplace_distill`` the others learn the widest's detached outputs of the same batch (KL at T = 1
    for class scores, MSE otherwise), weighted ``1 - loss.alpha`` against CE on the labels when there
    are labels; without ``inplace_distill`` they learn from ``loss`` too.

    Args:
        teacher: the original model's outputs on ``arrays`` (when ``loss.distill``).
        on_epoch: ``(epoch, mean_loss)`` after each epoch; may raise ``Cancelled``.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net.to(device).train()
    params = list({id(p): p for p in net.parameters() if p.requires_grad}.values())
    opt = torch.optim.Adam(params, lr=lr)
    # In-place distillation at T = 1 (US-Nets), mixed with the labels when there are any: on the short
    # fine-tunes this service runs, the widest is still moving and labels keep the narrow widths anchored.
    kd = LossConfig(use_labels=loss.use_labels, distill=True, temperature=1.0, alpha=loss.alpha)
    widest = net.widths[-1]
    history = []
    for epoch in range(epochs):
        order = rng.permutation(arrays.samples)
        total, count = 0.0, 0
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            if len(idx) < 2 and net.norms_of(widest):
                continue  # BatchNorm cannot train on one sample
            batch = arrays.take(idx)
            xs = _tensors(batch, input_names, device)
            labels = torch.from_numpy(batch.labels).to(device) if batch.labels is not None else None
            t_out = torch.from_numpy(teacher[idx]).to(device) if teacher is not None else None
            opt.zero_grad(set_to_none=True)
            soft = None
            step_loss = 0.0
            for w in step_widths(net.widths, rule, random_widths, rng):
                net.select(w)
                out = first_output(net(*xs))
                if w == widest or not inplace_distill:
                    l = loss_fn(out, labels, t_out, loss)
                    if w == widest:
                        soft = out.detach()
                else:
                    l = loss_fn(out, labels, soft, kd)
                l.backward()
                step_loss += float(l.detach())
            opt.step()
            total += step_loss * len(idx)
            count += len(idx)
        history.append(total / max(count, 1))
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    net.select(widest)
    net.eval()
    return history


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
