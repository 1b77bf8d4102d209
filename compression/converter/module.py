"""``OnnxModule``: an ``nn.Module`` that interprets an ONNX graph with trainable torch tensors.

Design: conversion (:class:`GraphBuilder`) turns nodes into plain :class:`NodeSpec` records, lets
weight-carrying ops claim their initializers as real layers (``nn.Conv2d``/``nn.Linear``/
``nn.BatchNorm2d`` in ``weights``/``norms``), and registers every other initializer as a
``nn.Parameter`` (float with more than one element) or a buffer (integers, scalars, Resize scales).
A claimed weight that other nodes also read is served to them from the layer, so sharing survives. ``forward`` walks the nodes in topological order through
the op registry, so any op expressible with differentiable torch ops can be added without touching
this file.

Every claimed tensor remembers where it came from (:class:`TensorSource`: initializer name, layout
transform, original shape/dtype), which is what makes :meth:`OnnxModule.write_back` exact: the
original graph is kept and only initializer payloads change.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.inliner
import onnx.shape_inference
import torch
from onnx import helper, numpy_helper
from torch import nn

from . import nodes as N
# Importing the op modules fills the registry (each op registers itself with @register_op).
from . import ops_control, ops_elementwise, ops_nn, ops_recurrent, ops_reduce, ops_resize, ops_shape  # noqa: F401
from .nodes import NodeSpec, SubGraph
from .ops import UnsupportedOp, as_outputs, get_op_by_key, is_supported

_INDEXED_CONTAINERS = ("weights", "norms", "params")


@dataclass(frozen=True)
class TensorSource:
    """Where the live torch tensor of one ONNX constant lives, and how to map it back.

    ``location`` is ``("initializer", name)`` or ``("constant", output_name)`` for values that
    :meth:`OnnxModule.write_back` writes, or ``None`` for values it must leave alone (subgraph
    constants and Constant nodes that were not turned into weights).
    """

    container: str  # "weights" | "norms" | "params" | "consts"
    key: str
    attr: str | None  # attribute of the module in ``container[key]`` (e.g. "weight"), or None
    transpose: bool  # torch tensor is the 2-D transpose of the ONNX tensor
    shape: tuple[int, ...]  # ONNX shape
    onnx_dtype: int
    location: tuple[str, str] | None


class _BufferHolder(nn.Module):
    """Holds non-trainable constants as buffers so ``.to(device)`` moves them with the module."""


class OnnxModule(nn.Module):
    """Trainable PyTorch version of an ONNX graph; see :func:`compression.converter.to_torch`.

    ``forward`` takes the graph inputs positionally (graph order) and returns one tensor, or a tuple
    when the graph has several outputs. The module starts in eval mode, matching ONNX inference
    semantics (BatchNormalization uses running statistics, Dropout is the identity); call
    ``.train()`` for fine-tuning with batch statistics.
    """

    input_names: list[str]
    output_names: list[str]

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        self.weights = nn.ModuleDict()  # Conv/Gemm/MatMul layers, keyed by sanitized node name
        self.norms = nn.ModuleDict()  # BatchNorm layers
        self.params = nn.ParameterDict()  # remaining float initializers with > 1 element
        self.consts = _BufferHolder()  # int/scalar initializers, Constant-node values (not trained)
        self._sources: dict[str, TensorSource] = {}
        self._nodes: list[NodeSpec] = []
        self._needed: list[str] = []
        self._input_dtypes: list[torch.dtype | None] = []
        self.input_names = []
        self.output_names = []
        GraphBuilder(self, model).build()
        self.eval()

    # ----------------------------------------------------------------------------------- running
    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise TypeError(
                f"expected {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}"
            )
        env: dict[str, torch.Tensor] = {}
        for name, x, dtype in zip(self.input_names, inputs, self._input_dtypes, strict=True):
            x = torch.as_tensor(x)
            if dtype is not None and x.dtype != dtype:
                x = x.to(dtype)
            env[name] = x
        for name in self._needed:
            env[name] = self._source_value(name)
        self.run_nodes(self._nodes, env)
        outs = tuple(env[name] for name in self.output_names)
        return outs[0] if len(outs) == 1 else outs

    def run_nodes(self, nodes: list[NodeSpec], env: dict[str, torch.Tensor]) -> None:
        """Execute ``nodes`` in order, reading and writing values in ``env`` (also used by ``If``)."""
        for node in nodes:
            xs = [env[name] if name else None for name in node.inputs]
            try:
                result = get_op_by_key(node.impl).run(self, node, xs)
            except Exception as exc:
                exc.add_note(f"while running ONNX node {node.name!r} ({node.op_type})")
                raise
            for name, value in zip(node.outputs, as_outputs(result)):
                if name and value is not None:
                    env[name] = value

    def run_subgraph(self, graph: SubGraph, env: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        scope = dict(env)
        for name, key in graph.constants.items():
            scope[name] = getattr(self.consts, key)
        self.run_nodes(graph.nodes, scope)
        return [scope[name] for name in graph.outputs]

    # ---------------------------------------------------------------------------------- tensors
    def _source_object(self, src: TensorSource) -> torch.Tensor:
        holder = getattr(self, src.container)
        obj = holder[src.key] if src.container in _INDEXED_CONTAINERS else getattr(holder, src.key)
        return getattr(obj, src.attr) if src.attr else obj

    def _source_value(self, name: str) -> torch.Tensor:
        src = self._sources[name]
        t = self._source_object(src)
        if src.transpose:
            t = t.t()
        if tuple(t.shape) != src.shape:
            t = t.reshape(_onnx_shape(t, src.shape))
        return t

    def initializer_value(self, name: str) -> torch.Tensor:
        """Current value of ONNX initializer/constant ``name`` in ONNX layout (differentiable)."""
        return self._source_value(name)

    def tensor_name(self, name: str) -> str:
        """``state_dict`` key of the tensor backing ONNX initializer ``name`` (e.g. for optimizers)."""
        src = self._sources[name]
        return ".".join(p for p in (src.container, src.key, src.attr) if p)

    def weight_modules(self) -> dict[str, nn.Module]:
        """Sanitized ONNX node name -> layer, for each Conv/ConvTranspose/Gemm/MatMul with constant weights.

        The layers are the live modules of this OnnxModule (pruning them edits the model in place).
        """
        return dict(self.weights.items())

    # ------------------------------------------------------------------------ structural changes
    def record_shapes(self, *inputs: torch.Tensor) -> None:
        """Run once and remember every Reshape's input and output shapes.

        Call it before a structural change (channel pruning): afterwards a Reshape whose target the
        graph baked into a constant (``[-1, 1568]``) follows the live channel count instead of
        silently regrouping the batch, and :meth:`export_resized` rewrites that constant.
        """
        self._probe(inputs, "record")

    def _probe(self, inputs: tuple[torch.Tensor, ...], mode: str) -> None:
        was_training = self.training
        self.eval()
        self._shape_probe = mode
        try:
            with torch.no_grad():
                self(*inputs)
        finally:
            self._shape_probe = None
            self.train(was_training)

    def export_resized(self, model: onnx.ModelProto, *inputs: torch.Tensor) -> onnx.ModelProto:
        """Like :meth:`write_back`, for layers whose shapes changed (channels removed physically).

        The graph is the original one; initializers get the new, smaller tensors; Reshape targets
        held as constants (directly or as constant pieces of a ``Concat``) are rewritten from the
        shapes seen on ``inputs``; stale intermediate ``value_info`` is dropped. Needs
        :meth:`record_shapes` to have run on the unchanged module.

        Raises:
            ValueError: a shape constant could not be traced back to something rewritable.
        """
        self._probe(inputs, "live")
        out = self.write_back(model, resize=True)
        _fix_reshape_constants(self, out)
        _fix_conv_groups(self, out)
        _fix_split_sizes(self, out)
        graph_io = {v.name for v in [*out.graph.input, *out.graph.output]}
        keep = [v for v in out.graph.value_info if v.name in graph_io]
        del out.graph.value_info[:]
        out.graph.value_info.extend(keep)
        used = {name for node in out.graph.node for name in N.node_inputs_with_subgraphs(node)} | graph_io
        live = [t for t in out.graph.initializer if t.name in used]
        if len(live) != len(out.graph.initializer):  # constants replaced by their resized copies
            del out.graph.initializer[:]
            out.graph.initializer.extend(live)
        return out

    def write_back(self, model: onnx.ModelProto, *, resize: bool = False) -> onnx.ModelProto:
        """Return a copy of ``model`` whose initializers hold this module's current values.

        Layout transforms applied at conversion are undone (MatMul ``[K, N]`` vs ``Linear.weight
        [N, K]``, Gemm ``transB=0``, a MatMul+Add bias fused into the Linear goes back into the Add's
        initializer) and dtypes are restored. The graph structure is left untouched, so this is for
        weight-level changes (fine-tuning, unstructured pruning), not for layers whose shape changed.
        """
        out = onnx.ModelProto()
        out.CopyFrom(model)
        init_index = {t.name: i for i, t in enumerate(out.graph.initializer)}
        const_nodes = {
            node.output[0]: node for node in out.graph.node if node.op_type == "Constant" and node.output
        }
        for name, src in self._sources.items():
            if src.location is None:
                continue
            t = self._source_object(src).detach()
            if src.transpose:
                t = t.t()
            shape = src.shape
            if resize:
                shape = _onnx_shape(t, src.shape)
            elif int(np.prod(t.shape)) != int(np.prod(src.shape)):
                raise ValueError(
                    f"tensor for initializer {name!r} has shape {tuple(t.shape)} but the graph expects "
                    f"{src.shape}; write_back only supports weight-level changes, not structural ones"
                )
            np_dtype = helper.tensor_dtype_to_np_dtype(src.onnx_dtype)
            if t.dtype == torch.bfloat16:
                t = t.float()
            arr = t.cpu().contiguous().numpy().reshape(shape).astype(np_dtype)
            tensor = numpy_helper.from_array(arr, name)
            kind, where = src.location
            if kind == "initializer":
                if where not in init_index:
                    raise ValueError(f"model has no initializer {where!r}: not the converted model")
                out.graph.initializer[init_index[where]].CopyFrom(tensor)
            else:
                node = const_nodes.get(where)
                if node is None:
                    raise ValueError(f"model has no Constant node producing {where!r}")
                for attr in node.attribute:
                    if attr.name == "value":
                        attr.t.CopyFrom(tensor)
        return out


def _onnx_shape(t: torch.Tensor, original: tuple[int, ...]) -> tuple[int, ...]:
    """ONNX shape for live tensor ``t`` whose constant had shape ``original`` (e.g. a Gemm bias
    ``[1, N]`` held as ``[N]``): the original when only the layout differs, else ``t``'s dims padded
    with the original's leading 1s."""
    if int(np.prod(t.shape)) == int(np.prod(original)):
        return tuple(original)
    dims = tuple(t.shape)
    extra = len(original) - len(dims)
    if extra > 0 and all(d == 1 for d in original[:extra]):
        return (1,) * extra + dims
    return dims


class _Constants:
    """The constants of an exported graph ``out``: read one (an initializer or a ``Constant`` node), or add
    a resized int64 copy under a fresh name (the original may be shared with other nodes)."""

    def __init__(self, out: onnx.ModelProto) -> None:
        self.out = out
        self.producers = {o: node for node in out.graph.node for o in node.output if o}
        self.inits = {t.name: t for t in out.graph.initializer}
        self.taken = set(self.inits) | set(self.producers)

    def value(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant":
            return constant_node_value(node)[0]
        return None

    def ints(self, name: str) -> list[int]:
        value = self.value(name)
        if value is None:
            raise ValueError(f"{name!r} is computed at run time: cannot rewrite it for pruned channels")
        return [int(v) for v in value.reshape(-1)]

    def new(self, base: str, values) -> str:
        name, i = f"{base}__resized", 1
        while name in self.taken:
            name, i = f"{base}__resized_{i}", i + 1
        self.taken.add(name)
        self.out.graph.initializer.append(numpy_helper.from_array(np.asarray(values).astype(np.int64), name))
        return name


def _fix_split_sizes(m: OnnxModule, out: onnx.ModelProto) -> None:
    """Write the live sizes of Split and Slice nodes (channels removed before them, see
    :mod:`compression.depgraph`) into the exported graph: a Split's ``split`` attribute (opset < 13) or
    sizes input, a Slice's starts and ends on the channel axis."""
    consts = _Constants(out)
    for spec in m._nodes:
        live_split, live_slice = spec.extra.get("split_live"), spec.extra.get("slice_live")
        if live_split is None and not live_slice:
            continue
        node = consts.producers[next(o for o in spec.outputs if o)]
        if live_split is not None:
            drop = "split" if spec.opset < 13 else "num_outputs"
            attrs = [a for a in node.attribute if a.name != drop]
            if spec.opset < 13:
                attrs.append(helper.make_attribute("split", live_split))
            else:
                while len(node.input) < 2:
                    node.input.append("")
                node.input[1] = consts.new(f"{spec.name}_split", live_split)
            del node.attribute[:]
            node.attribute.extend(attrs)
            continue
        if spec.opset < 10:
            raise ValueError(f"Slice {spec.name!r} (opset {spec.opset}) on pruned channels: cannot rewrite it")
        starts, ends = consts.ints(node.input[1]), consts.ints(node.input[2])
        axes = consts.ints(node.input[3]) if len(node.input) > 3 and node.input[3] else list(range(len(starts)))
        rank = spec.extra.get("slice_rank", 4)
        for k, axis in enumerate(axes):
            axis = axis + rank if axis < 0 else axis
            if axis in live_slice:
                starts[k], ends[k] = live_slice[axis]
        node.input[1] = consts.new(f"{spec.name}_starts", starts)
        node.input[2] = consts.new(f"{spec.name}_ends", ends)


def _fix_conv_groups(m: OnnxModule, out: onnx.ModelProto) -> None:
    """A depthwise conv that lost channels has fewer groups: copy ``groups`` back into the node."""
    producers = {o: node for node in out.graph.node for o in node.output if o}
    for spec in m._nodes:
        ref = spec.extra.get("module")
        if spec.op_type not in ("Conv", "ConvTranspose") or not ref:
            continue
        groups = int(getattr(getattr(m, ref[0])[ref[1]], "groups", 1))
        if groups == int(spec.attr("group", 1)):
            continue
        node = producers[spec.outputs[0]]
        attrs = [a for a in node.attribute if a.name != "group"]
        del node.attribute[:]
        node.attribute.extend([*attrs, helper.make_attribute("group", groups)])


def _fix_reshape_constants(m: OnnxModule, out: onnx.ModelProto) -> None:
    """Rewrite Reshape targets whose constant pieces no longer fit the pruned channels."""
    from .ops_shape import follow_reshape

    consts = _Constants(out)
    producers, const_value, new_const = consts.producers, consts.value, consts.new

    for spec in m._nodes:
        if spec.op_type != "Reshape" or spec.opset < 5:
            continue
        recorded, live = spec.extra.get("reshape_shapes"), spec.extra.get("reshape_live")
        if recorded is None or live is None or follow_reshape(recorded, live[0]) is None:
            continue
        want = list(live[1])
        allowzero = bool(spec.attr("allowzero", 0))
        onnx_node = producers[spec.outputs[0]]

        def fitted(target: np.ndarray, offset: int) -> np.ndarray:
            res = target.copy().reshape(-1)
            for k, v in enumerate(res):
                if v == -1 or (v == 0 and not allowzero):
                    continue  # inferred from the live input at run time
                res[k] = want[offset + k]
            return res

        target_name = onnx_node.input[1]
        value = const_value(target_name)
        if value is not None:
            new = fitted(value, 0)
            if not np.array_equal(new, value.reshape(-1)):
                onnx_node.input[1] = new_const(target_name, new.reshape(value.shape))
            continue
        concat = producers.get(target_name)
        if concat is None or concat.op_type != "Concat":
            raise ValueError(f"Reshape {spec.name!r}: its target is computed by "
                             f"{concat.op_type if concat else 'an input'}, which cannot be rewritten")
        pieces = [const_value(i) for i in concat.input]
        if all(p is None for p in pieces):
            continue  # computed from live shapes: ONNX Runtime follows the pruned sizes by itself
        n_dynamic = sum(p is None for p in pieces)
        fixed = sum(int(p.size) for p in pieces if p is not None)
        if n_dynamic and (len(want) - fixed) != n_dynamic:
            raise ValueError(f"Reshape {spec.name!r}: cannot map its Concat target onto {len(want)} dims")
        offset = 0
        for k, piece in enumerate(pieces):
            if piece is None:
                offset += 1
                continue
            new = fitted(piece, offset)
            if not np.array_equal(new, piece.reshape(-1)):
                concat.input[k] = new_const(concat.input[k], new.reshape(piece.shape))
            offset += int(piece.size)


def _as_initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def constant_node_value(node: onnx.NodeProto) -> tuple[np.ndarray, bool]:
    """Value of a Constant node and whether it is a writable ``value`` tensor."""
    if len(node.attribute) != 1:
        raise ValueError(f"Constant node {node.name!r} must have exactly one attribute")
    attr = node.attribute[0]
    if attr.name == "value":
        return N.tensor_to_numpy(attr.t), True
    if attr.name == "value_float":
        return np.array(attr.f, dtype=np.float32), False
    if attr.name == "value_floats":
        return np.array(list(attr.floats), dtype=np.float32), False
    if attr.name == "value_int":
        return np.array(attr.i, dtype=np.int64), False
    if attr.name == "value_ints":
        return np.array(list(attr.ints), dtype=np.int64), False
    raise NotImplementedError(f"Constant node {node.name!r} with attribute {attr.name!r}")


class GraphBuilder:
    """Builds an :class:`OnnxModule` from a model; the API ``prepare`` hooks use to claim weights."""

    def __init__(self, module: OnnxModule, model: onnx.ModelProto) -> None:
        self.m = module
        if len(model.functions):
            model = onnx.inliner.inline_local_functions(model)
        self.model = model
        self.opsets = N.opsets(model)
        self._node_keys: set[str] = set()
        self._param_keys: set[str] = set()
        self._const_keys: set[str] = set()
        # Top-level constants: name -> (value, ONNX dtype, location, writable by write_back)
        self._consts: dict[str, tuple[np.ndarray, int, tuple[str, str], bool]] = {}
        self._claimed: set[str] = set()
        self._consumers: dict[str, list[NodeSpec]] = defaultdict(list)
        self._outputs: set[str] = set()
        self._ranks: dict[str, int] | None = None
        self._frozen: set[str] = set()

    # ------------------------------------------------------------------------------ prepare API
    def const(self, name: str) -> np.ndarray | None:
        """Value of ``name`` if it is a top-level constant that no op has claimed yet."""
        if not name or name in self._claimed or name not in self._consts:
            return None
        return self._consts[name][0]

    def sole_consumer(self, name: str) -> NodeSpec | None:
        """The only node reading ``name``, or None if it is read by several nodes or is a graph output."""
        users = self._consumers.get(name, [])
        if name in self._outputs or len(users) != 1:
            return None
        return users[0]

    def claim(
        self,
        node: NodeSpec,
        module: nn.Module,
        bindings: dict[str, tuple[str, bool]],
        *,
        container: str = "weights",
        inputs: list[str] | None = None,
    ) -> None:
        """Register ``module`` for ``node`` and record that constants in ``bindings`` now live in it.

        ``bindings`` maps ONNX constant name -> (module attribute, transposed?). ``inputs`` replaces
        the node's input list (constants consumed by the module are dropped from it).
        """
        getattr(self.m, container)[node.key] = module
        for name, (attr, transpose) in bindings.items():
            arr, onnx_dtype, location, writable = self._consts[name]
            self._claimed.add(name)
            self.m._sources[name] = TensorSource(
                container, node.key, attr, transpose, tuple(arr.shape), onnx_dtype,
                location if writable else None,
            )
        node.extra["module"] = (container, node.key)
        if inputs is not None:
            node.inputs = list(inputs)

    def freeze(self, name: str) -> None:
        """Keep float constant ``name`` a buffer (e.g. Resize scales: read as numbers, not weights)."""
        self._frozen.add(name)

    def rewrite(self, node: NodeSpec, impl: str, inputs: list[str]) -> None:
        """Run ``node`` as a different registered op (e.g. an Add fused into a Linear -> Identity)."""
        node.impl = impl
        node.inputs = list(inputs)

    def rank(self, name: str) -> int | None:
        """Rank of value ``name`` from the model's value_info or ONNX shape inference, if known."""
        if self._ranks is None:
            self._ranks = {}
            model = self.model
            try:
                model = onnx.shape_inference.infer_shapes(model)
            except Exception:  # inference is best-effort; fall back to declared info
                pass
            g = model.graph
            for vi in [*g.value_info, *g.input, *g.output]:
                if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                    self._ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
        return self._ranks.get(name)

    def opset(self, domain: str = "") -> int:
        return self.opsets.get(domain, self.opsets[""])

    # ------------------------------------------------------------------------------------ build
    def build(self) -> None:
        graph = self.model.graph
        missing = self._unsupported(graph)
        if missing:
            raise UnsupportedOp(missing)
        inits = _as_initializers(graph)
        for name, t in inits.items():
            self._consts[name] = (N.tensor_to_numpy(t), t.data_type, ("initializer", name), True)
        body = []
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in N.DEFAULT_DOMAINS:
                arr, writable = constant_node_value(node)
                attr = node.attribute[0]
                dtype = attr.t.data_type if writable else helper.np_dtype_to_tensor_dtype(arr.dtype)
                self._consts[node.output[0]] = (arr, dtype, ("constant", node.output[0]), writable)
            else:
                body.append(node)

        m = self.m
        m.input_names = [i.name for i in graph.input if i.name not in inits]
        m.output_names = [o.name for o in graph.output]
        m._input_dtypes = [self._value_dtype(i) for i in graph.input if i.name not in inits]
        self._outputs = set(m.output_names)

        available = set(m.input_names) | set(self._consts)
        ordered = N.topological_order(body, available)
        specs = [self._spec(node, i) for i, node in enumerate(ordered)]
        for spec in specs:
            for name in spec.inputs:  # includes values read by subgraphs (see _spec)
                if name:
                    self._consumers[name].append(spec)
        for spec in specs:
            prepare = get_op_by_key(spec.impl).prepare
            if prepare is not None:
                prepare(self, spec)

        needed: set[str] = set(m.output_names)
        for spec in specs:
            needed.update(n for n in spec.inputs if n)
        for name in sorted(needed & set(self._consts)):
            if name not in self._claimed:
                self._register_const(name)
        m._nodes = specs
        m._needed = [name for name in self._consts if name in needed]

    def _register_const(self, name: str) -> None:
        arr, onnx_dtype, location, writable = self._consts[name]
        tensor = torch.from_numpy(np.ascontiguousarray(arr))
        if onnx_dtype == onnx.TensorProto.BFLOAT16:
            tensor = tensor.to(torch.bfloat16)
        # Single-element floats (attention scales, mask fill values like -inf) are constants even when
        # stored as shape [1]: training or weight-decaying them would silently change graph semantics.
        trainable = (
            tensor.is_floating_point()
            and tensor.dim() >= 1
            and tensor.numel() > 1
            and location[0] == "initializer"
            and name not in self._frozen
        )
        if trainable:
            key = N.sanitize(name, self._param_keys, "param")
            self.m.params[key] = nn.Parameter(tensor)
            container = "params"
        else:
            key = N.sanitize(name, self._const_keys, "const")
            persistent = location[0] == "initializer"
            self.m.consts.register_buffer(key, tensor, persistent=persistent)
            container = "consts"
        self.m._sources[name] = TensorSource(
            container, key, None, False, tuple(arr.shape), onnx_dtype,
            location if (writable and location[0] == "initializer") else None,
        )

    def _spec(self, node: onnx.NodeProto, index: int) -> NodeSpec:
        attrs = {}
        for attr in node.attribute:
            value = N.attribute_value(attr)
            if isinstance(value, onnx.GraphProto):
                value = self._compile_subgraph(value)
            elif isinstance(value, list) and value and isinstance(value[0], onnx.GraphProto):
                value = [self._compile_subgraph(g) for g in value]
            attrs[attr.name] = value
        fallback = f"{node.op_type}_{index}"
        inputs = list(node.input)
        outer = [n for n in N.node_inputs_with_subgraphs(node)[len([i for i in inputs if i]):]]
        outer = list(dict.fromkeys(outer))
        spec = NodeSpec(
            op_type=node.op_type,
            domain=node.domain,
            name=node.name or fallback,
            key=N.sanitize(node.name or fallback, self._node_keys, fallback),
            inputs=inputs + outer,
            outputs=list(node.output),
            attrs=attrs,
            opset=self.opset(node.domain),
        )
        if outer:
            spec.extra["outer_refs"] = outer
        return spec

    def _compile_subgraph(self, graph: onnx.GraphProto) -> SubGraph:
        """Compile an If/Loop body; its own constants become (non-trainable) buffers."""
        constants: dict[str, str] = {}
        for t in graph.initializer:
            constants[t.name] = self._add_buffer(t.name, N.tensor_to_torch(t))
        body = []
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in N.DEFAULT_DOMAINS:
                arr, _ = constant_node_value(node)
                constants[node.output[0]] = self._add_buffer(node.output[0], torch.from_numpy(arr))
            else:
                body.append(node)
        available = {i.name for i in graph.input} | set(constants)
        ordered = N.topological_order(body, available | N.subgraph_outer_refs(graph))
        specs = [self._spec(node, i) for i, node in enumerate(ordered)]
        return SubGraph(nodes=specs, constants=constants, outputs=[o.name for o in graph.output])

    def _add_buffer(self, name: str, tensor: torch.Tensor) -> str:
        key = N.sanitize(name, self._const_keys, "const")
        self.m.consts.register_buffer(key, tensor, persistent=False)
        return key

    @staticmethod
    def _value_dtype(value: onnx.ValueInfoProto) -> torch.dtype | None:
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            return N.ONNX_TO_TORCH_DTYPE.get(value.type.tensor_type.elem_type)
        return None

    @staticmethod
    def _unsupported(graph: onnx.GraphProto) -> list[str]:
        return sorted(
            {
                N.op_key(node.op_type, node.domain)
                for node in N.iter_all_nodes(graph)
                if not is_supported(node.op_type, node.domain)
            }
        )

