"""Weight factorisation: the SVD math and the ONNX graph surgery behind ``lowrank`` and ``depthwise_separable``.

Everything here is a pure function of numpy arrays or ``onnx.ModelProto`` copies; the techniques
(:mod:`compression.techniques.lowrank`, :mod:`compression.techniques.depthwise`) decide *which* layers
and *which* ranks, then call these to do the work. Three factorisations:

- **Linear / MatMul** (``W ≈ P·Q``): the weight as an ``[in, out]`` matrix ``W`` is replaced by the
  truncated SVD ``P = U_K·√Σ_K`` (``[in, K]``) and ``Q = √Σ_K·V_Kᵀ`` (``[K, out]``). In the graph,
  ``MatMul(x, W)`` becomes ``MatMul(MatMul(x, P), Q)``; ``Gemm(x, W, C)`` becomes ``MatMul(x, P)``
  followed by the original Gemm holding ``Q`` and the bias (same ``alpha``/``beta``/``transB``).
  Parameters: ``in·out → K·(in + out)``.
- **Spatial SVD of a k×k conv** (Jaderberg et al. 2014, scheme 2, as in Tai et al. 2016): the kernel
  ``W[Cout, Cin, kh, kw]`` is read as the matrix ``M[(c, i), (o, j)] = W[o, c, i, j]`` of shape
  ``(Cin·kh) × (Cout·kw)``; its rank-K SVD gives a *vertical* ``kh×1`` conv ``Cin → K`` followed by a
  *horizontal* ``1×kw`` conv ``K → Cout``. The vertical conv takes the H part of strides, pads and
  dilations, the horizontal one the W part, the bias goes on the second: at full rank
  ``K = min(Cin·kh, Cout·kw)`` the pair computes exactly the original conv.
  Parameters: ``Cout·Cin·kh·kw → K·(Cin·kh + Cout·kw)``.
- **Depthwise-separable** (MobileNet's block, initialised from the dense kernel): for every input
  channel ``c`` the slice ``W[:, c]`` (``Cout × kh·kw``) is approximated by its best rank-1 term
  ``σ₁·u·vᵀ``; the depthwise filter of ``c`` is ``√σ₁·v`` and the pointwise column ``P[:, c] = √σ₁·u``.
  Parameters: ``Cout·Cin·k² → Cin·k² + Cout·Cin``.

Example:
    >>> p, q = low_rank(np.eye(4, dtype=np.float32), 4)
    >>> float(relative_error(np.eye(4), p @ q)) < 1e-6
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

FACTORABLE_OPS = ("Gemm", "MatMul", "Conv")


# ------------------------------------------------------------------------------------------- SVD math
def choose_rank(singular_values: np.ndarray, *, rank: int | None = None, rank_ratio: float | None = None,
                energy: float | None = None) -> int:
    """The rank K that one of the three criteria asks for, clipped to ``[1, len(singular_values)]``.

    Args:
        singular_values: in decreasing order (as ``np.linalg.svd`` returns them).
        rank: K itself.
        rank_ratio: K = ⌈ratio · min(M, N)⌉.
        energy: the smallest K whose singular values keep this fraction of ``Σσ²`` (the squared Frobenius
            norm), so that ``‖W − W_K‖_F / ‖W‖_F = √(1 − kept) ≤ √(1 − energy)``.

    Returns:
        The rank (exactly one criterion must be given).

    Raises:
        ValueError: none or several criteria given.

    Example:
        >>> choose_rank(np.array([3.0, 1.0, 0.0]), energy=0.9)
        1
    """
    given = [v is not None for v in (rank, rank_ratio, energy)]
    if sum(given) != 1:
        raise ValueError("give exactly one of rank, rank_ratio, energy")
    full = len(singular_values)
    if rank is not None:
        k = int(rank)
    elif rank_ratio is not None:
        k = math.ceil(rank_ratio * full - 1e-9)
    else:
        sq = np.asarray(singular_values, dtype=np.float64) ** 2
        total = float(sq.sum())
        if total <= 0:
            return 1
        kept = np.cumsum(sq) / total
        k = int(np.searchsorted(kept, float(energy) - 1e-12) + 1)
    return max(1, min(k, full))


def low_rank(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank-``k`` factors ``P [m, k]``, ``Q [k, n]`` of ``w [m, n]`` (truncated SVD, √σ on each side).

    Splitting √σ evenly keeps both factors at the same scale, which is what fine-tuning with one
    learning rate wants. Computed in float64, returned in ``w``'s dtype.
    """
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:k])
    return (u[:, :k] * root).astype(w.dtype), (root[:, None] * vt[:k]).astype(w.dtype)


def singular_values(w: np.ndarray) -> np.ndarray:
    """Singular values of ``w`` in decreasing order (float64), for choosing a rank before factoring."""
    return np.linalg.svd(w.astype(np.float64), compute_uv=False)


def relative_error(w: np.ndarray, approx: np.ndarray) -> float:
    """``‖w − approx‖_F / ‖w‖_F`` in float64 (0 for an all-zero ``w`` reproduced exactly)."""
    w64, a64 = w.astype(np.float64), approx.astype(np.float64)
    norm = float(np.linalg.norm(w64))
    diff = float(np.linalg.norm(w64 - a64))
    return diff / norm if norm > 0 else diff


def spatial_matrix(w: np.ndarray) -> np.ndarray:
    """Conv kernel ``[Cout, Cin, kh, kw]`` as the ``(Cin·kh) × (Cout·kw)`` matrix of the spatial SVD."""
    cout, cin, kh, kw = w.shape
    return w.transpose(1, 2, 0, 3).reshape(cin * kh, cout * kw)


def spatial_factors(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank-``k`` spatial SVD of a conv kernel ``[Cout, Cin, kh, kw]``.

    Returns:
        ``(vertical [k, Cin, kh, 1], horizontal [Cout, k, 1, kw])``: a kh×1 conv to ``k`` channels, then a
        1×kw conv to ``Cout``; :func:`spatial_product` multiplies them back.
    """
    cout, cin, kh, kw = w.shape
    p, q = low_rank(spatial_matrix(w), k)  # [(c, i), k], [k, (o, j)]
    vertical = p.reshape(cin, kh, k).transpose(2, 0, 1)[..., None]
    horizontal = q.reshape(k, cout, kw).transpose(1, 0, 2)[:, :, None, :]
    return np.ascontiguousarray(vertical), np.ascontiguousarray(horizontal)


def spatial_product(vertical: np.ndarray, horizontal: np.ndarray) -> np.ndarray:
    """The ``[Cout, Cin, kh, kw]`` kernel a vertical/horizontal conv pair computes."""
    return np.einsum("okj,kci->ocij", horizontal[:, :, 0, :].astype(np.float64),
                     vertical[..., 0].astype(np.float64))


def rank1_depthwise(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-input-channel rank-1 split of a conv kernel ``[Cout, Cin, kh, kw]`` (MobileNet init).

    Returns:
        ``(depthwise [Cin, 1, kh, kw], pointwise [Cout, Cin, 1, 1])`` with
        ``depthwise[c] = √σ₁·v`` and ``pointwise[:, c] = √σ₁·u`` for ``W[:, c] ≈ σ₁·u·vᵀ``.
    """
    cout, cin, kh, kw = w.shape
    slices = w.astype(np.float64).transpose(1, 0, 2, 3).reshape(cin, cout, kh * kw)  # [c, o, ij]
    u, s, vt = np.linalg.svd(slices, full_matrices=False)  # batched over input channels
    root = np.sqrt(s[:, 0])
    depthwise = (root[:, None] * vt[:, 0, :]).reshape(cin, 1, kh, kw)
    pointwise = (u[:, :, 0] * root[:, None]).T.reshape(cout, cin, 1, 1)
    return depthwise.astype(w.dtype), np.ascontiguousarray(pointwise.astype(w.dtype))


def depthwise_product(depthwise: np.ndarray, pointwise: np.ndarray) -> np.ndarray:
    """The ``[Cout, Cin, kh, kw]`` kernel a depthwise + pointwise pair computes."""
    return pointwise[:, :, 0, 0, None, None].astype(np.float64) * depthwise[None, :, 0].astype(np.float64)


# ---------------------------------------------------------------------------------- graph reading
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
        if self.op_type == "Gemm" and _attr(self.node_ref, "transB", 0):
            return w.T
        return w


def _attr(node: onnx.NodeProto | None, name: str, default: Any) -> Any:
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
            node.name = _unique(f"{node.op_type}_{i}", taken)
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
        elif int(_attr(node, "group", 1)) != 1:
            layer.reason = f"grouped convolution (group={_attr(node, 'group', 1)})"
    return layers


def conv_auto_pad(node: onnx.NodeProto) -> str:
    """A Conv's ``auto_pad`` as text (``NOTSET`` when absent or empty)."""
    value = _attr(node, "auto_pad", "NOTSET")
    value = value.decode() if isinstance(value, bytes) else str(value)
    return value or "NOTSET"


def _unique(base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


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


# --------------------------------------------------------------------------------- graph surgery
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


def lowrank_rewrite(model: onnx.ModelProto, ranks: dict[str, int]) -> tuple[onnx.ModelProto, list[Rewrite]]:
    """Replace each named Gemm/MatMul/Conv by its rank-K factorisation (see the module docstring).

    Args:
        model: a model with named nodes (:func:`name_nodes`); not modified.
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
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    layers = {la.name: la for la in find_layers(out)}
    inits = initializers(out)
    taken = _value_names(g)
    done: list[Rewrite] = []
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for name, k in ranks.items():
        layer = layers.get(name)
        if layer is None or layer.reason is not None:
            raise ValueError(f"node {name!r} cannot be factored: {layer.reason if layer else 'no such layer'}")
        node = g.node[layer.index]
        w = inits[layer.weight]
        full = min(layer.matrix(inits).shape)
        if not 1 <= k <= full:
            raise ValueError(f"node {name!r}: rank {k} outside [1, {full}]")
        split = _split_conv if node.op_type == "Conv" else _split_matrix
        new_nodes, tensors, rw = split(node, w, k, taken)
        g.initializer.extend(tensors)
        replaced[layer.index] = new_nodes
        done.append(rw)
    _splice(g, replaced)
    _drop_unused_initializers(g, {layers[n].weight for n in ranks})
    onnx.checker.check_model(out)
    return out, done


def _splice(graph: onnx.GraphProto, replaced: dict[int, list[onnx.NodeProto]]) -> None:
    """Put each replacement where its node was: order stays topological."""
    nodes = []
    for i, node in enumerate(graph.node):
        nodes.extend(replaced.get(i, [node]))
    del graph.node[:]
    graph.node.extend(nodes)


_Split = tuple[list[onnx.NodeProto], list[onnx.TensorProto], Rewrite]


def _split_matrix(node: onnx.NodeProto, w: np.ndarray, k: int, taken: set[str]) -> _Split:
    """Gemm/MatMul ``x·W`` -> ``(x·P)·Q`` with the second node keeping the original op and attributes."""
    trans_b = node.op_type == "Gemm" and bool(_attr(node, "transB", 0))
    matrix = w.T if trans_b else w  # [in, out]
    p, q = low_rank(matrix, k)
    err = relative_error(matrix, p.astype(np.float64) @ q.astype(np.float64))
    p_name = _unique(f"{node.name}.lowrank.P", taken)
    q_name = _unique(f"{node.name}.lowrank.Q", taken)
    mid = _unique(f"{node.output[0]}.lowrank", taken)
    first_name = _unique(f"{node.name}.lowrank.in", taken)
    if node.op_type == "Gemm" and _attr(node, "transA", 0):
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
    strides = list(_attr(node, "strides", [1, 1]))
    dilations = list(_attr(node, "dilations", [1, 1]))
    pads = [0, 0, 0, 0] if conv_auto_pad(node) == "VALID" else list(_attr(node, "pads", [0, 0, 0, 0]))
    vertical, horizontal = spatial_factors(w, k)
    err = relative_error(w, spatial_product(vertical, horizontal))
    v_name = _unique(f"{node.name}.lowrank.V", taken)
    h_name = _unique(f"{node.name}.lowrank.H", taken)
    mid = _unique(f"{node.output[0]}.lowrank", taken)
    first_name = _unique(f"{node.name}.lowrank.in", taken)
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
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    layers = {la.name: la for la in find_layers(out)}
    inits = initializers(out)
    taken = _value_names(g)
    done: list[Rewrite] = []
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for name in names:
        layer = layers.get(name)
        if layer is None or layer.reason is not None or layer.op_type != "Conv":
            raise ValueError(f"node {name!r} is not a factorable 2-D conv"
                             + (f": {layer.reason}" if layer and layer.reason else ""))
        node = g.node[layer.index]
        w = inits[layer.weight]
        cout, cin, kh, kw = w.shape
        depthwise, pointwise = rank1_depthwise(w)
        d_name = _unique(f"{node.name}.depthwise.W", taken)
        p_name = _unique(f"{node.name}.pointwise.W", taken)
        mid = _unique(f"{node.output[0]}.depthwise", taken)
        first_name = _unique(f"{node.name}.depthwise", taken)
        first = helper.make_node("Conv", [node.input[0], d_name], [mid], name=first_name)
        first.attribute.extend(_copy_attrs(node, ("group",)))
        first.attribute.append(helper.make_attribute("group", cin))
        second = helper.make_node("Conv", [mid, p_name, *node.input[2:]], list(node.output), name=node.name,
                                  kernel_shape=[1, 1], strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1)
        g.initializer.extend([numpy_helper.from_array(depthwise, d_name), numpy_helper.from_array(pointwise, p_name)])
        replaced[layer.index] = [first, second]
        done.append(Rewrite(
            name=name, kind="depthwise_separable", first=first_name, second=node.name, factors=(d_name, p_name),
            rank=1, params_before=int(w.size), params_after=int(depthwise.size + pointwise.size),
            relative_error=relative_error(w, depthwise_product(depthwise, pointwise)),
        ))
    _splice(g, replaced)
    _drop_unused_initializers(g, {layers[n].weight for n in names})
    onnx.checker.check_model(out)
    return out, done


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
    if rw.kind == "linear" and _attr(second, "transB", 0):
        return (a.astype(np.float64) @ b.T.astype(np.float64)).T
    return a.astype(np.float64) @ b.astype(np.float64)


# ------------------------------------------------------------------------------- measured shapes
def node_macs(model: onnx.ModelProto, sample: dict[str, np.ndarray]) -> dict[str, int]:
    """Multiply-accumulates per sample of every Conv/Gemm/MatMul node, by node name, from the shapes ONNX
    Runtime actually produces on ``sample`` (batch 1): the same counting as
    :func:`compression.analysis.macs`, split per node. Unnamed nodes are keyed ``OpType_index``."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    g = probe.graph
    inits = {t.name: [int(d) for d in t.dims] for t in g.initializer}
    existing = {o.name for o in g.output}
    wanted: list[str] = []
    for n in g.node:
        if n.op_type in FACTORABLE_OPS:
            for v in (n.input[0], n.input[1], n.output[0]):
                if v and v not in inits and v not in existing and v not in wanted:
                    wanted.append(v)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe).graph
        types = {vi.name: vi.type.tensor_type.elem_type for vi in [*inferred.value_info, *inferred.input]}
    except Exception:  # noqa: BLE001 - types are a hint; ORT reports the real ones
        types = {}
    for v in wanted:
        g.output.append(helper.make_tensor_value_info(v, types.get(v, onnx.TensorProto.UNDEFINED), None))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    shapes = {k: list(np.shape(v)) for k, v in zip(names, sess.run(names, sample))}
    shapes.update(inits)
    shapes.update({k: list(np.shape(v)) for k, v in sample.items()})
    out: dict[str, int] = {}
    for i, n in enumerate(model.graph.node):
        if n.op_type not in FACTORABLE_OPS:
            continue
        key = n.name or f"{n.op_type}_{i}"
        y = int(np.prod(shapes[n.output[0]]))
        if n.op_type == "Conv":
            out[key] = y * int(np.prod(shapes[n.input[1]][1:]))
        elif n.op_type == "MatMul":
            out[key] = y * int(shapes[n.input[0]][-1])
        else:
            a = shapes[n.input[0]]
            out[key] = y * int(a[0] if _attr(n, "transA", 0) else a[-1])
    return out
