"""Importance scores for unstructured (weight) pruning: tiny callables, Torch-Pruning style.

Each takes ``{layer: weight}`` (and optionally gradients) and returns ``{layer: score}`` of the same
shapes; the lowest scores are pruned first. An already-pruned weight scores 0 and stays pruned.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

Scores = dict[str, np.ndarray]
Importance = Callable[[dict[str, np.ndarray], dict[str, np.ndarray] | None, np.random.Generator], Scores]


def magnitude_l1(weights, grads, rng) -> Scores:  # noqa: ANN001
    return {k: np.abs(w) for k, w in weights.items()}


def magnitude_l2(weights, grads, rng) -> Scores:  # noqa: ANN001
    # Per weight, |w|² ranks like |w|; kept as its own name so reports say what the user asked for.
    return {k: np.square(w) for k, w in weights.items()}


def taylor(weights, grads, rng) -> Scores:  # noqa: ANN001
    """First-order Taylor: |w · dL/dw| (Molchanov et al.); needs accumulated gradients."""
    if grads is None:
        raise ValueError("taylor importance needs gradients from data")
    return {k: np.abs(w * grads[k]) for k, w in weights.items()}


def random_scores(weights, grads, rng) -> Scores:  # noqa: ANN001
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
