"""Which Conv/Gemm/MatMul nodes of an ONNX graph can be factored, and why the others cannot.

The techniques plan on these facts (a layer's weight, its shape, the reason it is left alone) before any
SVD is taken; :mod:`compression.techniques.factorization.surgery` rewrites the layers they choose.

Example:
    >>> [la.name for la in find_layers(name_nodes(model)) if la.reason is None]  # doctest: +SKIP
    ['/net/net.0/Gemm', '/net/net.2/Gemm']
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compression.techniques.factorization.svd import spatial_matrix

FACTORABLE_OPS = ("Gemm", "MatMul", "Conv")


@dataclass
class Layer:
    """A Conv/Gemm/MatMul node seen by the factorisations: what it is, and why it cannot be factored."""

    name: str
    op_type: str
    index: int  # position in graph.node
    weight: str | None = None  # initializer name
    shape: list[int] = field(default_factory=list)  # the weight's ONNX shape
    reason: str | None = None  # None: can be factored
    node_ref: onnx.NodeProto | None = None

    def matrix(self, inits: dict[str, np.ndarray]) -> np.ndarray:
        """The weight as the matrix whose SVD is taken (``[in, out]``; spatial matrix for convs)."""
        w = inits[self.weight]
        if self.op_type == "Conv":
            return spatial_matrix(w)
        if self.op_type == "Gemm" and node_attribute(self.node_ref, "transB", 0):
            return w.T
        return w

    def weight_from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`matrix`: a (truncated) matrix back in the weight's ONNX layout, so a rank can
        be tried by swapping the weight's values without rewriting the graph (the sensitivity scan)."""
        if self.op_type == "Conv":
            cout, cin, kh, kw = self.shape
            return np.ascontiguousarray(matrix.reshape(cin, kh, cout, kw).transpose(2, 0, 1, 3))
        if self.op_type == "Gemm" and node_attribute(self.node_ref, "transB", 0):
            return np.ascontiguousarray(matrix.T)
        return matrix


def node_attribute(node: onnx.NodeProto | None, name: str, default: Any) -> Any:
    """The value of ``node``'s attribute ``name`` (``default`` when absent or when there is no node)."""
    if node is None:
        return default
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where every top-level node has a unique name (``OpType_index`` for unnamed ones),
    so layers can be named in specs and reports."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    taken = {n.name for n in out.graph.node if n.name}
    for i, node in enumerate(out.graph.node):
        if not node.name:
            node.name = unique_name(f"{node.op_type}_{i}", taken)
    return out


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Top-level initializers as numpy arrays, by name."""
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def find_layers(model: onnx.ModelProto) -> list[Layer]:
    """Every Conv/Gemm/MatMul node of the top-level graph, with ``reason`` set where no factorisation
    applies whatever the settings (dynamic weight, 3-D conv, ...). ``model`` must have named nodes."""
    inits = {t.name: t for t in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input}
    constants = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    layers = []
    for i, node in enumerate(model.graph.node):
        if node.op_type not in FACTORABLE_OPS or node.domain not in ("", "ai.onnx"):
            continue
        layer = Layer(node.name, node.op_type, i, node_ref=node)
        layers.append(layer)
        if len(node.input) < 2:
            layer.reason = "fewer than two inputs"
            continue
        if node.op_type == "MatMul" and node.input[0] in inits and node.input[1] not in inits:
            layer.reason = "constant on the left (W·x): only x·W is factored"
            continue
        w = inits.get(node.input[1])
        if w is None:
            layer.reason = ("weight is a Constant node's output (only initializers are factored)"
                            if node.input[1] in constants else "weight is computed at run time (not an initializer)")
            continue
        if node.input[1] in graph_inputs:
            layer.reason = "weight is also a graph input (can be overridden at run time)"
            continue
        if node.input[0] in inits:
            layer.reason = "both operands are constants"
            continue
        if w.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            layer.reason = f"weight dtype {onnx.TensorProto.DataType.Name(w.data_type)} is not float"
            continue
        layer.weight, layer.shape = node.input[1], [int(d) for d in w.dims]
        if node.op_type in ("Gemm", "MatMul"):
            if len(layer.shape) != 2:
                layer.reason = f"weight is {len(layer.shape)}-D, not a matrix"
            continue
        if len(layer.shape) == 5:
            layer.reason = "3-D convolution"
        elif len(layer.shape) != 4:
            layer.reason = f"{len(layer.shape) - 2}-D convolution (only 2-D convs are factored)"
        elif int(node_attribute(node, "group", 1)) != 1:
            layer.reason = f"grouped convolution (group={node_attribute(node, 'group', 1)})"
    return layers


# Ops that pass a layer's result on to a graph output without another learned layer in between: a bias add,
# activations, Softmax, reshapes, casts. A layer followed only by these is the model's head (its classifier).
_HEAD_PASS_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Softmax", "LogSoftmax",
    "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Cast", "Dropout", "Concat",
})


def output_layers(model: onnx.ModelProto) -> dict[str, str]:
    """The top-level Conv/Gemm/MatMul nodes whose output reaches a graph output through :data:`_HEAD_PASS_OPS`
    only — the classifier (or a detector's heads): node name -> the graph output it feeds.

    Example:
        >>> output_layers(name_nodes(lenet))  # doctest: +SKIP
        {'node_linear_2': 'linear_2'}
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    reach: dict[str, str] = {}  # value -> the graph output it flows into unchanged by a learned layer
    todo = [(o.name, o.name) for o in model.graph.output]
    heads: dict[str, str] = {}
    while todo:
        value, out = todo.pop()
        if value in reach:
            continue
        reach[value] = out
        node = producer.get(value)
        if node is None:
            continue
        if node.op_type in FACTORABLE_OPS:
            heads.setdefault(node.name, out)
        elif node.op_type in _HEAD_PASS_OPS:
            todo.extend((i, out) for i in node.input if i)
    return heads


def conv_auto_pad(node: onnx.NodeProto) -> str:
    """A Conv's ``auto_pad`` as text (``NOTSET`` when absent or empty)."""
    value = node_attribute(node, "auto_pad", "NOTSET")
    value = value.decode() if isinstance(value, bytes) else str(value)
    return value or "NOTSET"


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, … : the first not in ``taken``, which it joins."""
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name

