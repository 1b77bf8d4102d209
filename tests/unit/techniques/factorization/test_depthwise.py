"""Depthwise-separable replacement: the exported graph holds depthwise + pointwise convs, the reported
parameters, MACs and rank-1 errors are the real ones, distillation recovers accuracy, and bad specs are refused."""
from __future__ import annotations

import onnx
import pytest
from onnx import helper

from compression.analysis import count_params, macs
from compression.data import Arrays, DataSplit
from compression.errors import InvalidSpec
from compression.spec import parse_spec
from compression.techniques.factorization.layers import find_layers, initializers, name_nodes
from compression.techniques.factorization.svd import depthwise_product, relative_error
from testkit.helpers import accuracy, apply_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cnn_data(mnist_data):
    X, y = mnist_data
    return DataSplit(Arrays({"input": X[2000:3500]}, y[2000:3500]), Arrays({"input": X[4500:5000]}, y[4500:5000]))


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_depthwise_replaces_convs_and_counts_params_and_macs(exporter, cnn_onnx, cnn_data, tmp_path):
    model = onnx.load(str(cnn_onnx[exporter]))
    res = apply_step({"method": "depthwise_separable", "finetune": {"epochs": 0}}, model, cnn_data, tmp_path)
    out = res.model
    onnx.checker.check_model(out)
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    inits = {t.name: list(t.dims) for t in out.graph.initializer}
    # the 1-channel stem is kept (min_channels 2); conv 16 -> 32 becomes depthwise (group 16) + pointwise
    assert [inits[n.input[1]] for n in convs] == [[16, 1, 3, 3], [16, 1, 3, 3], [32, 16, 1, 1]]
    group = {a.name: helper.get_attribute_value(a) for a in convs[1].attribute}
    assert group["group"] == 16 and group["pads"] == [1, 1, 1, 1] and group["strides"] == [1, 1]
    assert len(convs[2].input) == 3  # bias on the pointwise conv
    (layer,) = res.report["layers"]
    assert (layer["cin"], layer["cout"], layer["k"]) == (16, 32, [3, 3])
    assert (layer["params_before"], layer["params_after"]) == (32 * 16 * 9, 16 * 9 + 32 * 16)
    assert (layer["macs_before"], layer["macs_after"]) == (14 * 14 * 32 * 16 * 9, 14 * 14 * (16 * 9 + 32 * 16))
    assert res.report["skipped"] == [{"layer": convs[0].name, "reason": "Cin 1 < min_channels 2"}]
    sample = {"input": cnn_data.holdout.inputs["input"][:1]}
    assert macs(model, sample) - macs(out, sample) == layer["macs_before"] - layer["macs_after"]
    assert count_params(model)[0] - count_params(out)[0] == layer["params_before"] - layer["params_after"]
    # the reported rank-1 error is the real one of the stored depthwise/pointwise weights
    w = initializers(name_nodes(model))[find_layers(name_nodes(model))[1].weight]
    real = relative_error(w, depthwise_product(*(initializers(out)[n.input[1]] for n in convs[1:])))
    assert abs(real - layer["rank1_relative_error"]) < 1e-5 and 0 < real < 1


def test_depthwise_distillation_recovers_accuracy(cnn_onnx, cnn_data, tmp_path):
    model = onnx.load(str(cnn_onnx["dynamo"]))
    res = apply_step({"method": "depthwise_separable", "min_channels": 1, "finetune": {"epochs": 2, "lr": 2e-3}},
                     model, cnn_data, tmp_path)
    acc = res.report["holdout_accuracy"]
    assert len(res.report["layers"]) == 2 and res.report["totals"]["conv_macs_ratio"] > 6
    assert acc["recovered"] == pytest.approx(accuracy(res.model, cnn_data), abs=1e-6)
    assert acc["recovered"] > acc["init"] + 0.2 and acc["recovered"] > 0.8
    assert [n.op_type for n in res.model.graph.node].count("Conv") == 4


def test_depthwise_on_an_mlp_returns_it_unchanged_with_a_note(lenet, tmp_path):
    models, data = lenet
    res = apply_step({"method": "depthwise_separable"}, models["legacy"], data, tmp_path)
    assert [n.op_type for n in res.model.graph.node] == [n.op_type for n in models["legacy"].graph.node]
    assert "no convolutions" in res.report["notes"][0] and res.report["layers"] == []


@pytest.mark.parametrize("step", [
    {"method": "depthwise_separable", "min_channels": 0},
    {"method": "depthwise_separable", "layers": []},
    {"method": "depthwise_separable", "layers": ["a"], "exclude": ["a"]},
    {"method": "depthwise_separable", "distill": {"epochs": 1}},
])
def test_bad_specs_are_refused(step):
    with pytest.raises(InvalidSpec) as e:
        parse_spec({"steps": [step]})
    assert e.value.errors and e.value.errors[0]["loc"][:2] == ["steps", 0]


def test_defaults():
    spec = parse_spec({"steps": [{"method": "depthwise_separable"}]}).steps
    assert spec[0].finetune.distill and spec[0].finetune.epochs > 0 and spec[0].needs_data
    assert not parse_spec({"steps": [{"method": "depthwise_separable", "finetune": {"epochs": 0}}]}).steps[0].needs_data
