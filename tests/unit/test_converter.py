"""Tests for the ONNX -> trainable torch converter, always checked against ONNX Runtime numbers."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from testkit import zoo
from compression.converter import OnnxModule, UnsupportedOp, to_torch, unsupported_ops

ATOL = 1e-4
RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------ helpers
def ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_run(model: onnx.ModelProto | ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = model if isinstance(model, ort.InferenceSession) else ort_session(model)
    return sess.run(None, feeds)


def torch_run(module: OnnxModule, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*(torch.from_numpy(feeds[name]) for name in module.input_names))
    outs = out if isinstance(out, tuple) else (out,)
    return [o.detach().numpy() for o in outs]


def assert_matches_ort(model: onnx.ModelProto | ort.InferenceSession, module: OnnxModule,
                       feeds: dict[str, np.ndarray], atol: float = ATOL) -> None:
    expected = ort_run(model, feeds)
    actual = torch_run(module, feeds)
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual, strict=True):
        assert a.shape == e.shape
        assert a.dtype == e.dtype, (a.dtype, e.dtype)
        np.testing.assert_allclose(a, e, atol=atol, rtol=1e-5)


def single_node_model(
    op_type: str,
    inputs: dict[str, np.ndarray],
    *,
    inits: dict[str, np.ndarray] | None = None,
    node_inputs: Sequence[str] | None = None,
    n_outputs: int = 1,
    opset: int = 18,
    **attrs: Any,
) -> onnx.ModelProto:
    """One-node model; ``inits`` are initializers, ``node_inputs`` may contain "" for skipped inputs."""
    inits = inits or {}
    names = list(node_inputs) if node_inputs is not None else [*inputs, *inits]
    outputs = [f"out{i}" for i in range(n_outputs)]
    node = helper.make_node(op_type, names, outputs, **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
         for n, a in inputs.items()],
        [helper.make_empty_tensor_value_info(o) for o in outputs],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model)
    del model.graph.output[:]
    model.graph.output.extend(inferred.graph.output)
    return model


def f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def i64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


# ------------------------------------------------------------------------------ op coverage
# (id, op_type, graph inputs, initializers, extra kwargs incl. attributes/opset/node_inputs)
OP_CASES: list[tuple[str, str, dict, dict, dict]] = [
    ("add_broadcast", "Add", {"a": f32(2, 3, 4), "b": f32(4)}, {}, {}),
    ("div_int_trunc", "Div", {"a": i64([7, -7, 9, -9])}, {"b": i64([2, 2, -4, 4])}, {}),
    ("mod_int", "Mod", {"a": i64([7, -7, 9, -9])}, {"b": i64([3, 3, -4, 4])}, {}),
    ("mod_fmod", "Mod", {"a": f32(5), "b": np.full(5, 0.7, np.float32)}, {}, {"fmod": 1}),
    ("pow", "Pow", {"a": np.abs(f32(3, 4)) + 0.1}, {"b": np.float32(1.7)}, {}),
    ("max_variadic", "Max", {"a": f32(3, 4), "b": f32(4), "c": f32(3, 1)}, {}, {}),
    ("where", "Where", {"c": RNG.random((3, 4)) > 0.5, "a": f32(3, 4), "b": f32(4)}, {}, {}),
    ("clip_v11_inputs", "Clip", {"x": f32(3, 4)}, {"lo": np.float32(-0.5), "hi": np.float32(0.3)}, {}),
    ("clip_v11_max_only", "Clip", {"x": f32(3, 4)}, {"hi": np.float32(0.3)},
     {"node_inputs": ["x", "", "hi"]}),
    ("clip_v6_attrs", "Clip", {"x": f32(3, 4)}, {}, {"opset": 6, "min": -0.2, "max": 0.1}),
    ("leaky_relu", "LeakyRelu", {"x": f32(3, 4)}, {}, {"alpha": 0.2}),
    ("elu", "Elu", {"x": f32(3, 4)}, {}, {"alpha": 0.7}),
    ("selu", "Selu", {"x": f32(3, 4)}, {}, {}),
    ("hard_sigmoid", "HardSigmoid", {"x": f32(3, 4) * 4}, {}, {"alpha": 0.3}),
    ("hard_swish", "HardSwish", {"x": f32(3, 4) * 4}, {}, {}),
    ("softplus", "Softplus", {"x": f32(3, 4) * 4}, {}, {}),
    ("gelu", "Gelu", {"x": f32(3, 4)}, {}, {"opset": 20}),
    ("gelu_tanh", "Gelu", {"x": f32(3, 4)}, {}, {"opset": 20, "approximate": "tanh"}),
    ("prelu", "PRelu", {"x": f32(2, 3, 4)}, {"slope": f32(3, 1)}, {}),
    ("erf", "Erf", {"x": f32(3, 4)}, {}, {}),
    ("round_half_even", "Round", {"x": np.array([0.5, 1.5, 2.5, -0.5, 1.4], np.float32)}, {}, {}),
    ("cast_trunc", "Cast", {"x": np.array([1.7, -1.7, 2.2], np.float32)}, {}, {"to": TensorProto.INT64}),
    ("cast_like", "CastLike", {"x": np.array([1.7, -1.7], np.float32)}, {"t": i64([0])}, {}),
    ("equal", "Equal", {"a": i64([1, 2, 3])}, {"b": i64([1, 0, 3])}, {}),
    ("not", "Not", {"a": np.array([True, False])}, {}, {}),
    ("isnan", "IsNaN", {"a": np.array([1.0, np.nan], np.float32)}, {}, {}),
    ("dropout_mask", "Dropout", {"x": f32(3, 4)}, {}, {"n_outputs": 2}),
    # shapes & indexing
    ("shape_slice", "Shape", {"x": f32(2, 3, 4, 5)}, {}, {"start": 1, "end": -1}),
    ("size", "Size", {"x": f32(2, 3)}, {}, {}),
    ("reshape_zero_neg", "Reshape", {"x": f32(2, 3, 4)}, {"s": i64([0, -1])}, {}),
    ("reshape_allowzero", "Reshape", {"x": f32(2, 3, 4)}, {"s": i64([4, 6])}, {"allowzero": 1}),
    ("flatten_axis2", "Flatten", {"x": f32(2, 3, 4)}, {}, {"axis": 2}),
    ("flatten_neg", "Flatten", {"x": f32(2, 3, 4)}, {}, {"axis": -1}),
    ("transpose_default", "Transpose", {"x": f32(2, 3, 4)}, {}, {}),
    ("squeeze_v11", "Squeeze", {"x": f32(1, 3, 1, 4)}, {}, {"opset": 11, "axes": [0, -2]}),
    ("squeeze_v13", "Squeeze", {"x": f32(1, 3, 1, 4)}, {"ax": i64([2])}, {"opset": 13}),
    ("squeeze_all", "Squeeze", {"x": f32(1, 3, 1, 4)}, {}, {"opset": 13}),
    ("unsqueeze_v11", "Unsqueeze", {"x": f32(3, 4)}, {}, {"opset": 11, "axes": [0, -1]}),
    ("unsqueeze_v13", "Unsqueeze", {"x": f32(3, 4)}, {"ax": i64([1, -1])}, {"opset": 13}),
    ("concat", "Concat", {"a": f32(2, 3), "b": f32(2, 1)}, {}, {"axis": -1}),
    ("split_v11_attr", "Split", {"x": f32(6, 2)}, {}, {"opset": 11, "split": [1, 5], "n_outputs": 2}),
    ("split_v13_input", "Split", {"x": f32(2, 6)}, {"s": i64([2, 4])}, {"opset": 13, "axis": 1,
                                                                     "n_outputs": 2}),
    ("split_equal", "Split", {"x": f32(2, 6)}, {}, {"opset": 13, "axis": 1, "n_outputs": 3}),
    ("split_num_outputs", "Split", {"x": f32(7, 2)}, {}, {"opset": 18, "num_outputs": 3,
                                                        "n_outputs": 3}),
    ("slice_v9_attrs", "Slice", {"x": f32(5, 6)}, {}, {"opset": 9, "starts": [1, -4], "ends": [100, -1],
                                                     "axes": [0, 1]}),
    ("slice_v13_steps", "Slice", {"x": f32(5, 6, 3)},
     {"st": i64([-1, 1]), "en": i64([-100, 100]), "ax": i64([0, 1]), "sp": i64([-2, 2])}, {}),
    ("slice_v13_default_axes", "Slice", {"x": f32(5, 6)}, {"st": i64([1]), "en": i64([3])}, {}),
    ("gather_neg", "Gather", {"x": f32(5, 4)}, {"i": i64([[0, -1], [2, 3]])}, {"axis": 0}),
    ("gather_scalar", "Gather", {"x": f32(5, 4)}, {"i": np.int64(-2)}, {"axis": 1}),
    ("gather_elements", "GatherElements", {"x": f32(3, 4)}, {"i": i64([[0, -1], [2, 1], [3, 0]])},
     {"axis": 1}),
    ("gather_nd", "GatherND", {"x": f32(3, 4, 2)}, {"i": i64([[0, 1], [2, -1]])}, {}),
    ("gather_nd_batch", "GatherND", {"x": f32(2, 3, 4)}, {"i": i64([[[1]], [[2]]])}, {"batch_dims": 1}),
    ("scatter_nd", "ScatterND", {"x": f32(4, 3), "u": f32(2, 3)}, {"i": i64([[1], [3]])},
     {"node_inputs": ["x", "i", "u"]}),
    ("scatter_elements", "ScatterElements", {"x": f32(3, 3), "u": f32(2, 3)},
     {"i": i64([[1, 0, 2], [0, 2, 1]])}, {"node_inputs": ["x", "i", "u"]}),
    ("expand", "Expand", {"x": f32(3, 1)}, {"s": i64([2, 1, 4])}, {}),
    ("tile", "Tile", {"x": f32(2, 3)}, {"r": i64([2, 1])}, {}),
    ("constant_of_shape", "ConstantOfShape", {"s": i64([2, 3])}, {}, {
        "value": numpy_helper.from_array(np.array([7], np.int64))}),
    ("range_int", "Range", {}, {"a": np.int64(2), "b": np.int64(11), "c": np.int64(3)}, {}),
    ("range_float", "Range", {}, {"a": np.float32(0.5), "b": np.float32(2.0), "c": np.float32(0.25)}, {}),
    ("pad_constant_axes", "Pad", {"x": f32(2, 3, 4)}, {"p": i64([1, 0, 2, 1]), "v": np.float32(1.5),
                                                      "ax": i64([1, 2])}, {}),
    ("pad_reflect", "Pad", {"x": f32(1, 2, 4, 5)}, {"p": i64([0, 0, 1, 2, 0, 0, 2, 1])},
     {"mode": "reflect"}),
    ("pad_edge_v11", "Pad", {"x": f32(1, 2, 4)}, {"p": i64([0, 0, 2, 0, 0, 1])},
     {"mode": "edge", "opset": 11}),
    ("pad_v2_attrs", "Pad", {"x": f32(2, 3)}, {}, {"opset": 2, "pads": [1, 0, 0, 2], "value": -1.0}),
    ("trilu_lower", "Trilu", {"x": f32(2, 4, 4)}, {"k": np.int64(1)}, {"upper": 0}),
    ("nonzero", "NonZero", {"x": i64([[0, 1], [2, 0]])}, {}, {}),
    ("one_hot", "OneHot", {"i": i64([0, 2, -1])}, {"d": np.int64(4), "v": np.array([0.0, 3.0], np.float32)},
     {"axis": 0}),
    ("depth_to_space_dcr", "DepthToSpace", {"x": f32(1, 8, 2, 3)}, {}, {"blocksize": 2}),
    ("depth_to_space_crd", "DepthToSpace", {"x": f32(1, 8, 2, 3)}, {}, {"blocksize": 2, "mode": "CRD"}),
    ("space_to_depth", "SpaceToDepth", {"x": f32(1, 2, 4, 6)}, {}, {"blocksize": 2}),
    ("cumsum_excl_rev", "CumSum", {"x": f32(3, 4)}, {"a": np.int64(1)}, {"exclusive": 1, "reverse": 1}),
    # layers
    ("matmul_batched", "MatMul", {"a": f32(2, 3, 4), "b": f32(2, 4, 5)}, {}, {}),
    ("matmul_weight", "MatMul", {"a": f32(2, 3, 4)}, {"w": f32(4, 5)}, {}),
    ("gemm_all_attrs", "Gemm", {"a": f32(4, 3)}, {"b": f32(5, 4), "c": f32(5)},
     {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}),
    ("gemm_transb0_bias2d", "Gemm", {"a": f32(3, 4)}, {"b": f32(4, 5), "c": f32(1, 5)}, {}),
    ("gemm_dynamic_b", "Gemm", {"a": f32(3, 4), "b": f32(4, 5)}, {}, {}),
    ("conv_groups_asym_pads", "Conv", {"x": f32(2, 4, 7, 6)}, {"w": f32(6, 2, 3, 3), "b": f32(6)},
     {"group": 2, "pads": [0, 1, 2, 1], "strides": [2, 1], "dilations": [1, 2]}),
    ("conv_same_upper", "Conv", {"x": f32(1, 3, 7, 8)}, {"w": f32(4, 3, 3, 2)},
     {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ("conv_same_lower", "Conv", {"x": f32(1, 3, 7, 8)}, {"w": f32(4, 3, 4, 4)},
     {"auto_pad": "SAME_LOWER"}),
    ("conv1d", "Conv", {"x": f32(2, 3, 10)}, {"w": f32(5, 3, 3), "b": f32(5)}, {"pads": [1, 1]}),
    ("conv_dynamic_weight", "Conv", {"x": f32(1, 3, 6, 6), "w": f32(4, 3, 3, 3)}, {}, {"pads": [1, 0, 1, 2]}),
    ("conv_transpose", "ConvTranspose", {"x": f32(1, 4, 5, 5)}, {"w": f32(4, 3, 3, 3), "b": f32(3)},
     {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}),
    ("conv_transpose_asym", "ConvTranspose", {"x": f32(1, 4, 5, 5)}, {"w": f32(4, 2, 3, 3)},
     {"strides": [2, 2], "pads": [0, 1, 2, 1], "group": 1}),
    ("conv_transpose_output_shape", "ConvTranspose", {"x": f32(1, 2, 4, 4)}, {"w": f32(2, 3, 3, 3)},
     {"strides": [2, 2], "output_shape": [8, 8]}),
    ("batch_norm", "BatchNormalization", {"x": f32(2, 3, 4, 4)},
     {"s": f32(3), "b": f32(3), "m": f32(3), "v": np.abs(f32(3)) + 0.5}, {"epsilon": 1e-3}),
    ("batch_norm_1d", "BatchNormalization", {"x": f32(4, 3)},
     {"s": f32(3), "b": f32(3), "m": f32(3), "v": np.abs(f32(3)) + 0.5}, {}),
    ("layer_norm_axis", "LayerNormalization", {"x": f32(2, 3, 4)}, {"s": f32(3, 4), "b": f32(3, 4)},
     {"axis": -2}),
    ("layer_norm_stats", "LayerNormalization", {"x": f32(2, 3, 4)}, {"s": f32(4)}, {"n_outputs": 3}),
    ("instance_norm", "InstanceNormalization", {"x": f32(2, 3, 4, 5)}, {"s": f32(3), "b": f32(3)}, {}),
    ("group_norm_v21", "GroupNormalization", {"x": f32(2, 4, 3, 3)}, {"s": f32(4), "b": f32(4)},
     {"num_groups": 2, "opset": 21}),
    ("lp_norm", "LpNormalization", {"x": f32(3, 4)}, {}, {"axis": 1}),
    ("maxpool_ceil_asym", "MaxPool", {"x": f32(1, 2, 7, 7)}, {},
     {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 0, 1, 1], "ceil_mode": 1}),
    ("maxpool_same", "MaxPool", {"x": f32(1, 2, 7, 6)}, {},
     {"kernel_shape": [3, 2], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ("maxpool_dilated", "MaxPool", {"x": f32(1, 2, 8, 8)}, {},
     {"kernel_shape": [2, 2], "dilations": [2, 2], "pads": [1, 1, 1, 1]}),
    ("avgpool_exclude_pad", "AveragePool", {"x": f32(1, 2, 6, 6)}, {},
     {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]}),
    ("avgpool_include_pad", "AveragePool", {"x": f32(1, 2, 6, 6)}, {},
     {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    ("avgpool_asym_pads", "AveragePool", {"x": f32(1, 2, 6, 6)}, {},
     {"kernel_shape": [2, 2], "pads": [0, 1, 1, 0]}),
    ("global_avg_pool", "GlobalAveragePool", {"x": f32(2, 3, 4, 5)}, {}, {}),
    ("global_max_pool", "GlobalMaxPool", {"x": f32(2, 3, 4, 5)}, {}, {}),
    ("softmax_v11_coerce", "Softmax", {"x": f32(2, 3, 4)}, {}, {"opset": 11, "axis": 1}),
    ("softmax_v13", "Softmax", {"x": f32(2, 3, 4)}, {}, {"axis": 1}),
    ("log_softmax", "LogSoftmax", {"x": f32(2, 3, 4)}, {}, {}),
    ("hardmax", "Hardmax", {"x": f32(2, 3, 4)}, {}, {"axis": 1}),
    ("einsum", "Einsum", {"a": f32(2, 3, 4), "b": f32(2, 4, 5)}, {}, {"equation": "bij, bjk -> bik"}),
    ("resize_nearest_up", "Resize", {"x": f32(1, 2, 3, 4)},
     {"s": np.array([1, 1, 2, 1.5], np.float32)}, {"node_inputs": ["x", "", "s"]}),
    ("resize_nearest_asym_floor", "Resize", {"x": f32(1, 2, 6, 8)},
     {"s": np.array([1, 1, 0.5, 0.75], np.float32)},
     {"node_inputs": ["x", "", "s"], "coordinate_transformation_mode": "asymmetric",
      "nearest_mode": "floor"}),
    ("resize_linear_sizes", "Resize", {"x": f32(1, 2, 3, 4)}, {"z": i64([1, 2, 7, 5])},
     {"node_inputs": ["x", "", "", "z"], "mode": "linear"}),
    ("resize_linear_align", "Resize", {"x": f32(1, 2, 3, 4)}, {"s": np.array([1, 1, 2, 2], np.float32)},
     {"node_inputs": ["x", "", "s"], "mode": "linear", "coordinate_transformation_mode": "align_corners"}),
    ("resize_cubic", "Resize", {"x": f32(1, 1, 4, 4)}, {"s": np.array([1, 1, 2, 2], np.float32)},
     {"node_inputs": ["x", "", "s"], "mode": "cubic"}),
    # reductions
    ("reduce_mean_v13_attr", "ReduceMean", {"x": f32(2, 3, 4)}, {}, {"opset": 13, "axes": [-1]}),
    ("reduce_mean_v18_input", "ReduceMean", {"x": f32(2, 3, 4)}, {"a": i64([0, 2])}, {"keepdims": 0}),
    ("reduce_sum_v13", "ReduceSum", {"x": f32(2, 3, 4)}, {"a": i64([1])}, {"opset": 13}),
    ("reduce_sum_all", "ReduceSum", {"x": f32(2, 3, 4)}, {}, {"opset": 13, "keepdims": 0}),
    ("reduce_max_noop", "ReduceMax", {"x": f32(2, 3)}, {}, {"noop_with_empty_axes": 1}),
    ("reduce_min_v11", "ReduceMin", {"x": f32(2, 3, 4)}, {}, {"opset": 11, "axes": [0, 1]}),
    ("reduce_prod", "ReduceProd", {"x": f32(2, 3, 4)}, {"a": i64([0, 2])}, {}),
    ("reduce_l2", "ReduceL2", {"x": f32(2, 3, 4)}, {"a": i64([1])}, {}),
    ("reduce_logsumexp", "ReduceLogSumExp", {"x": f32(2, 3, 4)}, {"a": i64([2])}, {}),
    ("argmax_last", "ArgMax", {"x": np.array([[1, 3, 3], [2, 2, 0]], np.float32)}, {},
     {"axis": 1, "select_last_index": 1}),
    ("argmin_nokeep", "ArgMin", {"x": f32(3, 4)}, {}, {"axis": 0, "keepdims": 0}),
    ("topk", "TopK", {"x": f32(3, 6)}, {"k": i64([2])}, {"n_outputs": 2}),
]


@pytest.mark.parametrize(
    ("op_type", "inputs", "inits", "kwargs"),
    [pytest.param(*case[1:], id=case[0]) for case in OP_CASES],
)
def test_op_matches_onnxruntime(op_type: str, inputs: dict, inits: dict, kwargs: dict) -> None:
    model = single_node_model(op_type, inputs, inits=inits, **kwargs)
    assert unsupported_ops(model) == []
    assert_matches_ort(model, to_torch(model), inputs)


def test_weight_ops_become_layers() -> None:
    """Constant weights of Conv/Gemm/MatMul/BN are claimed as real torch layers, not loose tensors."""
    cases = {
        "conv_groups_asym_pads": nn.Conv2d,
        "conv1d": nn.Conv1d,
        "conv_transpose": nn.ConvTranspose2d,
        "gemm_transb0_bias2d": nn.Linear,
        "matmul_weight": nn.Linear,
    }
    by_id = {case[0]: case for case in OP_CASES}
    for case_id, layer_type in cases.items():
        _, op_type, inputs, inits, kwargs = by_id[case_id]
        module = to_torch(single_node_model(op_type, inputs, inits=inits, **kwargs))
        layers = list(module.weight_modules().values())
        assert len(layers) == 1 and type(layers[0]) is layer_type, case_id
    _, op_type, inputs, inits, kwargs = by_id["resize_nearest_up"]
    module = to_torch(single_node_model(op_type, inputs, inits=inits, **kwargs))
    assert list(module.parameters()) == []  # Resize scales are numbers, not weights
    _, op_type, inputs, inits, kwargs = by_id["batch_norm"]
    module = to_torch(single_node_model(op_type, inputs, inits=inits, **kwargs))
    assert [type(m) for m in module.norms.values()] == [nn.BatchNorm2d]
    assert len(list(module.parameters())) == 2  # weight, bias; running stats are buffers


def test_if_subgraph_reads_outer_scope() -> None:
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y_info = helper.make_empty_tensor_value_info("y")
    w = numpy_helper.from_array(f32(2, 3), "w")
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["t"])], "then", [], [
        helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 3])])
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "w"], ["e"])], "else", [], [
        helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.float32(0))),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
    ]
    graph = helper.make_graph(nodes, "g", [x_info], [y_info], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    module = to_torch(model)
    for sign in (1.0, -1.0):
        x = (np.abs(f32(2, 3)) * sign).astype(np.float32)
        assert_matches_ort(model, module, {"x": x})


def test_unsupported_ops_are_reported() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    inner = helper.make_graph([helper.make_node("NoSuchInnerOp", ["x"], ["t"])], "then", [], [
        helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("FancyFakeOp", ["r"], ["f"]),
        helper.make_node("Greater", ["f", "f"], ["c"]),
        helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=inner),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]))
    assert unsupported_ops(model) == ["FancyFakeOp", "NoSuchInnerOp"]
    with pytest.raises(UnsupportedOp) as info:
        to_torch(model)
    assert info.value.op_types == ["FancyFakeOp", "NoSuchInnerOp"]
    assert "FancyFakeOp" in str(info.value)


# --------------------------------------------------------------------------- zoo models
EXPORTERS = [pytest.param(True, id="dynamo"), pytest.param(False, id="legacy")]


@pytest.fixture(scope="module", params=EXPORTERS)
def cnn_onnx(request, tmp_path_factory) -> onnx.ModelProto:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    zoo.export_onnx(zoo.SmallCNN(), torch.randn(2, 1, 28, 28), path, dynamo=request.param)
    return onnx.load(path)


@pytest.fixture(scope="module", params=EXPORTERS)
def lenet_onnx(request, tmp_path_factory) -> onnx.ModelProto:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("lenet") / "lenet.onnx"
    zoo.export_onnx(zoo.LeNet300100(), torch.randn(2, 784), path, dynamo=request.param)
    return onnx.load(path)


def _check_model(model: onnx.ModelProto, input_shape: tuple[int, ...],
                 layer_types: list[type[nn.Module]]) -> None:
    module = to_torch(model)
    layers = module.weight_modules()
    assert sorted(type(m).__name__ for m in layers.values()) == sorted(t.__name__ for t in layer_types)
    for batch in (3, 5):
        x = RNG.standard_normal((batch, *input_shape)).astype(np.float32)
        assert_matches_ort(model, module, {module.input_names[0]: x})

    x = torch.from_numpy(RNG.standard_normal((3, *input_shape)).astype(np.float32))
    logits = module(x)
    loss = nn.functional.cross_entropy(logits, torch.tensor([1, 4, 7]) % logits.shape[-1])
    loss.backward()
    for name, layer in layers.items():
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0, name
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_small_cnn_matches_ort_and_trains(cnn_onnx: onnx.ModelProto) -> None:
    _check_model(cnn_onnx, (1, 28, 28), [nn.Conv2d, nn.Conv2d, nn.Linear, nn.Linear])
    assert len(to_torch(cnn_onnx).weight_modules()) == 4


def test_lenet_matches_ort_and_trains(lenet_onnx: onnx.ModelProto) -> None:
    _check_model(lenet_onnx, (784,), [nn.Linear] * 3)


def _structure(node: onnx.NodeProto) -> bytes:
    """Node without tensor payloads: write_back may change Constant-node weights, nothing else."""
    copy_ = onnx.NodeProto()
    copy_.CopyFrom(node)
    for attr in copy_.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            attr.t.ClearField("raw_data")
            attr.t.ClearField("float_data")
    return copy_.SerializeToString()


def _assert_same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    assert [t.name for t in a.graph.initializer] == [t.name for t in b.graph.initializer]
    assert [_structure(n) for n in a.graph.node] == [_structure(n) for n in b.graph.node]
    assert a.graph.input == b.graph.input and a.graph.output == b.graph.output
    for ta, tb in zip(a.graph.initializer, b.graph.initializer, strict=True):
        assert (ta.data_type, list(ta.dims)) == (tb.data_type, list(tb.dims)), ta.name


def test_write_back_round_trip_cnn(cnn_onnx: onnx.ModelProto) -> None:
    module = to_torch(cnn_onnx)
    layers = module.weight_modules()
    convs = [m for m in layers.values() if isinstance(m, nn.Conv2d)]
    linears = [m for m in layers.values() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        linears[0].weight[:, : linears[0].in_features // 2] = 0.0
        convs[0].weight.add_(0.1 * torch.randn_like(convs[0].weight))
        convs[1].bias.add_(0.5)
    written = module.write_back(cnn_onnx)
    onnx.checker.check_model(written)
    _assert_same_graph(cnn_onnx, written)
    x = RNG.standard_normal((4, 1, 28, 28)).astype(np.float32)
    feeds = {module.input_names[0]: x}
    assert_matches_ort(written, module, feeds)
    assert np.abs(ort_run(written, feeds)[0] - ort_run(cnn_onnx, feeds)[0]).max() > 1e-3
    # Converting the written model reproduces the edited weights exactly.
    again = to_torch(written)
    for name, layer in again.weight_modules().items():
        torch.testing.assert_close(layer.weight, layers[name].weight, rtol=0, atol=0)


def test_write_back_undoes_layout_transforms() -> None:
    """MatMul [K,N] weights, fused Add bias, Gemm transB=0 with [1,N] C and BN stats all map back."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])
    inits = {
        "conv_w": f32(4, 3, 3, 3), "bn_s": f32(4), "bn_b": f32(4), "bn_m": f32(4),
        "bn_v": np.abs(f32(4)) + 0.5, "shape": i64([0, -1]), "mm_w": f32(64, 8), "mm_b": f32(8),
        "gemm_b": f32(8, 5), "gemm_c": f32(1, 5),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c"], pads=[0, 0, 0, 0]),
        helper.make_node("BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "mm_w"], ["mm"]),
        helper.make_node("Add", ["mm_b", "mm"], ["h"]),  # bias first: fusion must handle either order
        helper.make_node("Tanh", ["h"], ["t"]),
        helper.make_node("Gemm", ["t", "gemm_b", "gemm_c"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    module = to_torch(model)
    layers = module.weight_modules()
    assert sorted(type(m).__name__ for m in layers.values()) == ["Conv2d", "Linear", "Linear"]
    mm = next(m for m in layers.values() if isinstance(m, nn.Linear) and m.in_features == 64)
    assert mm.bias is not None and mm.weight.shape == (8, 64)  # Add bias fused into the Linear
    feeds = {"x": f32(2, 3, 6, 6)}
    assert_matches_ort(model, module, feeds)

    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
        bn = next(iter(module.norms.values()))
        bn.running_mean.add_(0.3)
        bn.running_var.mul_(1.5)
    written = module.write_back(model)
    onnx.checker.check_model(written)
    _assert_same_graph(model, written)
    assert_matches_ort(written, module, feeds)
    values = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    np.testing.assert_array_equal(values["mm_w"], mm.weight.detach().numpy().T)
    np.testing.assert_array_equal(values["mm_b"], mm.bias.detach().numpy())
    np.testing.assert_array_equal(values["bn_m"], bn.running_mean.numpy())
    np.testing.assert_array_equal(values["shape"], inits["shape"])


def test_constant_node_weights_are_trainable_and_written_back() -> None:
    """Some exporters store weights in Constant nodes; they become layers and write_back updates them."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(f32(4, 3), "w")),
        helper.make_node("Constant", [], ["half"], value_float=0.5),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Mul", ["h", "half"], ["y"]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    module = to_torch(model)
    (layer,) = module.weight_modules().values()
    assert isinstance(layer, nn.Linear) and len(list(module.parameters())) == 1
    with torch.no_grad():
        layer.weight.mul_(-2.0)
    written = module.write_back(model)
    _assert_same_graph(model, written)
    feeds = {"x": f32(2, 4)}
    assert_matches_ort(written, module, feeds)
    np.testing.assert_allclose(ort_run(written, feeds)[0], -2.0 * ort_run(model, feeds)[0], rtol=1e-5)


def test_module_is_copyable_and_serializable(lenet_onnx: onnx.ModelProto, tmp_path) -> None:
    """Pruning/quantization tools deepcopy modules; the interpreter must not capture stale objects."""
    module = to_torch(lenet_onnx)
    clone = copy.deepcopy(module)
    with torch.no_grad():
        next(iter(clone.weight_modules().values())).weight.zero_()
    x = torch.randn(2, 784)
    assert not torch.allclose(clone(x), module(x))
    torch.save(module, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    torch.testing.assert_close(loaded(x), module(x))


class _MixedNet(nn.Module):
    """Exercises what exporters emit beyond the zoo models: depthwise/transposed/1-d convs, resize,
    adaptive pooling, split, embeddings, LayerNorm and nn.MultiheadAttention."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.conv1d = nn.Conv1d(4, 4, 3, padding=1)
        self.emb = nn.Embedding(10, 16)
        self.ln = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.hardswish(self.bn(self.conv(x)))
        y = nn.functional.relu6(self.depthwise(y)) + y
        y = nn.functional.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        y = nn.functional.interpolate(y, scale_factor=0.5, mode="nearest")
        y = nn.functional.adaptive_avg_pool2d(self.up(y), (4, 4)).flatten(2)
        a, b = self.conv1d(y).chunk(2, dim=1)
        y = torch.cat([a.sigmoid() * b, a], 1)
        y = self.ln(y + self.emb(torch.arange(4))[None])
        y, _ = self.attn(y, y, y)
        return nn.functional.log_softmax(self.fc(nn.functional.gelu(y).mean(1)).clamp(-3, 3), -1)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_mixed_layers_match_ort_and_train(dynamo: bool, tmp_path) -> None:
    torch.manual_seed(0)
    path = zoo.export_onnx(_MixedNet(), torch.randn(2, 3, 16, 16), tmp_path / "m.onnx", dynamo=dynamo)
    model = onnx.load(path)
    kinds = sorted(type(m).__name__ for m in to_torch(model).weight_modules().values())
    assert kinds == ["Conv1d", "Conv2d", "Conv2d", "ConvTranspose2d", "Linear", "Linear", "Linear"]
    _check_model(model, (3, 16, 16), [getattr(nn, k) for k in kinds])


# ------------------------------------------------------------------------------ MiniLM
@pytest.fixture(scope="module", params=EXPORTERS)
def minilm_onnx(request, tmp_path_factory) -> onnx.ModelProto:
    path = tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    zoo.export_minilm(path, dynamo=request.param, seq_len=16)
    return onnx.load(path)


@pytest.mark.slow
def test_minilm_matches_ort_trains_and_writes_back(minilm_onnx: onnx.ModelProto) -> None:
    model = minilm_onnx
    module = to_torch(model)
    assert module.input_names == ["input_ids", "attention_mask"]
    feeds = zoo.minilm_example_inputs(zoo.MINILM_EXAMPLE_SENTENCES, seq_len=16)
    assert (feeds["attention_mask"] == 0).any()  # the example really is padded
    session = ort_session(model)
    assert_matches_ort(session, module, feeds)
    other = zoo.minilm_example_inputs(["a", "much longer third sentence here", "b c"], seq_len=9)
    assert_matches_ort(session, module, other)  # dynamic batch and sequence axes

    # Every MatMul with a constant weight is an nn.Linear: 6 layers x (Q, K, V, O, FFN-in, FFN-out).
    # The pooler is not in the graph because only last_hidden_state is exported.
    inits = {t.name for t in model.graph.initializer}
    const_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(const_matmuls) == 36
    assert not any("pooler" in name for name in inits)
    layers = module.weight_modules()
    assert len(layers) == 36 and all(type(m) is nn.Linear for m in layers.values())
    assert all(m.bias is not None for m in layers.values())  # MatMul+Add bias fused
    word = "bert.embeddings.word_embeddings.weight"
    assert module.tensor_name(word) in dict(module.named_parameters())

    ids, mask = (torch.from_numpy(feeds[n]) for n in module.input_names)
    out = module(ids, mask)
    loss = (out * mask[..., None]).square().mean()
    loss.backward()
    for name, layer in layers.items():
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0, name
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert module.initializer_value(word).requires_grad

    before = out.detach().clone()
    torch.optim.SGD(module.parameters(), lr=0.5).step()
    with torch.no_grad():
        after = module(ids, mask)
    assert (after - before).abs().max() > 1e-3

    written = module.write_back(model)
    onnx.checker.check_model(written)
    _assert_same_graph(model, written)
    assert_matches_ort(written, module, feeds)


# ------------------------------------------------------------------- structural changes (pruning)
def test_reshape_groups_and_follow_rules():
    from compression.converter.ops_shape import follow_reshape, reshape_groups

    assert reshape_groups((2, 32, 7, 7), (2, 1568)) == [([0], [0]), ([1, 2, 3], [1])]
    assert reshape_groups((2, 16, 384), (2, 16, 12, 32)) == [([0], [0]), ([1], [1]), ([2], [2, 3])]
    # Merge: the product of the live dims; the batch follows too.
    assert follow_reshape(((2, 32, 7, 7), (2, 1568)), (5, 16, 7, 7)) == [5, 784]
    # Split: the inner size (head dim) stays, the outer one (head count) absorbs the change.
    assert follow_reshape(((2, 16, 384), (2, 16, 12, 32)), (2, 16, 320)) == [2, 16, 10, 32]
    # Batch or sequence changes alone are the graph's own business.
    assert follow_reshape(((2, 16, 384), (2, 16, 12, 32)), (8, 20, 384)) is None
    # ... except while running: a fixed-batch graph's baked batch follows the batch fed to it.
    assert follow_reshape(((1, 64, 84), (1, 4, 16, 84)), (64, 64, 84), pass_through=True) == [64, 4, 16, 84]


@pytest.mark.parametrize("dynamo", [True, False])
def test_export_resized_rewrites_baked_reshape_and_keeps_dynamic_batch(dynamo, tmp_path):
    """Shrink conv2's filters by hand: the dynamo graph's Reshape([-1, 1568]) must follow (to 784)."""
    torch.manual_seed(0)
    net = zoo.SmallCNN().eval()
    model = onnx.load(str(zoo.export_onnx(net, torch.zeros(2, 1, 28, 28), tmp_path / "m.onnx", dynamo=dynamo)))
    module = to_torch(model)
    example = torch.randn(2, 1, 28, 28)
    module.record_shapes(example)
    convs = [m for m in module.weight_modules().values() if isinstance(m, nn.Conv2d)]
    fc = [m for m in module.weight_modules().values() if isinstance(m, nn.Linear)][0]
    keep = torch.arange(16)
    with torch.no_grad():
        convs[1].weight = nn.Parameter(convs[1].weight[keep].clone())
        convs[1].bias = nn.Parameter(convs[1].bias[keep].clone())
        convs[1].out_channels = 16
        fc.weight = nn.Parameter(fc.weight.reshape(128, 32, 49)[:, keep].reshape(128, 784).clone())
        fc.in_features = 784
    with pytest.raises(ValueError, match="write_back only supports weight-level"):
        module.write_back(model)
    out = module.export_resized(model, example)
    onnx.checker.check_model(out)
    sess = ort_session(out)
    for n in (1, 3, 8):
        x = RNG.standard_normal((n, 1, 28, 28)).astype(np.float32)
        np.testing.assert_allclose(ort_run(sess, {"input": x})[0], torch_run(module, {"input": x})[0], atol=1e-4)
    assert not [v for v in out.graph.value_info if v.name not in {"input", "logits"}]
