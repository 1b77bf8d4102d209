"""What the early-exit tests share: the trained CNN and its data, the step trained once on it, one sample."""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest

from compression.data import Arrays, split
from testkit.helpers import apply_step
from testkit.refdata import torch_threads

SPEC = {"method": "early_exit", "epochs": 3, "threshold": "auto", "latency_samples": 30, "latency_rounds": 1}


@pytest.fixture
def spec() -> dict[str, Any]:
    """A short early-exit step: 3 epochs, threshold auto, timing on 30 samples in one round."""
    return dict(SPEC)


@pytest.fixture(scope="package")
def x1() -> dict[str, np.ndarray]:
    """One random 28×28 sample (batch 1) to measure shapes and MACs on."""
    return {"input": np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)}


@pytest.fixture(scope="package")
def cnn(cnn_onnx, mnist_data):
    X, y = mnist_data
    data = split(Arrays({"input": X[4000:5000]}, y[4000:5000]), holdout=0.4, seed=0, max_eval=1000)
    return onnx.load(str(cnn_onnx["legacy"])), data


@pytest.fixture(scope="package")
def trained(cnn, tmp_path_factory):
    model, data = cnn
    with torch_threads(1):
        return apply_step(SPEC, model, data, tmp_path_factory.mktemp("ee"))
