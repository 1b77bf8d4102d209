"""Slimmable networks: the masked full-size forward is the sliced network's forward (checked against the
exported ONNX in ONNX Runtime, per width, with a different BatchNorm set per width), coupled residual
layers shrink together, widths nest and share weights, and the technique trains every width."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from compression.channels import plan_channels
from compression.converter import to_torch
from compression.data import Arrays, DataSplit
from compression.errors import InvalidSpec
from compression.spec import parse_spec
from compression.techniques.slimmable.network import SlimmableNet, find_groups, kept_channels
from compression.techniques.slimmable.training import step_widths
from testkit.helpers import accuracy, apply_step, run_ort
from testkit.refdata import fit
from testkit.zoo import LeNet300100, SmallCNN, TinyResNet, export_onnx

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDTHS = [0.25, 0.5, 0.75, 1.0]


def _weights(model: onnx.ModelProto, op: str) -> list[np.ndarray]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [inits[n.input[1]] for n in model.graph.node if n.op_type == op and n.input[1] in inits]


@pytest.fixture(scope="module")
def bn_cnn(one_torch_thread, mnist_data, tmp_path_factory) -> onnx.ModelProto:
    """SmallCNN trained briefly, exported with its BatchNorm nodes kept (dynamo, optimize=False)."""
    X, y = mnist_data
    torch.manual_seed(0)
    net = fit(SmallCNN(), X[:2000], y[:2000], epochs=1, lr=2e-3)
    path = export_onnx(net, torch.zeros(2, 1, 28, 28), tmp_path_factory.mktemp("slim") / "cnn_bn.onnx",
                       dynamo=True, optimize=False)
    model = onnx.load(str(path))
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 2
    return model


@pytest.fixture(scope="module")
def data(mnist_data) -> DataSplit:
    X, y = mnist_data
    return DataSplit(Arrays({"input": X[2000:3500]}, y[2000:3500]), Arrays({"input": X[4500:4900]}, y[4500:4900]))


def _net(model: onnx.ModelProto, X: np.ndarray, widths=WIDTHS, order: str = "l1"):
    module = to_torch(model)
    example = (torch.from_numpy(X[:2]),)
    module.record_shapes(*example)
    groups, skipped = find_groups(module, plan_channels(module, model, example), example, order)
    return SlimmableNet(module, groups, example, widths), example


def _scramble_norms(net: SlimmableNet) -> None:
    """Give every width's BatchNorm set different statistics and affine terms, so that exporting the wrong
    set (or none) cannot go unnoticed."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for w in net.widths:
            for bn in net.norms_of(w):
                n = bn.num_features
                bn.running_mean.add_(torch.randn(n, generator=g) * 0.3)
                bn.running_var.mul_(torch.rand(n, generator=g) + 0.5)
                bn.weight.mul_(torch.rand(n, generator=g) + 0.5)
                bn.bias.add_(torch.randn(n, generator=g) * 0.2)


def test_kept_channels_and_step_widths():
    assert [kept_channels(16, w) for w in WIDTHS] == [4, 8, 12, 16]
    assert kept_channels(3, 0.1) == 1  # never zero channels
    assert [kept_channels(20, w, round_to=8) for w in (0.25, 0.5, 1.0)] == [8, 8, 20]
    rng = np.random.default_rng(0)
    assert step_widths(WIDTHS, "sum", 2, rng) == [1.0, 0.75, 0.5, 0.25]
    for _ in range(20):
        ws = step_widths(WIDTHS, "sandwich", 1, rng)
        assert ws[:2] == [1.0, 0.25] and len(ws) == 3 and ws[2] in (0.5, 0.75)
    assert step_widths(WIDTHS, "sandwich", 0, rng) == [1.0, 0.25]


@pytest.mark.parametrize("widths, msg", [
    ([0.5, 0.25, 1.0], "sorted"),
    ([0.5, 0.5, 1.0], "unique"),
    ([0.0, 1.0], "(0, 1]"),
    ([0.5, 1.5], "(0, 1]"),
    ([0.25, 0.5], "include 1.0"),
    ([1.0], "at least 2"),
])
def test_bad_widths_are_refused(widths, msg):
    with pytest.raises(InvalidSpec) as e:
        parse_spec({"steps": [{"method": "slimmable", "widths": widths}]})
    assert e.value.errors[0]["loc"][:3] == ["steps", 0, "widths"] and msg in e.value.errors[0]["msg"]


def test_inplace_distill_with_sum_rule_is_refused():
    with pytest.raises(InvalidSpec) as e:
        parse_spec({"steps": [{"method": "slimmable", "rule": "sum", "inplace_distill": True}]})
    assert "sandwich" in e.value.errors[0]["msg"]
    assert parse_spec({"steps": [{"method": "slimmable", "rule": "sum"}]}).steps[0].rule == "sum"


def test_masked_forward_equals_the_exported_sliced_network_per_width(bn_cnn, data):
    X = data.holdout.inputs["input"][:64]
    net, example = _net(bn_cnn, X)
    _scramble_norms(net)
    full = None
    for w in WIDTHS:
        out = net.export(w, bn_cnn, example)
        onnx.checker.check_model(out)
        convs, gemms = _weights(out, "Conv"), _weights(out, "Gemm")
        k1, k2, k3 = kept_channels(16, w), kept_channels(32, w), kept_channels(128, w)
        assert [c.shape[0] for c in convs] == [k1, k2] and convs[1].shape[1] == k1
        assert list(gemms[0].shape) == [k3, k2 * 49] and list(gemms[1].shape) == [10, k3]
        assert sum(n.op_type == "BatchNormalization" for n in out.graph.node) == 2
        net.select(w)
        with torch.no_grad():
            want = net(torch.from_numpy(X)).numpy()
        got = run_ort(out, X)
        assert np.abs(got - want).max() < 1e-4, w
        for n in (1, 5):  # the batch stays dynamic after the flatten Reshape was rewritten
            assert run_ort(out, X[:n]).shape == (n, 10)
        if w == 1.0:
            full = out
    # Widths nest and share weights: a narrow conv's filters are the full conv's, at the kept channels.
    narrow = net.export(0.25, bn_cnn, example)
    root = net.groups[0]
    kept = sorted(root.order[:root.kept[0.25]])
    np.testing.assert_array_equal(_weights(narrow, "Conv")[0], _weights(full, "Conv")[0][kept])


def test_masks_match_the_unmasked_sliced_module_in_torch(bn_cnn, data):
    """Independent of ONNX: the physically sliced torch copy computes the masked forward."""
    X = data.holdout.inputs["input"][:16]
    net, example = _net(bn_cnn, X, widths=[0.5, 1.0], order="index")
    _scramble_norms(net)
    sliced = net.sliced(0.5, example)
    assert sliced.weights[net.groups[0].root.key].out_channels == 8
    net.select(0.5)
    with torch.no_grad():
        np.testing.assert_allclose(sliced(torch.from_numpy(X)).numpy(), net(torch.from_numpy(X)).numpy(),
                                   atol=1e-5)
    assert net.groups[0].order == list(range(16))


def test_residual_coupled_layers_shrink_together(mnist_data, tmp_path):
    X, _ = mnist_data
    torch.manual_seed(0)
    model = onnx.load(str(export_onnx(TinyResNet(width=8).eval(), torch.zeros(2, 1, 28, 28), tmp_path / "r.onnx",
                                      dynamo=True, optimize=False)))
    net, example = _net(model, X[:32])
    coupled = [g for g in net.groups if len(g.layers) > 1]
    assert len(coupled) >= 2  # conv2 of a residual block + its downsample conv, per downsampling block
    _scramble_norms(net)
    for w in (0.25, 0.5):
        out = net.export(w, model, example)
        inits = {t.name: list(t.dims) for t in out.graph.initializer}
        filters = {n.name: inits[n.input[1]][0] for n in out.graph.node if n.op_type == "Conv"}
        for g in coupled:
            assert {filters[name] for name in g.layers} == {g.kept[w]}
        net.select(w)
        with torch.no_grad():
            want = net(torch.from_numpy(X[:32])).numpy()
        assert np.abs(run_ort(out, X[:32]) - want).max() < 1e-4


def test_slimmable_trains_every_width_with_switchable_bn(bn_cnn, data, tmp_path):
    base = accuracy(bn_cnn, data)
    res = apply_step({"method": "slimmable", "widths": WIDTHS, "epochs": 2, "lr": 2e-3, "batch_size": 64},
                     bn_cnn, data, tmp_path)
    rows = res.report["widths"]
    assert [r["width"] for r in rows] == WIDTHS
    assert sorted(res.extra_models) == [f"width_{w}.onnx" for w in WIDTHS]
    params, macs = [r["params"] for r in rows], [r["macs"] for r in rows]
    assert params == sorted(params) and len(set(params)) == 4 and macs == sorted(macs) and len(set(macs)) == 4
    assert macs[0] * 8 < macs[-1]  # 1/4 of the channels: about 1/16 of the conv MACs
    for r in rows:
        m = res.extra_models[r["artifact"]]
        onnx.checker.check_model(m)
        assert abs(accuracy(m, data) - r["accuracy"]) < 1e-6 and r["export_max_abs_error"] < 1e-4
        assert r["latency_ms"]["p50"] > 0
    accs = [r["accuracy"] for r in rows]
    assert accs[-1] >= base - 0.03 and accs[0] > 0.8 and accs[1] > 0.9
    assert res.report["switchable_batchnorm_layers"] == 2 and res.report["bn_calibration_samples"] == 1024
    # The step's model is the width-1.0 network, same graph as the input.
    assert [n.op_type for n in res.model.graph.node] == [n.op_type for n in bn_cnn.graph.node]
    assert res.model.SerializeToString() == res.extra_models["width_1.0.onnx"].SerializeToString()
    # Widths share the conv weights, but each carries its own BatchNorm statistics (not a slice of the full one's).
    def nth(m: onnx.ModelProto, op: str, i: int, slot: int) -> np.ndarray:
        inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        return inits[[n for n in m.graph.node if n.op_type == op][i].input[slot]]

    half = res.extra_models["width_0.5.onnx"]
    c1h, c1f = nth(half, "Conv", 0, 1), nth(res.model, "Conv", 0, 1)
    kept1 = [int(np.flatnonzero((c1f == row).all(axis=(1, 2, 3)))[0]) for row in c1h]
    c2h, c2f = nth(half, "Conv", 1, 1), nth(res.model, "Conv", 1, 1)[:, kept1]
    kept2 = [int(np.flatnonzero((c2f == row).all(axis=(1, 2, 3)))[0]) for row in c2h]
    assert (len(kept1), len(kept2)) == (8, 16) and kept2 == sorted(set(kept2))
    # conv2 sees 8 of 16 input channels at width 0.5: its BatchNorm has other statistics than the full one's
    mean_half, mean_full = nth(half, "BatchNormalization", 1, 3), nth(res.model, "BatchNormalization", 1, 3)
    assert mean_half.shape == (16,) and np.abs(mean_half - mean_full[kept2]).max() > 1e-2


def test_sum_rule_and_unlabelled_data(bn_cnn, data, tmp_path):
    unlabelled = DataSplit(Arrays(data.train.inputs, None), data.holdout)
    res = apply_step({"method": "slimmable", "widths": [0.5, 1.0], "rule": "sum", "epochs": 1,
                      "bn_calibration_samples": 0}, bn_cnn, unlabelled, tmp_path)
    assert any("distillation" in n for n in res.report["notes"]) and res.report["distill"]
    assert res.report["rule"] == "sum" and res.report["inplace_distill"] is False
    assert res.report["bn_calibration_samples"] == 0
    assert all(r["agreement"] > 0.8 for r in res.report["widths"])


def test_model_without_a_slimmable_layer_is_refused(tmp_path, data):
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    model = onnx.load(str(export_onnx(linear, torch.zeros(2, 1, 28, 28), tmp_path / "lin.onnx", dynamo=False)))
    with pytest.raises(InvalidSpec, match="no layer of this model can change width"):
        apply_step({"method": "slimmable", "epochs": 1}, model, data, tmp_path)


def test_mlp_hidden_neurons_shrink_without_batchnorm(mnist_data, tmp_path):
    X, y = mnist_data
    Xf = X.reshape(len(X), -1)
    torch.manual_seed(0)
    model = onnx.load(str(export_onnx(LeNet300100().eval(), torch.zeros(2, 784), tmp_path / "lenet.onnx", dynamo=True)))
    flat = DataSplit(Arrays({"input": Xf[:300]}, y[:300]), Arrays({"input": Xf[4500:4600]}, y[4500:4600]))
    res = apply_step({"method": "slimmable", "widths": [0.25, 0.5, 1.0], "epochs": 1}, model, flat, tmp_path)
    shapes = {w: [list(a.shape) for a in _weights(res.extra_models[f"width_{w}.onnx"], "Gemm")] for w in (0.25, 0.5)}
    assert shapes == {0.25: [[75, 784], [25, 75], [10, 25]], 0.5: [[150, 784], [50, 150], [10, 50]]}
    assert res.report["switchable_batchnorm_layers"] == 0
    assert any("no BatchNormalization" in n for n in res.report["notes"])
    assert all(r["export_max_abs_error"] < 1e-4 for r in res.report["widths"])
