"""1-D k-means for weight sharing (Deep Compression §3), with exact zeros kept as their own centroid."""
from __future__ import annotations

import numpy as np


def _lloyd(sorted_vals: np.ndarray, centroids: np.ndarray, iters: int) -> np.ndarray:
    """Lloyd iterations on sorted 1-D data; clusters that empty are dropped."""
    for _ in range(iters):
        centroids = np.unique(centroids)
        bounds = (centroids[1:] + centroids[:-1]) / 2
        assign = np.searchsorted(bounds, sorted_vals)
        counts = np.bincount(assign, minlength=len(centroids))
        sums = np.bincount(assign, weights=sorted_vals, minlength=len(centroids))
        new = (sums / np.maximum(counts, 1))[counts > 0]
        if new.shape == centroids.shape and np.allclose(new, centroids, rtol=0, atol=1e-12):
            return new
        centroids = new
    return np.unique(centroids)


def _assign(vals: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return np.searchsorted((centroids[1:] + centroids[:-1]) / 2, vals)


def kmeans_1d(values: np.ndarray, k: int, *, keep_zero: bool = True, iters: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Cluster ``values`` into at most ``k`` centroids; returns ``(codebook, codes)``.

    Centroids start linearly spaced between the min and max (the paper's best initialisation: it keeps
    the rare large weights represented). Clusters that empty — after magnitude pruning no weight is near
    zero, so the middle of a linear grid starves — are re-seeded at the worst-represented weight, so the
    codebook uses its ``k`` entries. With ``keep_zero`` and exact zeros present, centroid 0 is the value
    0.0, zeros map to it and nothing else does: pruned weights stay pruned and the layer's sparsity is
    unchanged; the other ``k - 1`` centroids share the nonzero weights.

    Example:
        >>> cb, codes = kmeans_1d(np.array([0.0, 0.0, 1.0, 1.1, -2.0]), 3)
        >>> cb[codes].round(2).tolist()
        [0.0, 0.0, 1.05, 1.05, -2.0]
    """
    flat = np.asarray(values, np.float64).ravel()
    zero = flat == 0
    has_zero = bool(keep_zero and zero.any())
    nz = flat[~zero] if has_zero else flat
    k_free = k - 1 if has_zero else k
    codes = np.zeros(flat.size, np.int64)
    centroids = np.zeros(0)
    if nz.size and k_free >= 1:
        sorted_nz = np.sort(nz, kind="stable")
        distinct = len(np.unique(sorted_nz))
        lo, hi = float(sorted_nz[0]), float(sorted_nz[-1])
        start = np.linspace(lo, hi, k_free) if k_free > 1 else np.array([nz.mean()])
        centroids = _lloyd(sorted_nz, start, iters)
        for _ in range(2 * k_free):
            if len(centroids) >= min(k_free, distinct):
                break
            err = np.abs(sorted_nz - centroids[_assign(sorted_nz, centroids)])
            centroids = _lloyd(sorted_nz, np.append(centroids, sorted_nz[int(err.argmax())]), iters)
        assign_nz = _assign(nz, centroids)
        used = np.unique(assign_nz)
        centroids = centroids[used]
        remap = np.full(len(used) and int(used.max()) + 1, -1)
        remap[used] = np.arange(len(used))
        codes[~zero if has_zero else slice(None)] = remap[assign_nz] + (1 if has_zero else 0)
    codebook = np.concatenate([[0.0], centroids]) if has_zero else centroids
    return codebook.astype(np.float32), codes.reshape(np.shape(values))
