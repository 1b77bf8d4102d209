"""Importance: what pruning removes first (the lowest scores). ``l1 | l2 | taylor | random`` here;
``bn_scale`` ranks DepGraph channel groups only, through torch-pruning
(:func:`compression.channels.group_importance`, shared with slimmable networks).

- Weights (unstructured pruning): tiny callables, Torch-Pruning style. Each takes ``{layer: weight}``
  (and optionally gradients) and returns ``{layer: score}`` of the same shapes. An already-pruned
  weight scores 0 and stays pruned; :func:`masks_for` turns scores into keep-masks.
- Attention heads and FFN neurons (transformer channel pruning): :func:`head_scores` and
  :func:`neuron_scores`, one score per head or hidden unit, from the weights of every layer the unit
  spans (Q/K/V rows and O columns; the up rows and down columns).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from compression.channels import AttentionBlock, Layer

Weights = dict[str, np.ndarray]  # weight initializer -> values (or gradients)
Scores = dict[str, np.ndarray]
Importance = Callable[[Weights, Weights | None, np.random.Generator], Scores]


def magnitude_l1(weights: Weights, grads: Weights | None, rng: np.random.Generator) -> Scores:
    return {k: np.abs(w) for k, w in weights.items()}


def magnitude_l2(weights: Weights, grads: Weights | None, rng: np.random.Generator) -> Scores:
    # Per weight, |w|² ranks like |w|; kept as its own name so reports say what the user asked for.
    return {k: np.square(w) for k, w in weights.items()}


def taylor(weights: Weights, grads: Weights | None, rng: np.random.Generator) -> Scores:
    """First-order Taylor: |w · dL/dw| (Molchanov et al.); needs accumulated gradients."""
    if grads is None:
        raise ValueError("taylor importance needs gradients from data")
    return {k: np.abs(w * grads[k]) for k, w in weights.items()}


def random_scores(weights: Weights, grads: Weights | None, rng: np.random.Generator) -> Scores:
    """The honest baseline: random scores, but pruned weights stay pruned."""
    return {k: rng.random(w.shape) * (w != 0) for k, w in weights.items()}


IMPORTANCE: dict[str, Importance] = {"l1": magnitude_l1, "l2": magnitude_l2, "taylor": taylor,
                                     "random": random_scores}


def masks_for(scores: Scores, weights: dict[str, np.ndarray], sparsity: dict[str, float] | float,
              scope: str) -> dict[str, np.ndarray]:
    """Boolean keep-masks that zero the lowest-scoring fraction (globally or per layer).

    Already-zero weights are ranked first, so sparsity only grows across iterations.
    """
    ranked = {k: np.where(weights[k] == 0, -1.0, scores[k].astype(np.float64)) for k in scores}
    if scope == "global":
        assert isinstance(sparsity, float)
        flat = np.concatenate([v.ravel() for v in ranked.values()])
        n_prune = int(round(sparsity * flat.size))
        if n_prune == 0:
            return {k: np.ones_like(v, dtype=bool) for k, v in ranked.items()}
        thresh_idx = np.argpartition(flat, n_prune - 1)[:n_prune]
        pruned = np.zeros(flat.size, dtype=bool)
        pruned[thresh_idx] = True
        out, off = {}, 0
        for k, v in ranked.items():
            out[k] = ~pruned[off:off + v.size].reshape(v.shape)
            off += v.size
        return out
    out = {}
    for k, v in ranked.items():
        s = sparsity[k] if isinstance(sparsity, dict) else sparsity
        n_prune = int(round(s * v.size))
        keep = np.ones(v.size, dtype=bool)
        if n_prune:
            keep[np.argpartition(v.ravel(), n_prune - 1)[:n_prune]] = False
        out[k] = keep.reshape(v.shape)
    return out


# ------------------------------------------------------------------------- heads and FFN neurons
def _score(tensors: list[torch.Tensor], name: str, rng: np.random.Generator) -> float:
    if name == "random":
        return float(rng.random())
    if name == "l1":
        return float(sum(t.detach().abs().sum() for t in tensors))
    if name == "l2":
        return float(sum(t.detach().pow(2).sum() for t in tensors))
    if name == "taylor":
        return float(sum((t.detach() * t.grad).abs().sum() if t.grad is not None else 0.0 for t in tensors))
    raise ValueError(f"importance {name!r} does not apply to attention heads / FFN neurons")


def _slice_of(t: torch.Tensor, idx, dim: int) -> torch.Tensor:
    """A slice of ``t`` along ``dim`` that carries the matching slice of ``t.grad`` (for Taylor scores)."""
    out = t.narrow(dim, idx.start, idx.stop - idx.start) if isinstance(idx, slice) else t.index_select(dim, torch.tensor(idx))
    if t.grad is not None:
        g = t.grad.narrow(dim, idx.start, idx.stop - idx.start) if isinstance(idx, slice) else t.grad.index_select(dim, torch.tensor(idx))
        out = out.detach().clone()
        out.grad = g.clone()
    return out


def head_scores(block: AttentionBlock, name: str, rng: np.random.Generator) -> list[float]:
    """One score per head of ``block``: its rows of Q/K/V (weights and biases) and its columns of O,
    which leave together when the head goes."""
    d = block.head_dim
    out = []
    for h in range(block.heads):
        sl = slice(h * d, (h + 1) * d)
        parts = []
        for la in (block.q, block.k, block.v):
            parts.append(_slice_of(la.module.weight, sl, 0))
            if la.module.bias is not None:
                parts.append(_slice_of(la.module.bias, sl, 0))
        parts.append(_slice_of(block.o.module.weight, sl, 1))
        out.append(_score(parts, name, rng))
    return out


def neuron_scores(up: Layer, down: Layer, name: str, rng: np.random.Generator) -> list[float]:
    """One score per hidden unit of an FFN pair: its row of ``up`` (and bias) and its column of ``down``."""
    if name == "random":
        return list(rng.random(up.channels))
    w1, w2 = up.module.weight, down.module.weight
    if name in ("l1", "l2"):
        f = (lambda t: t.abs()) if name == "l1" else (lambda t: t.pow(2))
        s = f(w1.detach()).sum(1) + f(w2.detach()).sum(0)
        if up.module.bias is not None:
            s = s + f(up.module.bias.detach())
        return s.tolist()
    if name == "taylor":
        def tay(t: torch.Tensor, dim: int) -> torch.Tensor:
            return (t.detach() * t.grad).abs().sum(dim) if t.grad is not None else torch.zeros(t.shape[1 - dim])
        s = tay(w1, 1) + tay(w2, 0)
        if up.module.bias is not None and up.module.bias.grad is not None:
            s = s + (up.module.bias.detach() * up.module.bias.grad).abs()
        return s.tolist()
    raise ValueError(f"importance {name!r} does not apply to attention heads / FFN neurons")
