"""What the low-rank and depthwise-separable tests share: the session's LeNet-300-100 and its data."""
from __future__ import annotations

import onnx
import pytest

from compression.data import Arrays, DataSplit


@pytest.fixture(scope="package")
def lenet(lenet_exports, mnist_data):
    """The session's LeNet-300-100 (``tests/conftest.py::lenet_exports``) by both exporters; 1,000 images to
    fine-tune on, 500 to measure."""
    X, y = mnist_data
    Xf = X.reshape(len(X), -1)
    models = {ex: onnx.load_from_string(lenet_exports[ex]) for ex in ("dynamo", "legacy")}
    data = DataSplit(Arrays({"input": Xf[:1000]}, y[:1000]), Arrays({"input": Xf[4500:5000]}, y[4500:5000]))
    return models, data
