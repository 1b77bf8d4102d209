"""Where an early exit may go: the cut points of a classifier's graph, measured, and the choice among them.

In the topologically sorted graph, a value ``v`` is a *cut* when everything computed later reads only ``v``,
later values and constants: no skip connection crosses it, so "stop here" and "go on from here" need nothing
but ``v``. Shapes and MACs come from one ONNX Runtime run at batch 1 (what actually executes, not what shape
inference guesses), counted by :func:`compression.analysis.node_macs`.

Example:
    >>> facts = find_cuts(onnx.load("cnn.onnx"), {"input": x[:1]})  # doctest: +SKIP
    >>> [c.node for c in choose_cuts(facts, "auto", 2)]  # doctest: +SKIP
    ['/features/features.3/MaxPool', '/features/features.7/MaxPool']
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto

from compression.analysis import measured_shapes, node_macs
from compression.converter.nodes import iter_subgraphs, node_inputs_with_subgraphs
from compression.errors import InvalidSpec, NotApplicable

# exits: auto skips cuts that leave less than this fraction of the MACs still to do
MIN_SAVED = 0.05
_RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


@dataclass(frozen=True)
class Cut:
    """A value an exit head can read.

    Attributes:
        value: the activation's name.
        node: name of the node that produces it (what a spec names in ``exits``).
        position: index of that node in ``graph.node``: the backbone runs ``node[:position + 1]`` to get here.
        shape: the value's shape at batch 1, measured.
        macs: multiply-accumulates of ``node[:position + 1]`` per sample.
    """

    value: str
    node: str
    position: int
    shape: tuple[int, ...]
    macs: int


@dataclass(frozen=True)
class GraphFacts:
    """What :func:`find_cuts` measured: every cut, per-node MACs, and the classifier output."""

    cuts: list[Cut]
    node_macs: list[int]
    output_shape: tuple[int, ...]

    @property
    def total_macs(self) -> int:
        return int(sum(self.node_macs))

    @property
    def classes(self) -> int:
        return int(self.output_shape[-1])


def constant_values(graph: onnx.GraphProto) -> set[str]:
    """Initializers and every value computed from constants alone (Constant, Identity of a weight, shape
    arithmetic on constants): such values do not tie later nodes to earlier activations."""
    const = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type in _RANDOM_OPS or any(True for _ in iter_subgraphs(node)):
            continue
        if all(i in const for i in node.input if i):
            const.update(o for o in node.output if o)
    return const


def _macs_or_zero(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """A node's MACs; 0 when a shape the count needs was not measured."""
    try:
        return node_macs(node, shapes)
    except KeyError:
        return 0


def find_cuts(model: onnx.ModelProto, sample: dict[str, np.ndarray]) -> GraphFacts:
    """Every cut of ``model``'s main graph whose value is an activation ``[1, C, H, W]`` or ``[1, F]``.

    Args:
        model: a classifier whose first output is ``[N, classes]``.
        sample: one input sample per graph input (batch 1), to measure shapes and MACs.

    Returns:
        GraphFacts: the cuts in graph order, MACs per node, and the first output's shape.

    Raises:
        InvalidSpec: the first output is not class scores ``[N, C]`` with ``C >= 2``.

    Example:
        >>> facts = find_cuts(onnx.load("cnn.onnx"), {"input": x[:1]})  # doctest: +SKIP
        >>> [c.node for c in facts.cuts][:2]  # doctest: +SKIP
        ['/features/features.2/Relu', '/features/features.3/MaxPool']
    """
    g = model.graph
    nodes = list(g.node)
    shapes = measured_shapes(model, sample, every_value=True)
    out_shape = tuple(shapes[g.output[0].name])
    if len(out_shape) != 2 or out_shape[1] < 2:
        raise NotApplicable(f"early exits need a classifier: the first output {g.output[0].name!r} has shape "
                          f"{list(out_shape)}, not [N, classes]", [{"loc": ["method"], "msg": "not a classifier"}])
    const = constant_values(g)
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.value_info, *g.input, *g.output]}
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
        elem.update({vi.name: vi.type.tensor_type.elem_type for vi in inferred.value_info})
    except Exception:
        pass
    per_node = [_macs_or_zero(n, shapes) for n in nodes]
    # The last node that reads each non-constant value; graph outputs stay live to the end.
    end = len(nodes)
    last_use: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for name in node_inputs_with_subgraphs(n):
            if name not in const:
                last_use[name] = i
    for o in g.output:
        last_use[o.name] = end
    work_after = [False] * (end + 1)  # does a non-constant node follow position i?
    for i in range(end - 1, -1, -1):
        work_after[i] = work_after[i + 1] or not all(o in const for o in nodes[i].output if o)
    live = {i.name for i in g.input if i.name not in const and last_use.get(i.name, -1) >= 0}
    cuts: list[Cut] = []
    done = np.cumsum(per_node).tolist()  # MACs of nodes[:i + 1]
    outputs = {o.name for o in g.output}
    for i, n in enumerate(nodes):
        live.update(o for o in n.output if o and o not in const and last_use.get(o, -1) > i)
        live = {v for v in live if last_use.get(v, -1) > i}
        if len(live) != 1 or not work_after[i + 1]:
            continue
        (v,) = live
        shp = tuple(shapes.get(v, ()))
        if v in outputs or len(shp) not in (2, 4) or shp[0] != 1 or elem.get(v, TensorProto.FLOAT) not in _FLOAT_TYPES:
            continue
        producer = next((j for j in range(i, -1, -1) if v in nodes[j].output), None)
        if producer is None:  # a graph input is live alone: nothing computed yet
            continue
        if cuts and cuts[-1].value == v:
            continue
        cuts.append(Cut(v, nodes[producer].name or v, producer, shp, int(done[producer])))
    return GraphFacts(cuts, per_node, out_shape)


def choose_cuts(facts: GraphFacts, exits: Literal["auto"] | Sequence[str], num_exits: int = 2) -> list[Cut]:
    """The cuts the exits go on.

    ``auto`` spreads ``num_exits`` exits by cumulative MACs (at 1/(n+1), 2/(n+1), … of the total): among cuts
    after the same amount of work it takes the last one (after the ReLU/pool, not before), and it skips cuts
    before any work or with less than ``MIN_SAVED`` of the work left (unless nothing else is left); it places
    fewer exits than asked when there are fewer such cuts. Explicit entries name a node (or a value) that must
    be a cut.

    Args:
        facts: from :func:`find_cuts`.
        exits: ``"auto"`` or node names.
        num_exits: how many exits ``auto`` places.

    Returns:
        The chosen cuts in graph order.

    Raises:
        InvalidSpec: a name that is not a cut (the message lists the valid ones), or no cut to place an exit on.

    Example:
        >>> [c.node for c in choose_cuts(facts, "auto", 2)]  # doctest: +SKIP
        ['node_max_pool2d', 'node_max_pool2d_1']
    """
    if exits == "auto":
        total = facts.total_macs
        by_work: dict[int, Cut] = {}
        for c in facts.cuts:
            if 0 < c.macs < total or (total == 0 and c.position > 0):
                by_work[c.macs] = c  # later cuts after the same work win
        pool = sorted(by_work.values(), key=lambda c: c.position)
        # An exit with almost nothing left to skip (just before the classifier's last layer) only adds cost.
        worth = [c for c in pool if total - c.macs >= MIN_SAVED * total]
        pool = worth or pool
        if not pool:
            raise InvalidSpec("no place for an exit: every activation is crossed by a skip connection or comes "
                              "after all the work", [{"loc": ["exits"], "msg": "no valid cut in this model"}])
        chosen: list[Cut] = []
        for k in range(1, min(num_exits, len(pool)) + 1):
            target = total * k / (num_exits + 1)
            best = min((c for c in pool if c not in chosen), key=lambda c: (abs(c.macs - target), c.position))
            chosen.append(best)
        return sorted(chosen, key=lambda c: c.position)
    by_name = {c.node: c for c in facts.cuts}
    by_name.update({c.value: c for c in facts.cuts})
    errors, chosen = [], []
    for i, name in enumerate(exits):
        if name not in by_name:
            errors.append({"loc": ["exits", i], "msg": f"{name!r} is not a cut point"})
        else:
            chosen.append(by_name[name])
    if errors:
        valid = ", ".join(repr(c.node) for c in facts.cuts) or "none"
        raise InvalidSpec(f"exits must name nodes whose output no skip connection crosses; valid: {valid}", errors)
    if len({c.value for c in chosen}) != len(chosen):
        raise InvalidSpec("two exits name the same cut", [{"loc": ["exits"], "msg": "duplicate cut"}])
    return sorted(chosen, key=lambda c: c.position)
