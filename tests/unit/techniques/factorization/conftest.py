"""What the low-rank and depthwise-separable tests share: a trained LeNet-300-100 and its data."""
from __future__ import annotations

import onnx
import pytest
import torch

from compression.data import Arrays, DataSplit
from testkit.refdata import fit
from testkit.zoo import LeNet300100, export_onnx


@pytest.fixture(scope="package")
def lenet(mnist_data, tmp_path_factory):
    """LeNet-300-100 trained briefly, exported by both exporters; 2,000 images to fine-tune, 500 to measure."""
    torch.set_num_threads(1)
    X, y = mnist_data
    Xf = X.reshape(len(X), -1)
    torch.manual_seed(0)
    net = fit(LeNet300100(), Xf[:2000], y[:2000], epochs=3)
    d = tmp_path_factory.mktemp("lenet-lr")
    models = {ex: onnx.load(str(export_onnx(net, torch.zeros(2, 784), d / f"{ex}.onnx", dynamo=ex == "dynamo")))
              for ex in ("dynamo", "legacy")}
    data = DataSplit(Arrays({"input": Xf[:1000]}, y[:1000]), Arrays({"input": Xf[4500:5000]}, y[4500:5000]))
    return models, data

