"""The quantization tests' models: LeNet-300-100 trained briefly on MNIST, once per test package."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from compression.data import Arrays, DataSplit, split
from testkit.refdata import fit
from testkit.zoo import LeNet300100, export_onnx


def _trained_lenet(mnist_data: tuple[np.ndarray, np.ndarray], folder: Path, *, images: int, epochs: int,
                   dynamo: bool) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """LeNet-300-100 trained on the first ``images`` flattened images; returns it and all the images, labels."""
    X, y = mnist_data
    Xf = X.reshape(len(X), -1)
    torch.manual_seed(0)  # the layers' initial weights
    net = fit(LeNet300100(), Xf[:images], y[:images], epochs=epochs)
    path = export_onnx(net, torch.zeros(2, 784), folder / "lenet.onnx", dynamo=dynamo)
    return onnx.load(str(path)), Xf, y


@pytest.fixture(scope="package")
def lenet(mnist_data, tmp_path_factory) -> tuple[onnx.ModelProto, DataSplit]:
    """LeNet-300-100 trained on 2,000 images; 1,000 more to train/calibrate on, 1,000 held out.

    Exported by the TorchScript exporter (Gemm with transB=1, opset 17); the API tests use the dynamo one.
    """
    model, Xf, y = _trained_lenet(mnist_data, tmp_path_factory.mktemp("qlenet"), images=2000, epochs=3, dynamo=False)
    data = DataSplit(Arrays({"input": Xf[2000:3000]}, y[2000:3000]), Arrays({"input": Xf[3000:4000]}, y[3000:4000]))
    return model, data


@pytest.fixture(scope="package")
def lenet_dynamo(mnist_data, tmp_path_factory) -> tuple[onnx.ModelProto, DataSplit]:
    """The technique contract's model (``tests/unit/test_techniques.py``): dynamo export, 3,000 images for
    2 epochs, the next 1,000 split 600 to calibrate on / 400 held out."""
    model, Xf, y = _trained_lenet(mnist_data, tmp_path_factory.mktemp("lenet"), images=3000, epochs=2, dynamo=True)
    return model, split(Arrays({"input": Xf[3000:4000]}, y[3000:4000]), holdout=0.4, seed=0, max_eval=1000)
