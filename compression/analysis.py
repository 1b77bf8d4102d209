"""Static facts about an ONNX model: parameters, nonzeros, and MACs per sample.

MACs are counted from *measured* shapes: the model is run once at batch 1 in ONNX Runtime with the
inputs and outputs of every Conv/Gemm/MatMul exposed as extra outputs, so dynamic shapes (sequence
lengths, reshapes the shape inference cannot follow) are counted as they really execute.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

_WEIGHT_TYPES = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE,
    onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
}
_QPARAM_OPS = {"QuantizeLinear", "DequantizeLinear"}
_CONV_OPS = {"Conv", "ConvInteger", "ConvTranspose"}
_MATMUL_OPS = {"MatMul", "MatMulInteger", "Gemm"}


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def weight_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Initializers that hold learned values (not shapes, not quantization scales/zero points)."""
    for g in _graphs(model.graph):
        qparams = {n.input[i] for n in g.node if n.op_type in _QPARAM_OPS for i in (1, 2) if len(n.input) > i}
        # int32 tensors dequantized by DequantizeLinear are quantized biases: learned values too.
        dq_data = {n.input[0] for n in g.node if n.op_type == "DequantizeLinear"}
        for t in g.initializer:
            learned = t.data_type in _WEIGHT_TYPES or (t.data_type == onnx.TensorProto.INT32 and t.name in dq_data)
            if learned and t.name not in qparams and int(np.prod(t.dims)) > 1:
                yield t


def count_params(model: onnx.ModelProto) -> tuple[int, int]:
    """``(params, nonzero_params)``; a quantized zero (value == zero point) counts as zero.

    Example:
        >>> count_params(onnx.load("model.onnx"))  # doctest: +SKIP
        (421834, 210917)
    """
    zero_points: dict[str, int] = {}
    for g in _graphs(model.graph):
        inits = {t.name: t for t in g.initializer}
        for n in g.node:
            if n.op_type == "DequantizeLinear" and len(n.input) > 2 and n.input[2] in inits:
                zp = numpy_helper.to_array(inits[n.input[2]])
                if zp.size == 1 or np.all(zp == zp.flat[0]):
                    zero_points[n.input[0]] = int(zp.flat[0])
    params = nonzero = 0
    for t in weight_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:  # weights not loaded (an upload checked lazily):
            n = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1  # the shape counts; zeros unknown
            params += n
            nonzero += n
            continue
        arr = numpy_helper.to_array(t)
        params += arr.size
        nonzero += int(np.count_nonzero(arr != zero_points.get(t.name, 0)))
    return params, nonzero


MAC_OPS = _CONV_OPS | _MATMUL_OPS


def measured_shapes(model: onnx.ModelProto, sample: dict[str, np.ndarray], *,
                    every_value: bool = False) -> dict[str, list[int]]:
    """Shapes of the main graph's values as ONNX Runtime produces them on ``sample`` (batch 1).

    Measured rather than inferred: shape inference cannot follow every reshape or dynamic dimension, and
    MACs must count what really executes. Initializers and the sample's arrays are included.

    Args:
        model: the model (not modified: a copy is probed).
        sample: one array per graph input, batch 1.
        every_value: expose every node output (what cut-point search needs), not only the operands and
            results of the MAC ops (``Conv``, ``Gemm``, ``MatMul`` and their integer variants).

    Returns:
        Value name -> shape.

    Example:
        >>> measured_shapes(model, {"input": x[:1]})["/fc/Gemm_output_0"]  # doctest: +SKIP
        [1, 10]
    """
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    g = probe.graph
    inits = {t.name: [int(d) for d in t.dims] for t in g.initializer}
    skip = set(inits) | {o.name for o in g.output}
    wanted: dict[str, None] = {}  # ordered and de-duplicated
    for n in g.node:
        if every_value:
            names = list(n.output)
        elif n.op_type in MAC_OPS:
            names = [n.input[0], n.input[1], n.output[0]]
        else:
            continue
        wanted.update((name, None) for name in names if name and name not in skip)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe).graph
        types = {vi.name: vi.type.tensor_type.elem_type for vi in [*inferred.value_info, *inferred.input]}
    except Exception:
        types = {}
    for name in wanted:
        g.output.append(helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.UNDEFINED), None))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    shapes = {k: list(np.shape(v)) for k, v in zip(out_names, sess.run(out_names, sample))}
    shapes.update(inits)
    shapes.update({k: list(np.shape(v)) for k, v in sample.items()})
    return shapes


def node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """Multiply-accumulates per sample of one node, from measured shapes (:func:`measured_shapes`).

    The one counting rule of the project: Conv (and ConvInteger) = output elements × weight elements per
    output channel; ConvTranspose = input elements × the same; MatMul (and MatMulInteger) and Gemm =
    output elements × the reduced dimension. Every other op counts 0.

    Raises:
        KeyError: a shape the count needs is not in ``shapes``.

    Example:
        >>> node_macs(gemm, {"x": [1, 784], "w": [300, 784], "y": [1, 300]})  # doctest: +SKIP
        235200
    """
    if node.op_type in ("Conv", "ConvInteger"):
        return int(np.prod(shapes[node.output[0]])) * int(np.prod(shapes[node.input[1]][1:]))
    if node.op_type == "ConvTranspose":
        return int(np.prod(shapes[node.input[0]])) * int(np.prod(shapes[node.input[1]][1:]))
    if node.op_type in ("MatMul", "MatMulInteger"):
        return int(np.prod(shapes[node.output[0]])) * int(shapes[node.input[0]][-1])
    if node.op_type == "Gemm":
        a = shapes[node.input[0]]
        trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
        return int(np.prod(shapes[node.output[0]])) * int(a[0] if trans_a else a[-1])
    return 0


def macs(model: onnx.ModelProto, sample: dict[str, np.ndarray]) -> int:
    """Multiply-accumulates for one sample (``sample`` arrays have batch 1), Conv/Gemm/MatMul only."""
    shapes = measured_shapes(model, sample)
    return sum(node_macs(n, shapes) for n in model.graph.node)


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    hist: dict[str, int] = {}
    for g in _graphs(model.graph):
        for n in g.node:
            hist[n.op_type] = hist.get(n.op_type, 0) + 1
    return dict(sorted(hist.items()))


def input_specs(model: onnx.ModelProto) -> list[dict[str, Any]]:
    from compression.modelio import describe

    return describe(model)["inputs"]
