"""Lottery tickets (``rewind: init | random | sign``): survivors rewound to the init model, a fresh random
init or the init's signs each round, the rounds reported with their held-out accuracy (and Scratch-B's
beside them), a rewind model of another graph refused."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from compression.data import Arrays, split
from compression.errors import InvalidSpec
from compression.spec import parse_spec
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


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The 2-D initializers (the Gemm weights the ticket prunes) by name."""
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) == 2}


@pytest.mark.parametrize("magnitude", ["constant", "random"])
def test_sign_rewind_keeps_the_init_signs_with_new_magnitudes(lenet_init_and_trained, tmp_path, magnitude):
    # lr 1e-9: Adam moves a weight ~1e-9 a step, so the written-back survivors are the rewound values
    init, trained, data = lenet_init_and_trained
    spec = {"method": "prune", "sparsity": 0.5, "scope": "layer", "rewind": "sign", "rewind_model_id": "init",
            "sign_magnitude": magnitude, "finetune": {"epochs": 1, "lr": 1e-9}}
    res = apply_step(spec, trained, data, tmp_path, models={"init": init})
    assert res.report["sign_magnitude"] == magnitude
    w0, w = _weights(init), _weights(res.model)
    assert set(w) == set(w0) and len(w) == 3
    for name, a in w.items():
        alive = a != 0
        assert alive.mean() == pytest.approx(0.5, abs=0.01)
        assert np.array_equal(np.sign(a[alive]), np.sign(w0[name][alive]))
        mags = np.abs(a[alive])
        if magnitude == "constant":  # one magnitude per layer: the std of the init's weights
            np.testing.assert_allclose(mags, w0[name].std(), rtol=1e-4)
        else:  # a fresh random init's |w|: spread out, and not the init's own magnitudes
            assert mags.std() > 0.3 * mags.mean()
            assert not np.allclose(mags, np.abs(w0[name][alive]), rtol=0.1)
    biases = {t.name: numpy_helper.to_array(t) for t in init.graph.initializer if len(t.dims) == 1}
    out = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    for name, b in biases.items():  # everything else rewinds to the init, as with rewind: init
        np.testing.assert_allclose(out[name], b, atol=1e-6)


def test_scratch_baseline_reports_beside_the_ticket_and_leaves_it_the_result(lenet_init_and_trained, tmp_path):
    init, trained, data = lenet_init_and_trained
    spec = {"method": "prune", "sparsity": 0.8, "iterations": 2, "rewind": "init", "rewind_model_id": "init",
            "finetune": {"epochs": 1, "lr": 3e-3}}
    ticket = apply_step(spec, trained, data, tmp_path, models={"init": init})
    both = apply_step({**spec, "baseline": "scratch", "baseline_rounds": [2]}, trained, data, tmp_path,
                      models={"init": init})
    rounds = both.report["rounds"]
    assert "scratch_accuracy" not in rounds[0] and "scratch_accuracy" not in rounds[1]
    assert rounds[2]["scratch_epochs"] == 3  # Scratch-B: (round + 1) × finetune.epochs
    assert rounds[2]["scratch_accuracy"] > 0.8 and both.report["baseline"]["rounds"] == [2]
    # the artifact is the ticket, bit for bit: the scratch copy trains apart
    assert [r["accuracy"] for r in rounds] == [r["accuracy"] for r in ticket.report["rounds"]]
    for name, a in _weights(ticket.model).items():
        assert np.array_equal(_weights(both.model)[name], a)


@pytest.mark.parametrize("bad", [
    {"rewind": "sign", "finetune": {"epochs": 1}},  # the signs come from the init model
    {"rewind": "init", "rewind_model_id": "m", "sign_magnitude": "random", "finetune": {"epochs": 1}},
    {"rewind": "random", "rewind_model_id": "m", "finetune": {"epochs": 1}},
    {"baseline": "scratch", "finetune": {"epochs": 1}},  # a control of the ticket: needs rewinding
    {"rewind": "random", "baseline_rounds": [1], "finetune": {"epochs": 1}},
    {"rewind": "random", "baseline": "scratch", "iterations": 2, "baseline_rounds": [3], "finetune": {"epochs": 1}},
])
def test_sign_and_scratch_specs_that_cannot_run_are_refused(bad):
    with pytest.raises(InvalidSpec):
        parse_spec({"steps": [{"method": "prune", **bad}]})
