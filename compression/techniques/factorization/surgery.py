"""The ONNX graph surgery behind ``lowrank`` and ``depthwise_separable``: each chosen node becomes two.

Pure functions of ``onnx.ModelProto`` copies; the factors come from
:mod:`compression.techniques.factorization.svd`. In the graph, ``MatMul(x, W)`` becomes
``MatMul(MatMul(x, P), Q)``; ``Gemm(x, W, C)`` becomes ``MatMul(x, P)`` followed by the original Gemm holding
``Q`` and the bias (same ``alpha``/``beta``/``transB``). A k×k conv becomes a ``kh×1`` conv (the H part of
strides, pads and dilations) then a ``1×kw`` conv (the W part, and the bias); or, for depthwise-separable, a
depthwise k×k conv (``group = Cin``, the original's attributes) then a pointwise 1×1 conv carrying the bias.
The second node keeps the original node's name and output, so the rest of the graph is untouched.

Example:
    >>> out, done = lowrank_rewrite(model, {"/net/net.0/Gemm": 64})  # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compression.techniques.factorization.layers import (
    Layer, conv_auto_pad, find_layers, initializers, node_attribute, unique_name,
)
from compression.techniques.factorization.svd import (
    depthwise_product, low_rank, rank1_depthwise, relative_error, spatial_factors, spatial_product,
)


def _value_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Every value read by a node, including reads from inside If/Loop/Scan bodies."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= _used_names(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    used |= _used_names(g)
    return used


def _drop_unused_initializers(graph: onnx.GraphProto, candidates: set[str]) -> None:
    used = _used_names(graph)
    keep = [t for t in graph.initializer if t.name not in candidates or t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _copy_attrs(node: onnx.NodeProto, drop: tuple[str, ...]) -> list[onnx.AttributeProto]:
    return [a for a in node.attribute if a.name not in drop]


@dataclass
class Rewrite:
    """What one factorisation did to one node: the new nodes' names and factor initializers."""

    name: str
    kind: str  # linear | matmul | conv_spatial | depthwise_separable
    first: str  # the new first node
    second: str  # the new second node (keeps the original node's name)
    factors: tuple[str, str]  # initializer names of the two factors
    rank: int
    params_before: int  # the weight alone (biases are unchanged)
    params_after: int
    relative_error: float


# The nodes replacing one node, their new initializers, and the record of what was done.
_Split = tuple[list[onnx.NodeProto], list[onnx.TensorProto], Rewrite]


def lowrank_rewrite(model: onnx.ModelProto, ranks: dict[str, int]) -> tuple[onnx.ModelProto, list[Rewrite]]:
    """Replace each named Gemm/MatMul/Conv by its rank-K factorisation (see the module docstring).

    Args:
        model: a model with named nodes (``layers.name_nodes``); not modified.
        ranks: node name -> K; every node must be factorable (``find_layers`` gave no reason), and a
            Conv must be 2-D, ``groups=1``, ``kh > 1``/``kw > 1`` and without ``auto_pad``.

    Returns:
        The rewritten copy (checked by ``onnx.checker``) and one :class:`Rewrite` per node, whose
        ``relative_error`` is measured on the factors as stored (after the cast to the weight dtype).

    Raises:
        ValueError: an unknown or unfactorable node name, or a rank out of ``[1, min(M, N)]``.

    Example:
        >>> out, done = lowrank_rewrite(model, {"/net/net.0/Gemm": 64})  # doctest: +SKIP
    """
    def split(name: str, layer: Layer | None, inits: dict[str, np.ndarray], taken: set[str]) -> _Split:
        if layer is None or layer.reason is not None:
            raise ValueError(f"node {name!r} cannot be factored: {layer.reason if layer else 'no such layer'}")
        k = ranks[name]
        full = min(layer.matrix(inits).shape)
        if not 1 <= k <= full:
            raise ValueError(f"node {name!r}: rank {k} outside [1, {full}]")
        node = layer.node_ref
        split_node = _split_conv if node.op_type == "Conv" else _split_matrix
        return split_node(node, inits[layer.weight], k, taken)

    return _rewrite(model, list(ranks), split)


def _rewrite(model: onnx.ModelProto, names: list[str],
             split: Callable[[str, Layer | None, dict[str, np.ndarray], set[str]], _Split],
             ) -> tuple[onnx.ModelProto, list[Rewrite]]:
    """A checked copy of ``model`` where each named layer is replaced by the nodes ``split`` makes of it.

    ``split(name, layer or None, initializers, taken names)`` refuses a layer it cannot split (ValueError) or
    returns the new nodes, their new initializers and the :class:`Rewrite`; the old weights go when unused.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    layers = {la.name: la for la in find_layers(out)}
    inits = initializers(out)
    taken = _value_names(g)
    done: list[Rewrite] = []
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for name in names:
        new_nodes, tensors, rw = split(name, layers.get(name), inits, taken)
        g.initializer.extend(tensors)
        replaced[layers[name].index] = new_nodes
        done.append(rw)
    _splice(g, replaced)
    _drop_unused_initializers(g, {layers[n].weight for n in names})
    onnx.checker.check_model(out)
    return out, done


def _splice(graph: onnx.GraphProto, replaced: dict[int, list[onnx.NodeProto]]) -> None:
    """Put each replacement where its node was: order stays topological."""
    nodes = []
    for i, node in enumerate(graph.node):
        nodes.extend(replaced.get(i, [node]))
    del graph.node[:]
    graph.node.extend(nodes)



def _split_matrix(node: onnx.NodeProto, w: np.ndarray, k: int, taken: set[str]) -> _Split:
    """Gemm/MatMul ``x·W`` -> ``(x·P)·Q`` with the second node keeping the original op and attributes."""
    trans_b = node.op_type == "Gemm" and bool(node_attribute(node, "transB", 0))
    matrix = w.T if trans_b else w  # [in, out]
    p, q = low_rank(matrix, k)
    err = relative_error(matrix, p.astype(np.float64) @ q.astype(np.float64))
    p_name = unique_name(f"{node.name}.lowrank.P", taken)
    q_name = unique_name(f"{node.name}.lowrank.Q", taken)
    mid = unique_name(f"{node.output[0]}.lowrank", taken)
    first_name = unique_name(f"{node.name}.lowrank.in", taken)
    if node.op_type == "Gemm" and node_attribute(node, "transA", 0):
        first = helper.make_node("Gemm", [node.input[0], p_name], [mid], name=first_name, transA=1)
    else:
        first = helper.make_node("MatMul", [node.input[0], p_name], [mid], name=first_name)
    second = onnx.NodeProto()
    second.CopyFrom(node)
    second.input[0] = mid
    second.input[1] = q_name
    if node.op_type == "Gemm":
        attrs = _copy_attrs(node, ("transA",))
        del second.attribute[:]
        second.attribute.extend(attrs)
    tensors = [numpy_helper.from_array(p, p_name), numpy_helper.from_array(q.T.copy() if trans_b else q, q_name)]
    m, n = matrix.shape
    return [first, second], tensors, Rewrite(
        name=node.name, kind="linear" if node.op_type == "Gemm" else "matmul", first=first_name, second=node.name,
        factors=(p_name, q_name), rank=k, params_before=m * n, params_after=k * (m + n), relative_error=err)


def _split_conv(node: onnx.NodeProto, w: np.ndarray, k: int, taken: set[str]) -> _Split:
    """Conv kh×kw -> Conv kh×1 (H strides/pads/dilations) then Conv 1×kw (W ones, bias)."""
    if conv_auto_pad(node) not in ("NOTSET", "VALID"):
        raise ValueError(f"node {node.name!r}: auto_pad {conv_auto_pad(node)} cannot be split exactly")
    cout, cin, kh, kw = w.shape
    strides = list(node_attribute(node, "strides", [1, 1]))
    dilations = list(node_attribute(node, "dilations", [1, 1]))
    pads = [0, 0, 0, 0] if conv_auto_pad(node) == "VALID" else list(node_attribute(node, "pads", [0, 0, 0, 0]))
    vertical, horizontal = spatial_factors(w, k)
    err = relative_error(w, spatial_product(vertical, horizontal))
    v_name = unique_name(f"{node.name}.lowrank.V", taken)
    h_name = unique_name(f"{node.name}.lowrank.H", taken)
    mid = unique_name(f"{node.output[0]}.lowrank", taken)
    first_name = unique_name(f"{node.name}.lowrank.in", taken)
    first = helper.make_node("Conv", [node.input[0], v_name], [mid], name=first_name, kernel_shape=[kh, 1],
                             strides=[strides[0], 1], pads=[pads[0], 0, pads[2], 0],
                             dilations=[dilations[0], 1], group=1)
    second = helper.make_node("Conv", [mid, h_name, *node.input[2:]], list(node.output), name=node.name,
                              kernel_shape=[1, kw], strides=[1, strides[1]], pads=[0, pads[1], 0, pads[3]],
                              dilations=[1, dilations[1]], group=1)
    tensors = [numpy_helper.from_array(vertical, v_name), numpy_helper.from_array(horizontal, h_name)]
    return [first, second], tensors, Rewrite(
        name=node.name, kind="conv_spatial", first=first_name, second=node.name, factors=(v_name, h_name), rank=k,
        params_before=int(w.size), params_after=k * (cin * kh + cout * kw), relative_error=err)


def depthwise_rewrite(model: onnx.ModelProto, names: list[str]) -> tuple[onnx.ModelProto, list[Rewrite]]:
    """Replace each named k×k Conv (2-D, ``groups=1``) by depthwise k×k + pointwise 1×1, rank-1 initialised.

    The depthwise conv keeps every attribute of the original (strides, pads, dilations, even ``auto_pad``,
    since its output has the original's spatial size) with ``group = Cin``; the pointwise conv is 1×1,
    stride 1, unpadded, and carries the bias.

    Args:
        model: a model with named nodes; not modified.
        names: Conv node names.

    Returns:
        The rewritten copy (checked) and one :class:`Rewrite` per conv; ``relative_error`` is the rank-1
        initialisation's ``‖W − P∘D‖_F / ‖W‖_F``.

    Raises:
        ValueError: an unknown name or a node that is not a factorable 2-D conv.
    """
    def split(name: str, layer: Layer | None, inits: dict[str, np.ndarray], taken: set[str]) -> _Split:
        if layer is None or layer.reason is not None or layer.op_type != "Conv":
            raise ValueError(f"node {name!r} is not a factorable 2-D conv"
                             + (f": {layer.reason}" if layer and layer.reason else ""))
        return _split_depthwise(layer.node_ref, inits[layer.weight], taken)

    return _rewrite(model, names, split)


def _split_depthwise(node: onnx.NodeProto, w: np.ndarray, taken: set[str]) -> _Split:
    """Conv k×k -> depthwise Conv k×k (the original's attributes, ``group = Cin``) then pointwise 1×1 (bias)."""
    cin = w.shape[1]
    depthwise, pointwise = rank1_depthwise(w)
    d_name = unique_name(f"{node.name}.depthwise.W", taken)
    p_name = unique_name(f"{node.name}.pointwise.W", taken)
    mid = unique_name(f"{node.output[0]}.depthwise", taken)
    first_name = unique_name(f"{node.name}.depthwise", taken)
    first = helper.make_node("Conv", [node.input[0], d_name], [mid], name=first_name)
    first.attribute.extend(_copy_attrs(node, ("group",)))
    first.attribute.append(helper.make_attribute("group", cin))
    second = helper.make_node("Conv", [mid, p_name, *node.input[2:]], list(node.output), name=node.name,
                              kernel_shape=[1, 1], strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1)
    tensors = [numpy_helper.from_array(depthwise, d_name), numpy_helper.from_array(pointwise, p_name)]
    return [first, second], tensors, Rewrite(
        name=node.name, kind="depthwise_separable", first=first_name, second=node.name, factors=(d_name, p_name),
        rank=1, params_before=int(w.size), params_after=int(depthwise.size + pointwise.size),
        relative_error=relative_error(w, depthwise_product(depthwise, pointwise)),
    )


def reconstruct(model: onnx.ModelProto, rw: Rewrite) -> np.ndarray:
    """The weight (ONNX layout of the original node: Gemm honours its ``transB``) that a factored pair in
    ``model`` computes now — after fine-tuning, this is what the error against the original is taken on."""
    inits = initializers(model)
    a, b = inits[rw.factors[0]], inits[rw.factors[1]]
    if rw.kind == "conv_spatial":
        return spatial_product(a, b)
    if rw.kind == "depthwise_separable":
        return depthwise_product(a, b)
    second = next(n for n in model.graph.node if n.name == rw.second)
    if rw.kind == "linear" and node_attribute(second, "transB", 0):
        return (a.astype(np.float64) @ b.T.astype(np.float64)).T
    return a.astype(np.float64) @ b.astype(np.float64)
