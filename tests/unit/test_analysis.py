"""Parameter and MAC counts (compression/analysis.py) whether weights sit in initializers or in Constant nodes."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compression.analysis import macs, measured_shapes, node_macs, param_counts
from testkit.helpers import initializers_to_constants, run_ort


def _half_zeroed(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every weight matrix with its smaller half zeroed, so nonzeros differ from params."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        w = numpy_helper.to_array(t).copy()
        if w.ndim == 2:
            w[np.abs(w) < np.median(np.abs(w))] = 0
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    return out


def test_weights_in_constant_nodes_count_as_in_initializers(lenet):
    model, data = lenet
    model = _half_zeroed(model)
    const = initializers_to_constants(model)
    onnx.checker.check_model(const)
    assert not const.graph.initializer and {n.op_type for n in const.graph.node[:4]} == {"Constant"}
    x = data.holdout.inputs["input"][:5]
    assert np.array_equal(run_ort(const, x), run_ort(model, x))  # the same graph
    params, nonzero = param_counts(model)
    assert params == 266610 and nonzero < params * 0.6  # 784·300 + 300·100 + 100·10 weights, 410 biases
    assert param_counts(const) == (params, nonzero)
    # MACs: the weights' shapes come from the Constant nodes (measured), node by node
    sample = {"input": x[:1]}
    assert macs(const, sample) == macs(model, sample) == 266200
    shapes = measured_shapes(const, sample)
    per_node = [node_macs(n, shapes) for n in const.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert sorted(per_node) == [1000, 30000, 235200]


def test_a_shared_weight_counts_once_and_settings_do_not_count():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("MatMul", ["a", "w"], ["b"]),
             helper.make_node("Reshape", ["b", "shape"], ["c"]),
             helper.make_node("Resize", ["c", "", "scales"], ["y"], mode="nearest")]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([1, 1, 4, 1], np.int64), "shape"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    const = initializers_to_constants(model)
    x = rng.normal(size=(1, 4)).astype(np.float32)
    assert run_ort(const, x).shape == run_ort(model, x).shape == (1, 1, 8, 2)
    # w once (16) though two MatMuls use it; the Resize scales and the Reshape shape are settings
    assert param_counts(model) == param_counts(const) == (16, 16)
    assert macs(const, {"x": x}) == macs(model, {"x": x}) == 2 * 16


def test_recurrent_macs_count_both_projections_of_every_step():
    """A bidirectional LSTM over T steps: T × N × 2 directions × 4 gates × H × (I + H) multiply-accumulates."""
    t, i, h = 7, 5, 3
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(2, 4 * h, i)).astype(np.float32), "W")
    r = numpy_helper.from_array(rng.normal(size=(2, 4 * h, h)).astype(np.float32), "R")
    node = helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=h, direction="bidirectional")
    graph = helper.make_graph([node], "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [t, "n", i])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, r])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert macs(model, {"x": np.zeros((t, 1, i), np.float32)}) == t * 1 * 2 * 4 * h * (i + h)
