"""Graph preparation for models from other exporters: ``Constant`` weights lifted into initializers, the
opset raised where a technique needs a newer op.

paddle2onnx keeps every weight in a ``Constant`` node and writes opset 11/12; tf2onnx writes opset 13-15; some
detectors fix the batch to 1. ONNX Runtime's quantizer only quantizes initializers as weights (``quantize_dynamic``
refuses a Conv whose weight is not one), and its per-channel QDQ writes ``DequantizeLinear`` with ``axis``,
which only opset 13 has. What is here rewrites a graph without changing what it computes.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

# ``QuantizeLinear``/``DequantizeLinear`` take ``axis`` (per-channel scales) from this opset on
PER_CHANNEL_QDQ_OPSET = 13

# ``Constant`` attributes that hold a plain tensor, and the numpy dtype of the scalar/list ones
_SCALAR_ATTRS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}


def opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (``ai.onnx``) opset version."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def lift_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy with the main graph's tensor ``Constant`` nodes turned into initializers of the same name.

    The two are the same value to every consumer; quantizers, though, treat only initializers as weights.
    ``sparse_value`` and string constants are left as nodes; subgraphs (If/Loop bodies) are not touched.

    Returns:
        ``(model, lifted)``; the input is returned unchanged when there is nothing to lift.

    Example:
        >>> lifted, n = lift_constants(onnx.load("paddle_rec.onnx"))  # doctest: +SKIP
        >>> n, len(lifted.graph.initializer)  # doctest: +SKIP
        (52, 52)
    """
    tensors: dict[int, onnx.TensorProto] = {}
    for i, node in enumerate(model.graph.node):
        t = _constant_value(node)
        if t is not None:
            tensors[i] = t
    if not tensors:
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = [n for i, n in enumerate(out.graph.node) if i not in tensors]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(tensors.values())
    out.ir_version = max(out.ir_version, 4)  # initializers that are not graph inputs
    return out, len(tensors)


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """A ``Constant`` node's value as a tensor named after its output, or None (not a plain tensor)."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
        if attr.t.data_type == onnx.TensorProto.STRING:
            return None
        t = onnx.TensorProto()
        t.CopyFrom(attr.t)
        t.name = node.output[0]
        return t
    if attr.name in _SCALAR_ATTRS:
        value = np.asarray(helper.get_attribute_value(attr), dtype=_SCALAR_ATTRS[attr.name])
        return numpy_helper.from_array(value, node.output[0])
    return None


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """The model converted to opset ``target`` by ONNX's version converter (unchanged when already there).

    Raises:
        Exception: whatever the converter or the checker raises; the caller decides what to do instead.
    """
    if opset(model) >= target:
        return model
    from onnx import version_converter

    out = version_converter.convert_version(model, target)
    onnx.checker.check_model(out)
    return out
