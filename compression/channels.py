"""The channel planner: which output channels of a converted :class:`~compression.converter.OnnxModule`
can shrink, and in which groups. Channel pruning (:mod:`compression.techniques.pruning.channel`) removes
them; slimmable networks (:mod:`compression.techniques.slimmable`) mask and slice them per width.

Two kinds of groups:

- **DepGraph groups** (CNNs, MLPs): torch-pruning's dependency graph traced through the converted
  module couples conv filters, BatchNorm channels, residual adds, concats and the next layer's input
  channels. Layers whose output is a graph output are never pruned (the classifier keeps its classes),
  and every other layer is *proved* prunable first: one channel of it is removed on a copy, the copy
  is exported back to ONNX and must run in ONNX Runtime with the same numbers as in torch. Layers that
  fail that probe are left alone and reported with the reason.
- **Transformer groups** (attention heads and FFN neurons): DepGraph cannot see through the per-head
  reshapes of an exported encoder, so the ONNX graph is read instead: ``softmax(Q·Kᵀ)·V → O`` gives
  one head group per head (rows of Q/K/V, columns of O), ``Linear → activation → Linear`` gives one
  FFN neuron group per hidden unit. The residual width (tied to the embeddings and every LayerNorm)
  is kept.

torch-pruning is imported on first use (:func:`torch_pruning`): it is slow to import, and only the steps
that change channels need it.

Example:
    >>> module = to_torch(model); module.record_shapes(*example)            # doctest: +SKIP
    >>> plan = plan_channels(module, model, example)                         # doctest: +SKIP
    >>> sorted(plan.ignored)                 # the classifier, layers that failed the probe  # doctest: +SKIP
"""
from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from torch import nn

from compression.depgraph import build_graph, sync_live_sizes
from compression.graph_prep import fold_identity_constants, lift_constants, unshare_initializers
from compression.errors import CompressionError
from compression.metrics import run_batched, session

if TYPE_CHECKING:
    from compression.converter import OnnxModule

# Ops a channel passes through unchanged (elementwise, with scalar or same-source other inputs).
_ELEMENTWISE = {
    "Identity", "Relu", "Gelu", "Erf", "Tanh", "Sigmoid", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt",
    "LeakyRelu", "Elu", "Selu", "HardSigmoid", "HardSwish", "Softplus", "Clip", "Dropout", "Cast", "Neg",
    "Abs", "Exp", "Log", "PRelu", "Mish",
}
_HEAD_PATH = {"Reshape", "Transpose", "Identity", "Mul", "Div", "Cast", "Dropout"}
_SCORE_PATH = {"Add", "Mul", "Div", "Where", "Identity", "Cast", "Sub"}
_PROB_PATH = {"Where", "Dropout", "Identity", "Cast", "IsNaN"}


@dataclass
class Layer:
    """One prunable layer: ONNX node name, its module key and module, its weight initializer."""

    name: str
    key: str
    module: nn.Module
    weight: str
    output: str  # the ONNX value the layer's channels leave through (after a fused bias Add)

    @property
    def channels(self) -> int:
        m = self.module
        return int(m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features)


@dataclass
class AttentionBlock:
    q: Layer
    k: Layer
    v: Layer
    o: Layer
    heads: int
    head_dim: int


@dataclass
class ChannelPlan:
    """What can be pruned: prunable layers, the ones left alone (with why), transformer groups."""

    layers: dict[str, Layer]
    ignored: dict[str, str] = field(default_factory=dict)
    attention: list[AttentionBlock] = field(default_factory=list)
    ffn: list[tuple[Layer, Layer]] = field(default_factory=list)

    @property
    def transformer(self) -> bool:
        return bool(self.attention)


# ----------------------------------------------------------------------------------- graph facts
def prunable_layers(module: OnnxModule) -> dict[str, Layer]:
    """ONNX node name -> :class:`Layer` for every Conv/Gemm/MatMul whose weight became a torch layer."""
    weight_of = {(s.key, s.attr): name for name, s in module._sources.items() if s.container == "weights"}
    out: dict[str, Layer] = {}
    consumers = _consumers(module)
    for spec in module._nodes:
        ref = spec.extra.get("module")
        if not ref or ref[0] != "weights" or spec.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        mod = module.weights[ref[1]]
        if isinstance(mod, nn.modules.conv._ConvNd) and mod.groups != 1:
            continue  # depthwise/grouped: pruned through the group of the layer feeding it
        output = spec.outputs[0]
        fused = [c for c in consumers.get(output, []) if c.impl == "Identity" and c.name == spec.extra.get("fused_add")]
        if fused:
            output = fused[0].outputs[0]
        out[spec.name] = Layer(spec.name, ref[1], mod, weight_of.get((ref[1], "weight"), ""), output)
    return out


def _consumers(module: OnnxModule) -> dict[str, list]:
    cons: dict[str, list] = defaultdict(list)
    for spec in module._nodes:
        for name in spec.inputs:
            if name:
                cons[name].append(spec)
    return cons


def output_layers(module: OnnxModule, layers: dict[str, Layer]) -> set[str]:
    """Layers whose output channels reach a graph output without passing another layer (e.g. the classifier)."""
    producers = {o: spec for spec in module._nodes for o in spec.outputs if o}
    by_output = {spec.outputs[0]: spec.name for spec in module._nodes if spec.name in layers}
    found, seen = set(), set()
    stack = list(module.output_names)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in by_output:
            found.add(by_output[name])
            continue
        spec = producers.get(name)
        if spec is not None:
            stack.extend(i for i in spec.inputs if i)
    return found


def find_transformer_groups(module: OnnxModule, layers: dict[str, Layer],
                            ) -> tuple[list[AttentionBlock], list[tuple[Layer, Layer]]]:
    """Attention blocks (Q, K, V, O, heads) and FFN pairs (up, down) read from the converted graph."""
    producers = {o: spec for spec in module._nodes for o in spec.outputs if o}
    consumers = _consumers(module)
    const = {n: src.shape for n, src in module._sources.items()}
    by_spec = {spec.name: layers[spec.name] for spec in module._nodes if spec.name in layers}

    def data_input(spec) -> str | None:
        ins = [i for i in spec.inputs if i and i not in const]
        return ins[0] if ins else None

    def back_to_layer(name: str, allowed: set[str], reshapes: list | None = None) -> Layer | None:
        for _ in range(16):
            spec = producers.get(name)
            if spec is None:
                return None
            if spec.name in by_spec:
                return by_spec[spec.name]
            if spec.impl == "Identity" and spec.op_type == "Add":  # bias fused into the Linear
                name = spec.inputs[0]
                continue
            if spec.op_type not in allowed:
                return None
            if spec.op_type == "Reshape" and reshapes is not None:
                reshapes.append(spec)
            nxt = data_input(spec)
            if nxt is None:
                return None
            name = nxt
        return None

    def back_to(name: str, allowed: set[str], op: str):
        for _ in range(16):
            spec = producers.get(name)
            if spec is None:
                return None
            if spec.op_type == op and spec.name not in by_spec:
                return spec
            if spec.op_type not in allowed:
                return None
            ins = [i for i in spec.inputs if i and i not in const]
            if not ins:
                return None
            name = ins[-1] if spec.op_type == "Where" else ins[0]
        return None

    blocks: list[AttentionBlock] = []
    for sm in (s for s in module._nodes if s.op_type == "Softmax"):
        score = back_to(sm.inputs[0], _SCORE_PATH, "MatMul")
        ctx = _forward_to(sm.outputs[0], consumers, _PROB_PATH, "MatMul", by_spec)
        if score is None or ctx is None or len(score.inputs) < 2 or len(ctx.inputs) < 2:
            continue
        q_shapes: list = []
        q = back_to_layer(score.inputs[0], _HEAD_PATH, q_shapes)
        k = back_to_layer(score.inputs[1], _HEAD_PATH)
        v = back_to_layer(ctx.inputs[1], _HEAD_PATH)
        o = _forward_to_layer(ctx.outputs[0], consumers, by_spec)
        if None in (q, k, v, o) or not q_shapes:
            continue
        rec = q_shapes[-1].extra.get("reshape_shapes")  # the first reshape after Q: [N, S, H, d]
        if rec is None or len(rec[1]) != 4:
            continue
        heads, head_dim = int(rec[1][2]), int(rec[1][3])
        if heads * head_dim != q.channels or k.channels != q.channels or v.channels != q.channels:
            continue
        blocks.append(AttentionBlock(q, k, v, o, heads, head_dim))
    in_attention = {layer.name for b in blocks for layer in (b.q, b.k, b.v, b.o)}
    ffn = []
    for up in layers.values():
        if up.name in in_attention or not isinstance(up.module, nn.Linear):
            continue
        down = _sole_next_layer(up, consumers, by_spec, const, module.output_names)
        if down is not None and isinstance(down.module, nn.Linear) and down.name not in in_attention:
            ffn.append((up, down))
    return blocks, ffn


def _forward_to(name: str, consumers, allowed: set[str], op: str, by_spec):
    for _ in range(16):
        users = [u for u in consumers.get(name, []) if u.op_type != "Shape"]
        hit = [u for u in users if u.op_type == op and u.name not in by_spec and u.inputs[0] == name]
        if hit:
            return hit[0]
        nxt = [u for u in users if u.op_type in allowed and u.op_type != "IsNaN"]  # IsNaN only builds a mask
        if len(nxt) != 1:
            return None
        name = nxt[0].outputs[0]
    return None


def _forward_to_layer(name: str, consumers, by_spec) -> Layer | None:
    for _ in range(16):
        users = [u for u in consumers.get(name, []) if u.op_type != "Shape"]  # reads sizes, not values
        if len(users) != 1:
            return None
        u = users[0]
        if u.name in by_spec:
            return by_spec[u.name]
        if u.op_type not in ("Transpose", "Reshape", "Identity"):
            return None
        name = u.outputs[0]
    return None


def _sole_next_layer(up: Layer, consumers, by_spec, const: dict[str, tuple], outputs: list[str]) -> Layer | None:
    """The one layer that up's channels flow into through elementwise ops only (an FFN pair)."""
    derived, frontier, visited, down = {up.output}, [up.output], [], None
    while frontier:
        name = frontier.pop()
        if name in outputs:
            return None
        for u in consumers.get(name, []):
            if u.name in by_spec:
                if u.inputs[0] != name or (down is not None and down.name != u.name):
                    return None
                down = by_spec[u.name]
                continue
            if u.op_type not in _ELEMENTWISE:
                return None
            visited.append(u)
            out = u.outputs[0]
            if out not in derived:
                derived.add(out)
                frontier.append(out)
    for u in visited:  # every other operand: the same channels (x·gelu(x)) or a scalar constant
        for other in u.inputs:
            if other and other not in derived and (other not in const or int(np.prod(const[other])) > 1):
                return None
    return down


def prepare_for_channels(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph channel pruning works on (and returns): ``Constant`` weights lifted into initializers (the
    converter trains initializers only), ``Identity(initializer)`` folded into initializers and tensors
    several layers share given one copy each
    (:mod:`compression.graph_prep`). Computes the same as ``model``."""
    model, _ = lift_constants(model)
    model, _ = fold_identity_constants(model)
    model, _ = unshare_initializers(model)
    return model


# ------------------------------------------------------------------------------------ DepGraph
def torch_pruning() -> ModuleType:
    """The ``torch_pruning`` package, imported on first use (it is slow to import, and only steps that
    change channels need it)."""
    import torch_pruning as tp

    return tp


def group_importance(name: str):
    """torch-pruning's importance for DepGraph groups: ``l1``, ``l2``, ``taylor``, ``bn_scale``, ``random``.

    Channel pruning ranks the channels to remove with it; slimmable networks order each group's channels
    with ``l1`` (the narrow widths keep the strongest).
    """
    tp = torch_pruning()
    return {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
        "bn_scale": lambda: tp.importance.BNScaleImportance(),
        "random": lambda: tp.importance.RandomImportance(),
    }[name]()


def out_channel_pruner(module: nn.Module) -> Callable:
    """torch-pruning's function that removes output channels of ``module`` (a conv or a linear layer):
    the trigger a DepGraph group is built from."""
    tp = torch_pruning()
    return tp.prune_conv_out_channels if isinstance(module, nn.modules.conv._ConvNd) else tp.prune_linear_out_channels


def first_output(y: torch.Tensor | tuple | list) -> torch.Tensor:
    """The first output of a converted module's forward (a tensor alone, or the first of several)."""
    return y[0] if isinstance(y, (tuple, list)) else y


class ExportMismatch(CompressionError, RuntimeError):
    """An exported graph, run in ONNX Runtime, does not compute what the torch module it was cut from computes.

    A job that meets it fails with ``export_mismatch`` and the numbers — a graph we could not rewrite
    faithfully is never published (measured on the zoo's ConvNeXt: slimmable's width 0.25 through LayerNorm)."""

    code = "export_mismatch"

    def __init__(self, what: str, error: float) -> None:
        super().__init__(f"{what} (max error {error:.3g}); the rewritten graph is not published",
                         details={"max_error": float(error)})
        self.error = error


def check_export(exported: onnx.ModelProto, module: nn.Module, feeds: dict[str, np.ndarray], *, what: str,
                 threads: int = 0, atol: float = 1e-3) -> float:
    """Prove an export against torch: ``exported``'s first output in ONNX Runtime and ``module``'s (as it is:
    eval mode, the width selected), on the same ``feeds``. Channel pruning's export, each slimmable width's
    and the planner's one-channel probe are all checked this way.

    Args:
        feeds: the module's inputs by name, in its input order.
        what: what the export would not be, for the error.

    Returns:
        The largest absolute difference.

    Raises:
        ExportMismatch: the difference is over ``1e-3 · max|torch output| + atol`` (or not finite).

    Example:
        >>> check_export(module.export_resized(model, *example), module, feeds, what="pruned graph differs")  # doctest: +SKIP
        2.4e-07
    """
    with torch.no_grad():
        want = first_output(module(*[torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()])).numpy()
    got = run_batched(session(exported, threads), feeds)[0]  # one sample per run where the graph fixes batch 1
    err = float(np.abs(got - want).max())
    if not err <= 1e-3 * float(np.abs(want).max()) + atol:
        raise ExportMismatch(what, err)
    return err


def probe(module: OnnxModule, model: onnx.ModelProto, example: tuple[torch.Tensor, ...], layers: list[Layer],
          ) -> str | None:
    """Remove one output channel of each of ``layers`` on a copy; None when the copy exports to ONNX and
    ONNX Runtime agrees with torch, else what went wrong."""
    clone = copy.deepcopy(module)
    try:
        with torch.no_grad():
            ref_shape = tuple(first_output(clone(*example)).shape)
        dg = build_graph(clone, example)
        for layer in layers:
            mod = clone.weights[layer.key]
            if (mod.out_channels if isinstance(mod, nn.modules.conv._ConvNd) else mod.out_features) < 2:
                continue
            group = dg.get_pruning_group(mod, out_channel_pruner(mod), idxs=[0])
            if not dg.check_pruning_group(group):
                return "no channel of it can be removed (coupled to a layer that must keep its size)"
            group.prune()
        sync_live_sizes(clone, dg)
        with torch.no_grad():
            y = first_output(clone(*example))
        if tuple(y.shape) != ref_shape:
            return f"pruning changes the output shape {ref_shape} -> {tuple(y.shape)}"
        exported = clone.export_resized(model, *example)
        feeds = {n: t.numpy() for n, t in zip(clone.input_names, example, strict=True)}
        try:
            check_export(exported, clone, feeds, what="exported graph disagrees with torch after pruning", threads=1,
                         atol=1e-4)
        except ExportMismatch as e:
            return str(e)
    except Exception as e:  # any failure means: not safe to prune this way
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None


def plan_channels(module: OnnxModule, model: onnx.ModelProto, example: tuple[torch.Tensor, ...]) -> ChannelPlan:
    """Find what can be pruned. Needs ``module.record_shapes(*example)`` to have run."""
    layers = prunable_layers(module)
    plan = ChannelPlan(layers=layers)
    for spec in module._nodes:
        if spec.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose") and spec.name not in layers:
            ref = spec.extra.get("module")
            if ref is None and spec.op_type != "MatMul":
                plan.ignored[spec.name] = "weight is computed at run time (not a constant): no channels to remove"
            elif ref is not None and spec.op_type == "ConvTranspose":
                plan.ignored[spec.name] = "ConvTranspose layers are not channel-pruned"
    attention, ffn = find_transformer_groups(module, layers)
    if attention:  # an encoder: heads and FFN neurons; otherwise DepGraph handles Linear pairs as well
        plan.attention, plan.ffn = attention, ffn
        grouped = {la.name for b in plan.attention for la in (b.q, b.k, b.v, b.o)} | {
            la.name for pair in plan.ffn for la in pair}
        for name in layers:
            if name not in grouped:
                plan.ignored[name] = ("output width is the residual stream (tied to the embeddings and every "
                                      "LayerNorm): kept")
        return plan
    for spec in module._nodes:
        ref = spec.extra.get("module")
        conv = module.weights[ref[1]] if ref and ref[0] == "weights" else None
        if isinstance(conv, nn.modules.conv._ConvNd) and 1 < conv.groups < conv.out_channels:
            plan.ignored[spec.name] = (f"grouped convolution (groups={conv.groups}): not channel-pruned "
                                       "(depthwise convs are pruned with the layer that feeds them)")
    for name in output_layers(module, layers):
        plan.ignored[name] = "feeds a graph output (e.g. the classifier): its output size is the model's contract"
    candidates = [la for n, la in layers.items() if n not in plan.ignored]
    if candidates and probe(module, model, example, candidates) is not None:
        for la in candidates:  # find the culprits one by one
            why = probe(module, model, example, [la])
            if why is not None:
                plan.ignored[la.name] = why
    return plan
