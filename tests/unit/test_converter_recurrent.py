"""LSTM/GRU/RNN in the converter: single nodes against ONNX Runtime (every direction, variable lengths,
initial states, both layouts, both GRU reset modes), refusals, and real CRNN exports that must match
ORT, train and write back."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from compression.converter import UnsupportedOp, to_torch
from tests.unit.test_converter import assert_matches_ort, ort_run, torch_run

RNG = np.random.default_rng(3)
T, N, I, H = 5, 3, 4, 6
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _f32(*shape: int) -> np.ndarray:
    return (0.5 * RNG.standard_normal(shape)).astype(np.float32)


def recurrent_model(op: str, *, direction: str = "forward", lens: bool = False, init: bool = False,
                    layout: int = 0, bias: bool = True, weights_as_inputs: bool = False, **attrs) -> tuple:
    """One recurrent node with all its outputs; returns (model, feeds)."""
    dirs = 2 if direction == "bidirectional" else 1
    g = GATES[op]
    x = _f32(N, T, I) if layout else _f32(T, N, I)
    consts = {"W": _f32(dirs, g * H, I), "R": _f32(dirs, g * H, H)}
    if bias:
        consts["B"] = _f32(dirs, 2 * g * H)
    feeds = {"X": x}
    names = ["X", "W", "R", "B" if bias else ""]
    if lens:
        feeds["L"] = np.array([T, 2, 4], np.int32)
    names.append("L" if lens else "")
    states = ["h0", "c0"] if op == "LSTM" else ["h0"]
    for s in states:
        if init:
            feeds[s] = _f32(N, dirs, H) if layout else _f32(dirs, N, H)
        names.append(s if init else "")
    if weights_as_inputs:
        feeds.update(consts)
        consts = {}
    outs = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]
    node = helper.make_node(op, names, outs, hidden_size=H, direction=direction, layout=layout, **attrs)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in feeds.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model, feeds


CASES = [
    pytest.param(op, direction, lens, init, attrs, id=f"{op}-{direction}-{'lens' if lens else 'full'}"
                 f"{'-init' if init else ''}{'-' + '-'.join(f'{k}{v}' for k, v in attrs.items()) if attrs else ''}")
    for op in ("LSTM", "GRU", "RNN")
    for direction in ("forward", "reverse", "bidirectional")
    for lens, init in ((False, False), (True, True))
    for attrs in ([{"linear_before_reset": 1}, {}] if op == "GRU" else [{}])
] + [
    pytest.param("RNN", "bidirectional", True, False, {"activations": ["Relu", "Relu"]}, id="RNN-relu"),
    pytest.param("LSTM", "bidirectional", False, True, {"activations": ["sigmoid", "tanh", "tanh"] * 2},
                 id="LSTM-explicit-default-activations"),
]


@pytest.mark.parametrize("op, direction, lens, init, attrs", CASES)
def test_recurrent_matches_onnxruntime(op: str, direction: str, lens: bool, init: bool, attrs: dict) -> None:
    model, feeds = recurrent_model(op, direction=direction, lens=lens, init=init, **attrs)
    module = to_torch(model)
    assert_matches_ort(model, module, feeds)
    assert {"W", "R", "B"} <= {k for k, src in module._sources.items() if src.container == "params"}


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_layout_1_is_layout_0_transposed(op: str) -> None:
    """ORT's CPU kernels refuse ``layout=1``; the same weights in layout 0 are the reference."""
    attrs = {"linear_before_reset": 1} if op == "GRU" else {}
    model1, feeds1 = recurrent_model(op, direction="bidirectional", init=True, layout=1, **attrs)
    model0 = onnx.ModelProto()
    model0.CopyFrom(model1)
    for a in model0.graph.node[0].attribute:
        if a.name == "layout":
            a.i = 0
    for value in model0.graph.input:
        value.type.tensor_type.ClearField("shape")
    feeds0 = {k: (v.transpose(1, 0, 2) if k in ("X", "h0", "c0") else v) for k, v in feeds1.items()}
    expected = ort_run(model0, feeds0)
    actual = torch_run(to_torch(model1), feeds1)
    np.testing.assert_allclose(actual[0], expected[0].transpose(2, 0, 1, 3), atol=1e-5)  # [N, T, dirs, H]
    for a, e in zip(actual[1:], expected[1:], strict=True):
        np.testing.assert_allclose(a, e.transpose(1, 0, 2), atol=1e-5)


def test_runtime_weights_without_bias_match_and_get_gradients() -> None:
    model, feeds = recurrent_model("LSTM", direction="bidirectional", bias=False, weights_as_inputs=True)
    module = to_torch(model)
    assert_matches_ort(model, module, feeds)
    w = torch.from_numpy(feeds["W"]).requires_grad_()
    y = module(*(w if n == "W" else torch.from_numpy(feeds[n]) for n in module.input_names))[0]
    y.square().sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.parametrize("op, attrs, named", [
    ("LSTM", {"activations": ["Relu", "Tanh", "Tanh"]}, "activations=Relu,Tanh,Tanh"),
    ("GRU", {"clip": 3.0}, "clip"),
    ("LSTM", {"input_forget": 1}, "input_forget=1"),
    ("RNN", {"activations": ["Sigmoid"]}, "activations=Sigmoid"),
])
def test_unsupported_attributes_are_refused_by_name(op: str, attrs: dict, named: str) -> None:
    model, _ = recurrent_model(op, **attrs)
    with pytest.raises(UnsupportedOp) as info:
        to_torch(model)
    assert info.value.op_types == [f"{op}({named})"]


# ------------------------------------------------------------------------- real CRNN exports
CRNN_EXPORTS = [
    pytest.param("lstm", False, {"dynamo": False}, id="lstm-legacy-opset17"),
    pytest.param("lstm", False, {"dynamo": False, "opset": 12}, id="lstm-legacy-opset12"),
    pytest.param("lstm", False, {"dynamo": True}, id="lstm-dynamo"),
    pytest.param("gru", True, {"dynamo": False}, id="gru-batch-first-legacy"),
    pytest.param("gru", False, {"dynamo": True}, id="gru-dynamo"),
]


@pytest.mark.parametrize("rnn, batch_first, export", CRNN_EXPORTS)
def test_crnn_export_matches_ort_trains_and_writes_back(rnn: str, batch_first: bool, export: dict, tmp_path) -> None:
    from testkit import zoo

    torch.manual_seed(0)
    net = zoo.CRNN(rnn=rnn, batch_first=batch_first)
    path = zoo.export_onnx(net, torch.randn(2, 1, 32, 48), tmp_path / "crnn.onnx", **export)
    model = onnx.load(path)
    assert rnn.upper() in {n.op_type for n in model.graph.node}
    module = to_torch(model)
    x = RNG.standard_normal((3, 1, 32, 48)).astype(np.float32)
    assert_matches_ort(model, module, {module.input_names[0]: x})
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.from_numpy(x)).numpy(), net(torch.from_numpy(x)).numpy(), atol=1e-4)

    # CTC training: every parameter (the recurrent weights too) learns and the loss goes down.
    images = torch.from_numpy(RNG.standard_normal((8, 1, 32, 48)).astype(np.float32))
    targets = torch.from_numpy(RNG.integers(1, 11, (8, 4)))
    (node,) = [n for n in model.graph.node if n.op_type == rnn.upper()]
    recurrent = {module.tensor_name(n) for n in node.input[1:4] if n in module._sources}  # W, R, B initializers
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    module.train()
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        logp = module(images)
        logp = logp.transpose(0, 1) if batch_first else logp
        loss = nn.functional.ctc_loss(logp, targets, torch.full((8,), logp.shape[0]), torch.full((8,), 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    module.eval()
    assert losses[-1] < losses[0] - 0.1, losses
    moved = {k for k, v in module.named_parameters() if not torch.equal(v.detach(), before[k])}
    assert recurrent and recurrent <= moved, (recurrent, moved)

    written = module.write_back(model)
    onnx.checker.check_model(written)
    assert_matches_ort(written, module, {module.input_names[0]: x})
    assert np.abs(ort_run(written, {module.input_names[0]: x})[0] - ort_run(model, {module.input_names[0]: x})[0]).max() > 1e-3


def test_converted_crnn_exports_again_with_torch_onnx(tmp_path) -> None:
    """The pipeline writes trained values back into the original graph (tested above); exporting the
    converted module itself (legacy exporter) also works and keeps one LSTM node."""
    from testkit import zoo

    torch.manual_seed(0)
    model = onnx.load(zoo.export_onnx(zoo.CRNN(), torch.randn(2, 1, 32, 48), tmp_path / "crnn.onnx", dynamo=False))
    module = to_torch(model)
    x = RNG.standard_normal((3, 1, 32, 48)).astype(np.float32)
    again = onnx.load(zoo.export_onnx(module, torch.from_numpy(x), tmp_path / "again.onnx", dynamo=False))
    assert [n.op_type for n in again.graph.node].count("LSTM") == 1
    np.testing.assert_allclose(ort_run(again, {again.graph.input[0].name: x})[0], torch_run(module, {"input": x})[0],
                               atol=1e-5)
