"""Early exits (BranchyNet, Teerapittayanon et al. 2016) as ONNX graph surgery.

Three pure pieces, each usable and tested on its own:

- :func:`find_cuts` — where an exit may go. In the topologically sorted graph, a value ``v`` is a *cut*
  when everything computed later reads only ``v``, later values and constants: no skip connection crosses
  it, so "stop here" and "go on from here" need nothing but ``v``. Shapes and MACs come from one
  ONNX Runtime run at batch 1 (what actually executes, not what shape inference guesses).
- :func:`add_exit_heads` — a pool → flatten → (hidden) → linear head on each chosen cut, as new nodes and
  initializers, the original output first and the exits as extra outputs ``exit_1``, ``exit_2``, … The
  result converts with ``compression.converter.to_torch`` for training and is written back unchanged.
- :func:`build_gated` — the same network as nested ``If`` nodes for batch 1: block *k* runs only when exit
  *k−1* was not confident enough (``confidence < threshold``), so easy samples really skip the later blocks.
  ``threshold`` is a graph input with a default initializer: one file serves every threshold.

Confidence (:func:`confidence`, mirrored exactly by the graph): ``max_prob`` = the top softmax probability;
``entropy`` = ``1 − H(p) / log C`` (1 for a one-hot prediction, 0 for a uniform one). Both lie in [0, 1], so a
threshold above 1 never exits early and a threshold of 0 always leaves at the first exit.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compression.converter.nodes import default_opset, iter_subgraphs, node_inputs_with_subgraphs
from compression.errors import InvalidSpec

Criterion = Literal["max_prob", "entropy"]

EXIT_PREFIX = "exit_"
GATED_PREFIX = "gated/"
EXIT_INDEX = "exit_index"
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


def _node_macs(node: onnx.NodeProto, shape: dict[str, list[int]]) -> int:
    """Conv/Gemm/MatMul MACs from measured shapes (the same counting rule as ``analysis.macs``)."""
    try:
        if node.op_type in ("Conv", "ConvInteger"):
            return int(np.prod(shape[node.output[0]])) * int(np.prod(shape[node.input[1]][1:]))
        if node.op_type == "ConvTranspose":
            return int(np.prod(shape[node.input[0]])) * int(np.prod(shape[node.input[1]][1:]))
        if node.op_type in ("MatMul", "MatMulInteger"):
            return int(np.prod(shape[node.output[0]])) * int(shape[node.input[0]][-1])
        if node.op_type == "Gemm":
            a = shape[node.input[0]]
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            return int(np.prod(shape[node.output[0]])) * int(a[0] if trans_a else a[-1])
    except KeyError:
        return 0
    return 0


def measured_shapes(model: onnx.ModelProto, sample: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """Shape of every value of the main graph (initializers, inputs, node outputs) on ``sample``."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    g = probe.graph
    existing = {o.name for o in g.output}
    try:
        inferred = onnx.shape_inference.infer_shapes(probe).graph
        types = {vi.name: vi.type.tensor_type.elem_type for vi in [*inferred.value_info, *inferred.input]}
    except Exception:  # noqa: BLE001 - shape inference is only a hint for the probe's output types
        types = {}
    for n in g.node:
        for name in n.output:
            if name and name not in existing:
                g.output.append(helper.make_tensor_value_info(name, types.get(name, TensorProto.UNDEFINED), None))
                existing.add(name)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    shapes = {k: list(np.shape(v)) for k, v in zip(names, sess.run(names, sample))}
    shapes.update({t.name: [int(d) for d in t.dims] for t in model.graph.initializer})
    shapes.update({k: list(np.shape(v)) for k, v in sample.items()})
    return shapes


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
    shapes = measured_shapes(model, sample)
    out_shape = tuple(shapes[g.output[0].name])
    if len(out_shape) != 2 or out_shape[1] < 2:
        raise InvalidSpec(f"early exits need a classifier: the first output {g.output[0].name!r} has shape "
                          f"{list(out_shape)}, not [N, classes]", [{"loc": ["method"], "msg": "not a classifier"}])
    const = constant_values(g)
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.value_info, *g.input, *g.output]}
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
        elem.update({vi.name: vi.type.tensor_type.elem_type for vi in inferred.value_info})
    except Exception:  # noqa: BLE001 - unknown types are treated as float below
        pass
    per_node = [_node_macs(n, shapes) for n in nodes]
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


def _reduce(op: str, x: str, out: str, opset: int, name: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """``op(x, axis=1, keepdims=0)``: axes became an input for every Reduce op in opset 18 (ReduceSum in 13)."""
    axes_as_input = opset >= 18 or (op == "ReduceSum" and opset >= 13)
    if axes_as_input:
        axes = numpy_helper.from_array(np.array([1], np.int64), f"{name}/axes")
        return [helper.make_node(op, [x, axes.name], [out], name=name, keepdims=0)], [axes]
    return [helper.make_node(op, [x], [out], name=name, axes=[1], keepdims=0)], []


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
        cuts: where the heads go (from :func:`choose_cuts`), in graph order.
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
        model: a multi-exit model from :func:`add_exit_heads` (trained).
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
