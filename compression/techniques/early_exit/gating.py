"""The confidence-gated early-exit model: nested ``If`` nodes, and the rule they implement in numpy.

:func:`build_gated` builds the network as nested ``If`` nodes for batch 1: block *k* runs only when exit
*k−1* was not confident enough (``confidence < threshold``), so easy samples really skip the later blocks.
``threshold`` is a graph input with a default initializer: one file serves every threshold.

Confidence (:func:`confidence`, mirrored exactly by the graph): ``max_prob`` = the top softmax probability;
``entropy`` = ``1 − H(p) / log C`` (1 for a one-hot prediction, 0 for a uniform one). Both lie in [0, 1], so a
threshold above 1 never exits early and a threshold of 0 always leaves at the first exit. :func:`simulate`
says which head each sample leaves at under that rule, from the multi-exit model's outputs.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compression.converter.nodes import default_opset, node_inputs_with_subgraphs
from compression.techniques.early_exit.cuts import constant_values
from compression.techniques.early_exit.heads import ExitLayout

Criterion = Literal["max_prob", "entropy"]

GATED_PREFIX = "gated/"
EXIT_INDEX = "exit_index"


def _reduce(op: str, x: str, out: str, opset: int, name: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """``op(x, axis=1, keepdims=0)``: axes became an input for every Reduce op in opset 18 (ReduceSum in 13)."""
    axes_as_input = opset >= 18 or (op == "ReduceSum" and opset >= 13)
    if axes_as_input:
        axes = numpy_helper.from_array(np.array([1], np.int64), f"{name}/axes")
        return [helper.make_node(op, [x, axes.name], [out], name=name, keepdims=0)], [axes]
    return [helper.make_node(op, [x], [out], name=name, axes=[1], keepdims=0)], []


def _confidence_nodes(logits: str, out: str, criterion: Criterion, classes: int, opset: int,
                      tag: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Graph version of :func:`confidence` for one ``[1, C]`` logits value → ``[1]``."""
    p = f"{GATED_PREFIX}{tag}"
    nodes = [helper.make_node("Softmax", [logits], [f"{p}/prob"], name=f"{p}/softmax", axis=1)]
    if criterion == "max_prob":
        more, inits = _reduce("ReduceMax", f"{p}/prob", out, opset, f"{p}/max")
        return nodes + more, inits
    nodes += [helper.make_node("LogSoftmax", [logits], [f"{p}/logp"], name=f"{p}/logsoftmax", axis=1),
              helper.make_node("Mul", [f"{p}/prob", f"{p}/logp"], [f"{p}/plogp"], name=f"{p}/plogp")]
    more, inits = _reduce("ReduceSum", f"{p}/plogp", f"{p}/neg_entropy", opset, f"{p}/sum")
    scale = numpy_helper.from_array(np.array(1.0 / np.log(classes), np.float32), f"{p}/inv_log_c")
    one = numpy_helper.from_array(np.array(1.0, np.float32), f"{p}/one")
    nodes += more + [helper.make_node("Mul", [f"{p}/neg_entropy", scale.name], [f"{p}/scaled"], name=f"{p}/scale"),
                     helper.make_node("Add", [f"{p}/scaled", one.name], [out], name=f"{p}/conf")]
    return nodes, inits + [scale, one]


def confidence(logits: np.ndarray, criterion: Criterion) -> np.ndarray:
    """Per-sample confidence of ``[N, C]`` logits in [0, 1] (float32, as the gated graph computes it).

    Example:
        >>> float(confidence(np.array([[0.0, 0.0]], np.float32), "entropy")[0])
        0.0
    """
    z = logits.astype(np.float32)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    prob = e / e.sum(1, keepdims=True)
    if criterion == "max_prob":
        return prob.max(1)
    logp = z - np.log(e.sum(1, keepdims=True))
    return (1.0 + (prob * logp).sum(1) / np.float32(np.log(logits.shape[1]))).astype(np.float32)


def simulate(exit_logits: Sequence[np.ndarray], threshold: float, criterion: Criterion) -> np.ndarray:
    """Which head each sample leaves at (1-based; ``len(exit_logits) + 1`` = the final head) under the
    gated rule: leave at the first exit whose confidence is not below ``threshold``.

    Example:
        >>> simulate([np.array([[9.0, 0.0], [0.0, 0.0]], np.float32)], 0.9, "max_prob").tolist()
        [1, 2]
    """
    n = len(exit_logits[0]) if exit_logits else 0
    where = np.full(n, len(exit_logits) + 1, np.int64)
    for k in range(len(exit_logits), 0, -1):  # from the last exit back: the first confident one wins
        where[confidence(exit_logits[k - 1], criterion) >= threshold] = k
    return where


def _rename(nodes: list[onnx.NodeProto], mapping: dict[str, str]) -> list[onnx.NodeProto]:
    out = []
    for n in nodes:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        for i, name in enumerate(m.input):
            if name in mapping:
                m.input[i] = mapping[name]
        for i, name in enumerate(m.output):
            if name in mapping:
                m.output[i] = mapping[name]
        out.append(m)
    return out


def _index_const(value: int, name: str) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name,
                            value=numpy_helper.from_array(np.array([value], np.int64), name + "/value"))


def build_gated(model: onnx.ModelProto, layout: ExitLayout, *, criterion: Criterion = "max_prob",
                threshold: float = 0.9, threshold_name: str = "threshold") -> onnx.ModelProto:
    """The confidence-gated model for batch 1: nested ``If`` nodes run block *k+1* only when exit *k* is unsure.

    Level *k* computes backbone segment *k*, head *k* and its confidence, then
    ``If(confidence < threshold, then: level k+1, else: exit k's logits)``; the innermost ``then`` runs the rest
    of the backbone. Subgraphs read outer-scope values and initializers, so nothing is copied.

    Args:
        model: a multi-exit model from :func:`~compression.techniques.early_exit.heads.add_exit_heads` (trained).
        layout: its layout.
        criterion: ``max_prob`` or ``entropy`` (see :func:`confidence`).
        threshold: default of the ``threshold`` graph input (feed another value to override it per run).
        threshold_name: that input's name.

    Returns:
        A model with the original inputs fixed to batch 1, an optional scalar float input ``threshold`` and
        outputs ``[<original first output name> (logits), exit_index]`` — ``exit_index`` (int64, shape [1]) is
        the 1-based head the sample left at, ``len(layout.outputs) + 1`` for the final head.

    Example:
        >>> gated = build_gated(multi, layout, threshold=0.95)  # doctest: +SKIP
        >>> sess.run(None, {"input": x[:1], "threshold": np.array(0.5, np.float32)})  # doctest: +SKIP
    """
    g = model.graph
    opset = default_opset(model)
    const = constant_values(g)
    backbone = list(g.node[:layout.backbone_nodes])
    final_name = g.output[0].name
    elem = g.output[0].type.tensor_type.elem_type or TensorProto.FLOAT
    taken = {o for n in g.node for o in n.output} | {t.name for t in g.initializer} | {i.name for i in g.input}
    for name in (threshold_name, EXIT_INDEX):
        if name in taken:
            raise ValueError(f"the model already has a value named {name!r}")
    inner_final = f"{GATED_PREFIX}final_logits"
    fixed = {final_name: inner_final}
    n_exits = len(layout.outputs)
    classes = int(g.output[1].type.tensor_type.shape.dim[1].dim_value) if len(g.output) > 1 else 0
    is_const = [all(o in const for o in n.output if o) for n in backbone]
    cuts = [c.position for c in layout.cuts]
    # levels[L]: what runs at nesting depth L — backbone segment L, then head L+1 and its confidence test
    # (the last level: the rest of the backbone up to the final head).
    levels: list[list[onnx.NodeProto]] = [[] for _ in range(n_exits + 1)]
    for i, n in enumerate(backbone):
        if not is_const[i]:
            levels[sum(1 for p in cuts if i > p)].extend(_rename([n], fixed))
    level_inits: list[list[onnx.TensorProto]] = [[] for _ in range(n_exits + 1)]
    for k in range(1, n_exits + 1):
        tag = f"exit{k}"
        conf, cont = f"{GATED_PREFIX}{tag}/confidence", f"{GATED_PREFIX}{tag}/continue"
        c_nodes, c_inits = _confidence_nodes(layout.outputs[k - 1], conf, criterion, classes, opset, tag)
        a, b = layout.head_ranges[k - 1]
        levels[k - 1] += list(g.node[a:b]) + c_nodes + [
            helper.make_node("Less", [conf, threshold_name], [cont], name=cont)]
        level_inits[k - 1] += c_inits
    # Constants and weights live in the one level that reads them: ONNX Runtime's layout and fusion passes
    # (NCHWc convs, Conv+Add+Relu) only rewrite a subgraph's node when its weights are that subgraph's own
    # initializers, and keep outer-scope ones as plain runtime inputs — 2× slower convs in the nested blocks.
    level_of = {o: lv for lv, nodes in enumerate(levels) for n in nodes for o in n.output}
    users: dict[str, set[int]] = {}
    for lv, nodes in enumerate(levels):
        for n in nodes:
            for name in node_inputs_with_subgraphs(n):
                users.setdefault(name, set()).add(lv)
    top_consts: list[onnx.NodeProto] = []
    placed_consts: list[list[onnx.NodeProto]] = [[] for _ in range(n_exits + 1)]
    for i in range(len(backbone) - 1, -1, -1):  # last first: a constant's users may be constants themselves
        if not is_const[i]:
            continue
        n = backbone[i]
        where = set().union(*(users.get(o, set()) for o in n.output if o))
        lv = next(iter(where)) if len(where) == 1 else 0
        (placed_consts[lv] if lv else top_consts).insert(0, n)
        for name in node_inputs_with_subgraphs(n):
            users.setdefault(name, set()).add(lv)
        for o in n.output:
            level_of[o] = lv
    for lv in range(1, n_exits + 1):
        levels[lv] = placed_consts[lv] + levels[lv]
    top_inits: list[onnx.TensorProto] = []
    for t in g.initializer:
        where = users.get(t.name, set())
        lv = next(iter(where)) if len(where) == 1 else 0
        (level_inits[lv] if lv else top_inits).append(t)
    top_inits += level_inits[0]

    def vi(name: str, t: int, shape: list) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, t, shape)

    # innermost: the rest of the backbone, leaving at the final head
    last_idx = f"{GATED_PREFIX}index_{n_exits + 1}"
    then_graph = helper.make_graph(levels[n_exits] + [_index_const(n_exits + 1, last_idx)], f"after_exit_{n_exits}",
                                   [], [vi(inner_final, elem, [1, classes]), vi(last_idx, TensorProto.INT64, [1])],
                                   level_inits[n_exits])
    top_nodes: list[onnx.NodeProto] = []
    for k in range(n_exits, 0, -1):
        tag = f"exit{k}"
        e_logits, e_idx = f"{GATED_PREFIX}{tag}/logits", f"{GATED_PREFIX}index_{k}"
        else_graph = helper.make_graph(
            [helper.make_node("Identity", [layout.outputs[k - 1]], [e_logits], name=e_logits), _index_const(k, e_idx)],
            f"leave_at_exit_{k}", [], [vi(e_logits, elem, [1, classes]), vi(e_idx, TensorProto.INT64, [1])])
        outs = ([final_name, EXIT_INDEX] if k == 1
                else [f"{GATED_PREFIX}level{k}/logits", f"{GATED_PREFIX}level{k}/index"])
        if_node = helper.make_node("If", [f"{GATED_PREFIX}{tag}/continue"], outs, name=f"{GATED_PREFIX}{tag}/if",
                                   then_branch=then_graph, else_branch=else_graph)
        if k == 1:
            top_nodes = levels[0] + [if_node]
        else:
            then_graph = helper.make_graph(levels[k - 1] + [if_node], f"after_exit_{k - 1}", [],
                                           [vi(outs[0], elem, [1, classes]), vi(outs[1], TensorProto.INT64, [1])],
                                           level_inits[k - 1])
    graph = helper.make_graph(
        top_consts + top_nodes, f"{g.name or 'model'}_gated", [],
        [vi(final_name, elem, [1, classes]), vi(EXIT_INDEX, TensorProto.INT64, [1])],
        top_inits + [numpy_helper.from_array(np.array(threshold, np.float32), threshold_name)])
    for inp in g.input:
        if inp.name in const:
            continue
        new = onnx.ValueInfoProto()
        new.CopyFrom(inp)
        dims = new.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = 1  # the If conditions take one sample's confidence
        graph.input.append(new)
    graph.input.append(vi(threshold_name, TensorProto.FLOAT, []))
    out = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                            producer_name="netcompress-early-exit")
    out.functions.extend(model.functions)
    return out
