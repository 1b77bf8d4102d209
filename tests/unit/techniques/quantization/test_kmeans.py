"""1-D k-means for weight sharing: exact zeros keep their own centroid, fewer values than clusters."""
from __future__ import annotations

import numpy as np

from compression.techniques.quantization.kmeans import kmeans_1d


def test_kmeans_keeps_zeros_as_their_own_centroid():
    rng = np.random.default_rng(0)
    w = rng.normal(size=5000).astype(np.float32)
    w[rng.random(5000) < 0.7] = 0.0
    cb, codes = kmeans_1d(w, 8)
    assert len(cb) <= 8 and cb[0] == 0.0
    np.testing.assert_array_equal(codes == 0, w == 0)  # zeros stay zeros, nothing else becomes zero
    nz = w != 0
    mse = float(((cb[codes] - w)[nz] ** 2).mean())
    assert mse < 0.06 * float(w[nz].var())  # Lloyd-Max with 7 levels on a Gaussian: ≈ 0.044·σ²
    cb_all, _ = kmeans_1d(w, 8, keep_zero=False)
    assert len(cb_all) == 8 and 0.0 not in cb_all.tolist()


def test_kmeans_fewer_values_than_clusters():
    cb, codes = kmeans_1d(np.array([1.0, 1.0, 2.0], np.float32), 16)
    assert sorted(cb.tolist()) == [1.0, 2.0]
    np.testing.assert_array_equal(cb[codes], [1.0, 1.0, 2.0])
