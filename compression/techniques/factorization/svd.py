"""The SVD math behind ``lowrank`` and ``depthwise_separable``: pure functions of numpy arrays.

Three factorisations (the graph side is :mod:`compression.techniques.factorization.surgery`):

- **Linear / MatMul** (``W ≈ P·Q``): the ``[in, out]`` weight ``W`` is replaced by the truncated SVD
  ``P = U_K·√Σ_K`` (``[in, K]``) and ``Q = √Σ_K·V_Kᵀ`` (``[K, out]``). Parameters: ``in·out → K·(in + out)``.
- **Spatial SVD of a k×k conv** (Jaderberg et al. 2014, scheme 2, as in Tai et al. 2016): the kernel
  ``W[Cout, Cin, kh, kw]`` is read as the matrix ``M[(c, i), (o, j)] = W[o, c, i, j]`` of shape
  ``(Cin·kh) × (Cout·kw)``; its rank-K SVD gives a *vertical* ``kh×1`` conv ``Cin → K`` followed by a
  *horizontal* ``1×kw`` conv ``K → Cout``, exact at full rank ``K = min(Cin·kh, Cout·kw)``.
  Parameters: ``Cout·Cin·kh·kw → K·(Cin·kh + Cout·kw)``.
- **Depthwise-separable** (MobileNet's block, initialised from the dense kernel): for every input
  channel ``c`` the slice ``W[:, c]`` (``Cout × kh·kw``) is approximated by its best rank-1 term
  ``σ₁·u·vᵀ``; the depthwise filter of ``c`` is ``√σ₁·v`` and the pointwise column ``P[:, c] = √σ₁·u``.
  Parameters: ``Cout·Cin·k² → Cin·k² + Cout·Cin``.

Example:
    >>> p, q = low_rank(np.eye(4, dtype=np.float32), 4)
    >>> float(relative_error(np.eye(4), p @ q)) < 1e-6
    True
"""
from __future__ import annotations

import math

import numpy as np


def choose_rank(singular_values: np.ndarray, *, rank: int | None = None, rank_ratio: float | None = None,
                energy: float | None = None) -> int:
    """The rank K that one of the three criteria asks for, clipped to ``[1, len(singular_values)]``.

    Args:
        singular_values: in decreasing order (as ``np.linalg.svd`` returns them).
        rank: K itself.
        rank_ratio: K = ⌈ratio · min(M, N)⌉.
        energy: the smallest K whose singular values keep this fraction of ``Σσ²`` (the squared Frobenius
            norm), so that ``‖W − W_K‖_F / ‖W‖_F = √(1 − kept) ≤ √(1 − energy)``.

    Returns:
        The rank (exactly one criterion must be given).

    Raises:
        ValueError: none or several criteria given.

    Example:
        >>> choose_rank(np.array([3.0, 1.0, 0.0]), energy=0.9)
        1
    """
    given = [v is not None for v in (rank, rank_ratio, energy)]
    if sum(given) != 1:
        raise ValueError("give exactly one of rank, rank_ratio, energy")
    full = len(singular_values)
    if rank is not None:
        k = int(rank)
    elif rank_ratio is not None:
        k = math.ceil(rank_ratio * full - 1e-9)
    else:
        sq = np.asarray(singular_values, dtype=np.float64) ** 2
        total = float(sq.sum())
        if total <= 0:
            return 1
        kept = np.cumsum(sq) / total
        k = int(np.searchsorted(kept, float(energy) - 1e-12) + 1)
    return max(1, min(k, full))


def low_rank(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank-``k`` factors ``P [m, k]``, ``Q [k, n]`` of ``w [m, n]`` (truncated SVD, √σ on each side).

    Splitting √σ evenly keeps both factors at the same scale, which is what fine-tuning with one
    learning rate wants. Computed in float64, returned in ``w``'s dtype.
    """
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:k])
    return (u[:, :k] * root).astype(w.dtype), (root[:, None] * vt[:k]).astype(w.dtype)


def singular_values(w: np.ndarray) -> np.ndarray:
    """Singular values of ``w`` in decreasing order (float64), for choosing a rank before factoring."""
    return np.linalg.svd(w.astype(np.float64), compute_uv=False)


def relative_error(w: np.ndarray, approx: np.ndarray) -> float:
    """``‖w − approx‖_F / ‖w‖_F`` in float64 (0 for an all-zero ``w`` reproduced exactly)."""
    w64, a64 = w.astype(np.float64), approx.astype(np.float64)
    norm = float(np.linalg.norm(w64))
    diff = float(np.linalg.norm(w64 - a64))
    return diff / norm if norm > 0 else diff


def spatial_matrix(w: np.ndarray) -> np.ndarray:
    """Conv kernel ``[Cout, Cin, kh, kw]`` as the ``(Cin·kh) × (Cout·kw)`` matrix of the spatial SVD."""
    cout, cin, kh, kw = w.shape
    return w.transpose(1, 2, 0, 3).reshape(cin * kh, cout * kw)


def spatial_factors(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank-``k`` spatial SVD of a conv kernel ``[Cout, Cin, kh, kw]``.

    Returns:
        ``(vertical [k, Cin, kh, 1], horizontal [Cout, k, 1, kw])``: a kh×1 conv to ``k`` channels, then a
        1×kw conv to ``Cout``; :func:`spatial_product` multiplies them back.
    """
    cout, cin, kh, kw = w.shape
    p, q = low_rank(spatial_matrix(w), k)  # [(c, i), k], [k, (o, j)]
    vertical = p.reshape(cin, kh, k).transpose(2, 0, 1)[..., None]
    horizontal = q.reshape(k, cout, kw).transpose(1, 0, 2)[:, :, None, :]
    return np.ascontiguousarray(vertical), np.ascontiguousarray(horizontal)


def spatial_product(vertical: np.ndarray, horizontal: np.ndarray) -> np.ndarray:
    """The ``[Cout, Cin, kh, kw]`` kernel a vertical/horizontal conv pair computes."""
    return np.einsum("okj,kci->ocij", horizontal[:, :, 0, :].astype(np.float64),
                     vertical[..., 0].astype(np.float64))


def rank1_depthwise(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-input-channel rank-1 split of a conv kernel ``[Cout, Cin, kh, kw]`` (MobileNet init).

    Returns:
        ``(depthwise [Cin, 1, kh, kw], pointwise [Cout, Cin, 1, 1])`` with
        ``depthwise[c] = √σ₁·v`` and ``pointwise[:, c] = √σ₁·u`` for ``W[:, c] ≈ σ₁·u·vᵀ``.
    """
    cout, cin, kh, kw = w.shape
    slices = w.astype(np.float64).transpose(1, 0, 2, 3).reshape(cin, cout, kh * kw)  # [c, o, ij]
    u, s, vt = np.linalg.svd(slices, full_matrices=False)  # batched over input channels
    root = np.sqrt(s[:, 0])
    depthwise = (root[:, None] * vt[:, 0, :]).reshape(cin, 1, kh, kw)
    pointwise = (u[:, :, 0] * root[:, None]).T.reshape(cout, cin, 1, 1)
    return depthwise.astype(w.dtype), np.ascontiguousarray(pointwise.astype(w.dtype))


def depthwise_product(depthwise: np.ndarray, pointwise: np.ndarray) -> np.ndarray:
    """The ``[Cout, Cin, kh, kw]`` kernel a depthwise + pointwise pair computes."""
    return pointwise[:, :, 0, 0, None, None].astype(np.float64) * depthwise[None, :, 0].astype(np.float64)
