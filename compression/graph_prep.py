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


# the inputs of a layer op that hold its parameters (weights, biases, norm scales), by op type
_LAYER_PARAM_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,),
                       "BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2),
                       "LayerNormalization": (1, 2)}


def unshare_initializers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy where a float initializer that several layers read as a parameter (weight, bias, norm scale)
    gets one copy per layer; other readers (a ``Shape`` of a weight) keep reading the first layer's.

    The TorchScript exporter stores equal tensors once: a model fresh from initialisation has all its folded
    conv biases zero, so dozens of convs read one bias. Channel pruning gives each layer its own width, so
    each needs its own tensor. Subgraphs are not touched.

    Returns:
        ``(model, copies made)``; the input unchanged when nothing is shared.
    """
    inits = {t.name: t for t in model.graph.initializer
             if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and int(np.prod(t.dims)) > 1}
    slots: dict[str, list[tuple[int, int]]] = {}
    for i, node in enumerate(model.graph.node):
        for j in _LAYER_PARAM_INPUTS.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ():
            if j < len(node.input) and node.input[j] in inits:
                slots.setdefault(node.input[j], []).append((i, j))
    shared = {name: where[1:] for name, where in slots.items() if len(where) > 1}
    if not shared:
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    taken = {t.name for t in out.graph.initializer} | {o for n in out.graph.node for o in n.output}
    copies = 0
    for name, where in shared.items():
        for k, (i, j) in enumerate(where, start=1):  # the first layer keeps the original
            new = f"{name}__copy{k}"
            while new in taken:
                new += "_"
            taken.add(new)
            t = onnx.TensorProto()
            t.CopyFrom(inits[name])
            t.name = new
            out.graph.initializer.append(t)
            out.graph.node[i].input[j] = new
            copies += 1
    return out, copies


def fold_identity_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy where each ``Identity`` of an initializer is replaced by an initializer of its own (named after
    the Identity's output).

    The TorchScript exporter writes a tensor equal to another as ``Identity(other)``: the converter then sees a
    conv whose bias is computed at run time, not a bias it can shrink with the conv's channels.

    Returns:
        ``(model, identities folded)``; the input unchanged when there are none.
    """
    inits = {t.name: t for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    fold = [n for n in model.graph.node
            if n.op_type == "Identity" and n.domain in ("", "ai.onnx") and n.input and n.input[0] in inits
            and n.output[0] not in outputs]
    if not fold:
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = {n.output[0] for n in fold}
    for node in fold:
        t = onnx.TensorProto()
        t.CopyFrom(inits[node.input[0]])
        t.name = node.output[0]
        out.graph.initializer.append(t)
    nodes = [n for n in out.graph.node if not (n.op_type == "Identity" and n.output and n.output[0] in names)]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out, len(fold)
