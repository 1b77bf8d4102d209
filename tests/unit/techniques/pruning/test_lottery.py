"""Lottery tickets (``rewind: init | random``): survivors rewound to the init model or a fresh random init
each round, the rounds reported with their held-out accuracy, a rewind model of another graph refused."""
from __future__ import annotations

import onnx
import pytest
import torch
from onnx import numpy_helper

from compression.data import Arrays, split
from compression.errors import InvalidSpec
from testkit.helpers import accuracy, apply_step
from testkit.refdata import fit
from testkit.zoo import LeNet300100, export_onnx


@pytest.fixture(scope="module")
def lenet_init_and_trained(mnist_data, tmp_path_factory):
    X, y = mnist_data
    Xf = X.reshape(len(X), -1)
    d = tmp_path_factory.mktemp("lottery")
    torch.manual_seed(0)
    net = LeNet300100()
    init = onnx.load(str(export_onnx(net, torch.zeros(2, 784), d / "init.onnx", dynamo=False)))
    fit(net, Xf[:2000], y[:2000], epochs=2)
    trained = onnx.load(str(export_onnx(net, torch.zeros(2, 784), d / "trained.onnx", dynamo=False)))
    data = split(Arrays({"input": Xf[:2000]}, y[:2000]), holdout=0.25, seed=0, max_eval=500)
    return init, trained, data


def test_lottery_ticket_rewinds_to_init_and_reports_rounds(lenet_init_and_trained, tmp_path):
    init, trained, data = lenet_init_and_trained
    spec = {"method": "prune", "sparsity": 0.8, "iterations": 2, "rewind": "init", "rewind_model_id": "init-id",
            "finetune": {"epochs": 2, "lr": 3e-3}}
    with pytest.raises(InvalidSpec, match="cannot be resolved"):
        apply_step(spec, trained, data, tmp_path)
    res = apply_step(spec, trained, data, tmp_path, models={"init-id": init})
    rounds = res.report["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[1]["kept"] == pytest.approx(0.4472, abs=1e-3) and rounds[2]["kept"] == pytest.approx(0.2, abs=1e-3)
    assert all(r["accuracy"] > 0.8 for r in rounds)
    w = [numpy_helper.to_array(t) for t in res.model.graph.initializer if len(t.dims) == 2]
    zeros = sum(int((a == 0).sum()) for a in w) / sum(a.size for a in w)
    assert zeros == pytest.approx(0.8, abs=0.01)
    ctl = apply_step({**spec, "rewind": "random", "rewind_model_id": None}, trained, data, tmp_path)
    assert ctl.report["rewind"] == "random" and len(ctl.report["rounds"]) == 3
    assert accuracy(res.model, data) > 0.85 and accuracy(ctl.model, data) > 0.5


def test_lottery_refuses_a_rewind_model_of_another_graph(lenet_init_and_trained, tmp_path):
    _, trained, data = lenet_init_and_trained
    path = export_onnx(torch.nn.Linear(784, 10), torch.zeros(2, 784), tmp_path / "other.onnx", dynamo=False)
    other = onnx.load(str(path))
    with pytest.raises(InvalidSpec, match="not the same graph"):
        apply_step({"method": "prune", "sparsity": 0.5, "rewind": "init", "rewind_model_id": "x",
                    "finetune": {"epochs": 1}}, trained, data, tmp_path, models={"x": other})
