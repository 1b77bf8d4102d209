"""Batch-1 latency of several ONNX Runtime sessions, measured fairly on a shared machine."""
from __future__ import annotations

import time
from typing import Any

import numpy as np


def batch1_latency_ms(configs: list[tuple[Any, dict[str, np.ndarray]]], inputs: dict[str, np.ndarray], n: int,
                       rounds: int) -> list[float]:
    """Mean wall time per sample at batch 1 over the first ``n`` samples, for each ``(session, extra feeds)``.

    The configurations are timed in interleaved rounds and each keeps its best round: on a shared machine a
    burst of load then hits one round of every configuration rather than one configuration's only run.
    """
    feeds = [{k: v[i:i + 1] for k, v in inputs.items()} for i in range(n)]
    best = [float("inf")] * len(configs)
    for sess, extra in configs:  # warm-up: first runs allocate and pick kernels
        for f in feeds[:5]:
            sess.run(None, {**f, **extra})
    for _ in range(rounds):
        for j, (sess, extra) in enumerate(configs):
            t = time.perf_counter()
            for f in feeds:
                sess.run(None, {**f, **extra})
            best[j] = min(best[j], (time.perf_counter() - t) * 1000 / n)
    return best
