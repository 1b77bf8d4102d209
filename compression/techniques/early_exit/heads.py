"""Exit heads as ONNX graph surgery: a pool → flatten → (hidden) → linear head on each chosen cut.

The heads are new nodes and initializers appended after the unchanged backbone, the original outputs first and
the exits as extra outputs ``exit_1``, ``exit_2``, … The result converts with ``compression.converter.to_torch``
for training and is written back unchanged.

Example:
    >>> multi, layout = add_exit_heads(model, choose_cuts(facts, "auto"), facts.classes)  # doctest: +SKIP
    >>> [o.name for o in multi.graph.output]  # doctest: +SKIP
    ['logits', 'exit_1', 'exit_2']
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compression.errors import InvalidSpec
from compression.techniques.early_exit.cuts import Cut, GraphFacts

EXIT_PREFIX = "exit_"


@dataclass(frozen=True)
class ExitLayout:
    """Where things are in a multi-exit model built by :func:`add_exit_heads`.

    Attributes:
        cuts: the cut each exit reads, in graph order.
        backbone_nodes: the original nodes are ``graph.node[:backbone_nodes]`` (unchanged, same order).
        head_ranges: ``graph.node[start:stop]`` of each exit head.
        outputs: the exit outputs' names, ``exit_1``, ``exit_2``, …
        initializers: the heads' new initializers (what training may change when the backbone is frozen).
        head_macs: MACs of each head per sample.
    """

    cuts: list[Cut]
    backbone_nodes: int
    head_ranges: list[tuple[int, int]]
    outputs: list[str]
    initializers: list[str] = field(default_factory=list)
    head_macs: list[int] = field(default_factory=list)


def _head(k: int, cut: Cut, classes: int, *, pool_size: int, hidden: int,
          rng: np.random.Generator) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], int]:
    """Nodes, initializers and MACs of exit ``k``: [pool → flatten] → [Gemm → Relu] → Gemm → ``exit_k``."""
    p = f"{EXIT_PREFIX}{k}"
    nodes: list[onnx.NodeProto] = []
    x = cut.value
    if len(cut.shape) == 4:
        _, c, h, w = cut.shape
        kh, kw = max(1, h // pool_size), max(1, w // pool_size)
        pooled = f"{p}/pool"
        if pool_size == 1 or (h <= pool_size and w <= pool_size):
            nodes.append(helper.make_node("GlobalAveragePool", [x], [pooled], name=pooled))
            feats = c
        elif kh == kw == 1:  # already about pool_size × pool_size: flatten as is
            pooled, feats = x, c * h * w
        else:
            nodes.append(helper.make_node("AveragePool", [x], [pooled], name=pooled,
                                          kernel_shape=[kh, kw], strides=[kh, kw]))
            feats = c * ((h - kh) // kh + 1) * ((w - kw) // kw + 1)
        nodes.append(helper.make_node("Flatten", [pooled], [f"{p}/flat"], name=f"{p}/flatten", axis=1))
        x = f"{p}/flat"
    else:
        feats = cut.shape[1]
    inits: list[onnx.TensorProto] = []
    macs = 0
    layers = [(feats, hidden), (hidden, classes)] if hidden else [(feats, classes)]
    for j, (fin, fout) in enumerate(layers):
        bound = 1.0 / np.sqrt(fin)  # nn.Linear's default init range
        w_name, b_name = f"{p}.fc{j}.weight", f"{p}.fc{j}.bias"
        inits += [numpy_helper.from_array(rng.uniform(-bound, bound, (fout, fin)).astype(np.float32), w_name),
                  numpy_helper.from_array(rng.uniform(-bound, bound, fout).astype(np.float32), b_name)]
        last = j == len(layers) - 1
        y = p if last else f"{p}/fc{j}"
        nodes.append(helper.make_node("Gemm", [x, w_name, b_name], [y], name=f"{p}/fc{j}", transB=1))
        macs += fin * fout
        if not last:
            nodes.append(helper.make_node("Relu", [y], [f"{p}/relu{j}"], name=f"{p}/relu{j}"))
            x = f"{p}/relu{j}"
    return nodes, inits, macs


def add_exit_heads(model: onnx.ModelProto, cuts: Sequence[Cut], classes: int, *, pool_size: int = 1,
                   hidden: int = 0, seed: int = 0) -> tuple[onnx.ModelProto, ExitLayout]:
    """A copy of ``model`` with an exit head on every cut, outputs ``[*original outputs, exit_1, …]``.

    Args:
        model: the classifier (its nodes are kept, in order, at the front of the new graph).
        cuts: where the heads go (from :func:`~compression.techniques.early_exit.cuts.choose_cuts`), in graph order.
        classes: width of every head's output (the classifier's).
        pool_size: 4-D cuts are average-pooled to about ``pool_size × pool_size`` (1: global average pool).
        hidden: width of a hidden ReLU layer in each head (0: a single linear layer).
        seed: for the heads' initial weights.

    Returns:
        ``(multi_exit_model, layout)``; the heads are freshly initialised: train them.

    Example:
        >>> multi, layout = add_exit_heads(model, choose_cuts(facts, "auto"), facts.classes)  # doctest: +SKIP
        >>> [o.name for o in multi.graph.output]  # doctest: +SKIP
        ['logits', 'exit_1', 'exit_2']
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    taken = {o for n in g.node for o in n.output} | {t.name for t in g.initializer} | {i.name for i in g.input}
    rng = np.random.default_rng(seed)
    n_backbone = len(g.node)
    first = g.output[0]
    batch_dim = first.type.tensor_type.shape.dim[0] if first.type.tensor_type.shape.dim else None
    ranges, names, inits_all, head_macs = [], [], [], []
    for k, cut in enumerate(cuts, start=1):
        nodes, inits, macs = _head(k, cut, classes, pool_size=pool_size, hidden=hidden, rng=rng)
        clash = ({o for n in nodes for o in n.output} | {t.name for t in inits}) & taken
        if clash:
            raise InvalidSpec(f"the model already has values named {sorted(clash)[:3]}: it seems to have exit heads",
                              [{"loc": ["exits"], "msg": "name clash with existing exit heads"}])
        start = len(g.node)
        g.node.extend(nodes)
        g.initializer.extend(inits)
        ranges.append((start, len(g.node)))
        names.append(f"{EXIT_PREFIX}{k}")
        inits_all += [t.name for t in inits]
        head_macs.append(macs)
        vi = helper.make_tensor_value_info(names[-1], first.type.tensor_type.elem_type or TensorProto.FLOAT,
                                           ["N", classes])
        if batch_dim is not None:
            vi.type.tensor_type.shape.dim[0].CopyFrom(batch_dim)
        g.output.append(vi)
    layout = ExitLayout(list(cuts), n_backbone, ranges, names, inits_all, head_macs)
    return out, layout


def exit_costs(facts: GraphFacts, layout: ExitLayout) -> list[int]:
    """MACs per sample of leaving at each head (exits, then the final head): backbone up to the cut plus every
    head computed on the way (a sample that goes on has paid for the heads it passed)."""
    out = []
    for k, cut in enumerate(layout.cuts):
        out.append(cut.macs + sum(layout.head_macs[:k + 1]))
    out.append(facts.total_macs + sum(layout.head_macs))
    return out
