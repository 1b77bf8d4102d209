"""Static counts and measured metrics against numbers worked out by hand."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compression.analysis import count_params, macs
from compression.metrics import EvalData, fidelity, measure, ratios
from compression.modelio import describe, save
from testkit.helpers import apply_step

# SmallCNN: conv1 28·28·16·(1·9) + conv2 14·14·32·(16·9) + fc1 1568·128 + fc2 128·10
CNN_MACS = 28 * 28 * 16 * 9 + 14 * 14 * 32 * 16 * 9 + 1568 * 128 + 128 * 10


def test_cnn_params_and_macs_both_exporters(cnn_onnx, trained_cnn):
    torch_params = sum(p.numel() for n, p in trained_cnn.named_parameters())
    sample = {"input": np.zeros((1, 1, 28, 28), np.float32)}
    for path in cnn_onnx.values():
        m = onnx.load(str(path))
        params, nonzero = count_params(m)
        # The legacy exporter folds BatchNorm into the convs (fewer params); dynamo keeps BN (+ its stats).
        assert torch_params - 2 * (16 + 32) <= params <= torch_params + 2 * (16 + 32)
        assert nonzero == params
        assert macs(m, sample) == CNN_MACS


def test_measure_reports_sizes_from_disk(cnn_onnx, mnist_data, tmp_path):
    X, y = mnist_data
    path = cnn_onnx["dynamo"]
    m = onnx.load(str(path))
    ev = EvalData({"input": X[:64]}, y[:64])
    res = measure(m, [path], ev, latency_runs=5, threads=1)
    assert res["file_bytes"] == path.stat().st_size
    assert 0 < res["zip_bytes"] < res["file_bytes"]
    assert res["latency_ms"]["p50"] > 0 and res["latency_ms"]["p90"] >= res["latency_ms"]["p50"]
    assert res["throughput"] > 0 and res["accuracy"] > 0.85


def test_fidelity_and_ratios():
    ref = [np.array([[1.0, 0.0], [0.0, 1.0]])]
    out = [np.array([[1.0, 0.0], [1.0, 0.0]])]
    f = fidelity(out, ref, None)
    assert f["agreement"] == 0.5 and abs(f["output_cosine"] - 0.5) < 1e-9 and f["max_abs_error"] == 1.0
    r = ratios({"file_bytes": 25, "latency_ms": {"p50": 2.0}, "accuracy": 0.9},
               {"file_bytes": 100, "latency_ms": {"p50": 1.0}, "accuracy": 0.95})
    assert r == {"file_bytes": 4.0, "latency_p50_speedup": 0.5, "accuracy_delta": -0.05}


def _constant_weights_model() -> onnx.ModelProto:
    """``y = (x·W + b) · 0.5`` with ``W [4, 3]`` and ``b [3]`` in Constant nodes, as some exporters store weights
    (the scalar 0.5 is no parameter)."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(rng.random((4, 3), np.float32), "w")),
        helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(np.zeros(3, np.float32), "bias")),
        helper.make_node("Constant", [], ["half"], value_float=0.5),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["z"]),
        helper.make_node("Mul", ["z", "half"], ["y"]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("case", ["cluster_4bit", "int8_dynamic", "pruned", "constant_weights"])
def test_describe_and_measure_count_the_same_params(case, lenet, tmp_path):
    """The model's record (``describe``) and its measured metrics (``measure``) give one parameter count."""
    model, data = lenet
    steps = {"cluster_4bit": {"method": "quantize", "scheme": "cluster", "bits": 4},
             "int8_dynamic": {"method": "quantize", "mode": "dynamic"},
             "pruned": {"method": "prune", "sparsity": 0.5}}
    if case == "constant_weights":
        m = _constant_weights_model()
        ev = EvalData({"x": np.ones((8, 4), np.float32)}, None)
    else:
        m = apply_step(steps[case], model, data, tmp_path).model
        ev = EvalData({"input": data.holdout.inputs["input"][:64]}, data.holdout.labels[:64])
    measured = measure(m, save(m, tmp_path / "m.onnx"), ev, latency_runs=5, threads=1)
    assert describe(m)["params"] == measured["params"]
    if case == "constant_weights":
        assert measured["params"] == measured["nonzero_params"] + 3 == 15  # W and b (zeros) count; 0.5 does not
    elif case == "pruned":
        assert measured["params"] == describe(model)["params"]
        assert measured["nonzero_params"] < 0.6 * measured["params"]
    elif case == "cluster_4bit":  # packed codes count as the weights they decode to, not as their bytes
        assert measured["params"] == describe(model)["params"] > count_params(m)[0]
