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


def macs(model: onnx.ModelProto, sample: dict[str, np.ndarray]) -> int:
    """Multiply-accumulates for one sample (``sample`` arrays have batch 1), Conv/Gemm/MatMul only."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    g = probe.graph
    existing = {o.name for o in g.output}
    inits = {t.name: list(t.dims) for t in g.initializer}
    wanted: list[str] = []
    for n in g.node:
        if n.op_type in _CONV_OPS | _MATMUL_OPS:
            for name in (n.input[0], n.input[1], n.output[0]):
                if name and name not in inits and name not in existing and name not in wanted:
                    wanted.append(name)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe).graph
        types = {vi.name: vi.type.tensor_type.elem_type for vi in list(inferred.value_info) + list(inferred.input)}
    except Exception:
        types = {}
    for name in wanted:
        g.output.append(helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.UNDEFINED), None))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    shapes = {k: list(np.shape(v)) for k, v in zip(out_names, sess.run(out_names, sample))}
    shapes.update({k: [int(d) for d in v] for k, v in inits.items()})
    shapes.update({k: list(np.shape(v)) for k, v in sample.items()})

    def shape(name: str) -> list[int]:
        return shapes[name]

    total = 0
    for n in model.graph.node:
        if n.op_type in ("Conv", "ConvInteger"):
            w = shape(n.input[1])
            total += int(np.prod(shape(n.output[0]))) * int(np.prod(w[1:]))
        elif n.op_type == "ConvTranspose":
            w = shape(n.input[1])
            total += int(np.prod(shape(n.input[0]))) * int(np.prod(w[1:]))
        elif n.op_type in ("MatMul", "MatMulInteger"):
            a = shape(n.input[0])
            total += int(np.prod(shape(n.output[0]))) * int(a[-1])
        elif n.op_type == "Gemm":
            a = shape(n.input[0])
            trans_a = next((at.i for at in n.attribute if at.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
            total += int(np.prod(shape(n.output[0]))) * int(k)
    return total


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    hist: dict[str, int] = {}
    for g in _graphs(model.graph):
        for n in g.node:
            hist[n.op_type] = hist.get(n.op_type, 0) + 1
    return dict(sorted(hist.items()))


def input_specs(model: onnx.ModelProto) -> list[dict[str, Any]]:
    from compression.modelio import describe

    return describe(model)["inputs"]
