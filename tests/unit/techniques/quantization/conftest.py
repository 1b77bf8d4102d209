"""The quantization tests' model: the session's LeNet-300-100 (``tests/conftest.py::lenet_exports``) as the
TorchScript exporter writes it; ``lenet_dynamo``, the contract's, comes from ``tests/conftest.py``."""
from __future__ import annotations

import onnx
import pytest

from compression.data import Arrays, DataSplit


@pytest.fixture(scope="package")
def lenet(lenet_exports, mnist_data) -> tuple[onnx.ModelProto, DataSplit]:
    """The session's LeNet-300-100, exported by the TorchScript exporter (Gemm with transB=1, opset 17; the
    API tests use the dynamo one); images 2,000-3,000 to train/calibrate on, 3,000-4,000 held out."""
    X, y = mnist_data
    Xf = X.reshape(len(X), -1)
    data = DataSplit(Arrays({"input": Xf[2000:3000]}, y[2000:3000]), Arrays({"input": Xf[3000:4000]}, y[3000:4000]))
    return onnx.load_from_string(lenet_exports["legacy"]), data
