"""torch-pruning's DepGraph over a converted :class:`~compression.converter.OnnxModule`, with splits and
concats it can follow.

torch-pruning traces autograd and guesses what it cannot see. Over a converted ONNX graph three guesses go
wrong, and multi-branch CNNs (YOLOv8's C2f: Conv → Split → bottlenecks → Concat) hit all of them:

- a ``torch.split`` node's outputs are listed in the order the backward walk met them, not in split order,
  and a split output read twice (C2f's second half feeds the next bottleneck *and* the concat) is listed
  twice: the i-th listed output gets the i-th offset, which is the wrong range or none (the ``IndexError:
  list index out of range`` every backbone conv of a YOLOv8 raised);
- a concat's input sizes are inferred by walking the graph; through a split the walk returns None and the
  graph cannot be built at all (``TypeError: unsupported operand type(s) for +: 'int' and 'NoneType'``);
- a negative ``dim`` reaches it as ``2**64 - 1`` and passes its "is this the channel dim" check.

Here the converter records, while the graph is traced, which ONNX node made each autograd node and its exact
sizes (``OnnxModule.channel_trace``); :class:`Graph` builds the dependency graph from those facts. After
channels are removed, :func:`sync_live_sizes` hands the splits' and slices' new sizes back to the converter's
nodes, so the torch module and the exported graph (``OnnxModule.export_resized``) cut where the channels now are.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from compression.converter import OnnxModule

CHANNEL_AXIS = 1


def graph_class() -> type:
    """:class:`Graph`, defined on first use (torch-pruning is slow to import)."""
    global _GRAPH
    if _GRAPH is None:
        _GRAPH = _define_graph()
    return _GRAPH


_GRAPH: type | None = None


def _define_graph() -> type:
    import torch
    import torch_pruning as tp
    from torch import nn
    from torch_pruning import _helpers, ops
    from torch_pruning.dependency import index_mapping as im

    class Graph(tp.DependencyGraph):
        """A ``DependencyGraph`` whose split and concat index mappings come from the converter's trace."""

        onnx_ops: dict[Any, tuple[str, tuple[int, ...]]]  # split/slice op -> (ONNX node, sizes traced)

        def build_dependency(self, model, example_inputs, forward_fn=None, output_transform=None,
                             unwrapped_parameters=None, customized_pruners=None, ignored_layers=None,
                             ignored_params=None, verbose=True):
            self.verbose = verbose
            self.model = model
            self._module2name = {module: name for (name, module) in model.named_modules()}
            for kind, pruner in (customized_pruners or {}).items():
                self.register_customized_layer(kind, pruner)
            if ignored_layers is not None:
                self.IGNORED_LAYERS_IN_TRACING.extend(ignored_layers)
            self.ignored_params = ignored_params if ignored_params is not None else []
            self._param_to_name, self.unwrapped_parameters = self._detect_unwrapped_parameters(unwrapped_parameters)
            assert torch.is_grad_enabled(), "DepGraph traces autograd: run it outside torch.no_grad()"
            trace: dict = {}
            model.channel_trace = trace
            try:
                self.module2node = self._trace(model, example_inputs, forward_fn, output_transform=output_transform)
            finally:
                model.channel_trace = None
            self._build_dependency(self.module2node)
            self.onnx_ops, self._mapped = {}, []
            for node in self.module2node.values():
                facts = trace.get(node.grad_fn)
                if facts is None or facts["axis"] != CHANNEL_AXIS:
                    continue  # another axis: every input keeps the output's channel indices (the default)
                if node.type == ops.OPTYPE.CONCAT:
                    node.module.concat_sizes = list(facts["sizes"])
                elif node.type == ops.OPTYPE.SPLIT:
                    node.module.split_sizes = list(facts["sizes"])
                elif node.type != ops.OPTYPE.SLICE:
                    continue
                self._mapped.append(node)
                if node.type != ops.OPTYPE.CONCAT:
                    self.onnx_ops[node.module] = (facts["node"], _sizes(node.module))
            self.update_mappings()
            return self

        def update_mappings(self) -> None:
            """Index mappings from the current sizes (torch-pruning's pruners keep a split's and a concat's
            sizes and a slice's bounds up to date as channels go): torch-pruning's own for reshapes,
            unbinds and expands; ours for channel splits, concats and slices."""
            by_grad_fn = {node.grad_fn: node for node in self.module2node.values() if node.grad_fn is not None}
            pieces: dict[tuple, list[tuple[int, int, int]]] = defaultdict(list)
            mapped = set(self._mapped)
            for node in self._mapped:
                if node.type == ops.OPTYPE.CONCAT:
                    _concat_pieces(node, by_grad_fn, mapped, pieces)
                elif node.type == ops.OPTYPE.SPLIT:
                    _split_pieces(node, mapped, pieces)
                else:
                    im.update_slice_index_mapping(self, node)
            for (src, dst), parts in pieces.items():
                for dep in src.dependencies:
                    if dep.target is dst:
                        dep.index_mapping[0], dep.index_mapping[1] = _Pieces(parts, reverse=False), None
                for dep in dst.dependencies:
                    if dep.target is src:
                        dep.index_mapping[0], dep.index_mapping[1] = _Pieces(parts, reverse=True), None
            for node in self.module2node.values():
                update = {ops.OPTYPE.RESHAPE: im.update_reshape_index_mapping,
                          ops.OPTYPE.UNBIND: im.update_unbind_index_mapping,
                          ops.OPTYPE.EXPAND: im.update_expand_index_mapping}.get(node.type)
                try:  # these infer sizes by walking the graph; past a split the walk can fail
                    if update is not None:
                        update(self, node)
                except (IndexError, TypeError):
                    pass  # left unmapped: the planner's probe finds the layers behind it unsafe

        def get_pruning_group(self, module, pruning_fn, idxs):
            """torch-pruning's ``get_pruning_group`` with :meth:`update_mappings` in place of its own
            (which rebuilds the split mappings it gets wrong)."""
            from numbers import Number

            from torch_pruning import _helpers
            from torch_pruning.dependency.dependency import Dependency
            from torch_pruning.dependency.group import Group
            from torch_pruning.pruner import function

            if module not in self.module2node:
                raise ValueError(f"Module {module} is not in the dependency graph.")
            if isinstance(module, ops.TORCH_CONV) and module.groups == module.out_channels and module.out_channels > 1:
                pruning_fn = function.prune_depthwise_conv_out_channels
            if isinstance(idxs, Number):
                idxs = [idxs]
            idxs = [_helpers._HybridIndex(idx=i, root_idx=i) for i in idxs]
            self.update_mappings()
            group = Group()
            root = self.module2node[module]
            group.add_dep(dep=Dependency(pruning_fn, pruning_fn, source=root, target=root), idxs=idxs)
            visited = set()
            stack = [group[0]]
            while stack:
                dep, idxs = stack.pop(-1)
                node, fn = dep.target, dep.handler
                visited.add(node)
                for new_dep in node.dependencies:
                    if not new_dep.is_triggered_by(fn):
                        continue
                    new_idxs = idxs
                    for mapping in new_dep.index_mapping:
                        if mapping is not None:
                            new_idxs = mapping(new_idxs)
                    if not new_idxs or (new_dep.target in visited and group.has_pruning_op(new_dep, new_idxs)):
                        continue
                    group.add_dep(new_dep, new_idxs)
                    stack.append((new_dep, new_idxs))
            merged = Group()
            for dep, idxs in group.items:
                if isinstance(dep.target.module, nn.Parameter) and any(dep.target.module is p
                                                                       for p in self.ignored_params):
                    continue
                merged.add_and_merge(dep, idxs)
            merged._DG = self
            for i in range(len(merged)):
                hybrid = merged[i].idxs
                merged[i] = _helpers.GroupItem(merged[i].dep, _helpers.to_plain_idxs(hybrid))
                merged[i].root_idxs = _helpers.to_root_idxs(hybrid)
            return merged

    def _offsets(sizes) -> list[int]:
        return [int(v) for v in np.concatenate([[0], np.cumsum(sizes)])]

    def _concat_pieces(node, by_grad_fn, mapped, pieces) -> None:
        """Each concatenated tensor's channels land at its offset; a tensor that is one output of a channel
        split maps from that output's range of the split's input."""
        offsets = _offsets(node.module.concat_sizes)
        node.module.offsets = offsets
        sources = node.grad_fn.next_functions  # one (autograd node, output index) per tensor, in order
        for j, (fn, nr) in enumerate(sources[:len(offsets) - 1]):
            src = by_grad_fn.get(fn)
            if src is None:
                continue
            lo, hi = 0, offsets[j + 1] - offsets[j]
            if src in mapped and src.type == ops.OPTYPE.SPLIT:
                split = _offsets(src.module.split_sizes)
                lo, hi = split[nr], split[nr + 1]
            pieces[(src, node)].append((lo, hi, offsets[j]))

    def _split_pieces(node, mapped, pieces) -> None:
        """Each consumer of a channel split reads its output's range of the split's input."""
        offsets = _offsets(node.module.split_sizes)
        node.module.offsets = offsets
        for out in node.outputs:
            if out in mapped and out.type == ops.OPTYPE.CONCAT:
                continue  # the concat maps it
            for fn, nr in out.grad_fn.next_functions:
                if fn is node.grad_fn:
                    pieces[(node, out)].append((offsets[nr], offsets[nr + 1], 0))

    class _Pieces:
        """Index mapping between two nodes as ranges: source channels ``[lo, hi)`` are target channels from
        ``at`` on (``reverse``: from target to source). A concat of two outputs of one split is two pieces
        on one dependency, which torch-pruning's one-offset mappings cannot say."""

        def __init__(self, parts: list[tuple[int, int, int]], reverse: bool) -> None:
            self.parts, self.reverse = parts, reverse

        def __call__(self, idxs):
            out: dict[int, Any] = {}  # each index once: a tensor concatenated twice maps back to one channel
            for i in idxs:
                for lo, hi, at in self.parts:
                    if not self.reverse and lo <= i.idx < hi:
                        j = at + i.idx - lo
                    elif self.reverse and at <= i.idx < at + hi - lo:
                        j = lo + i.idx - at
                    else:
                        continue
                    out.setdefault(j, _helpers._HybridIndex(idx=j, root_idx=i.root_idx))
            return list(out.values())

    return Graph


@contextlib.contextmanager
def fixed_depgraph() -> Iterator[None]:
    """While open, torch-pruning's pruners build :class:`Graph` instead of their own ``DependencyGraph``
    (``MetaPruner`` constructs its graph inside ``__init__``, with no way to pass one in)."""
    import torch_pruning as tp

    original = tp.dependency.DependencyGraph
    tp.dependency.DependencyGraph = graph_class()
    try:
        yield
    finally:
        tp.dependency.DependencyGraph = original


def build_graph(module: OnnxModule, example: tuple) -> Any:
    """A :class:`Graph` over ``module`` traced on ``example``."""
    return graph_class()().build_dependency(module, example_inputs=example, verbose=False)


def sync_live_sizes(module: OnnxModule, graph: Any) -> None:
    """Copy the sizes torch-pruning's split and slice ops now have (channels removed) into the converter's
    nodes: the Split/Slice run with them (``split_live`` / ``slice_live``) and the export writes them."""
    by_name = {spec.name: spec for spec in module._nodes}
    for op, (name, traced) in graph.onnx_ops.items():
        spec, now = by_name.get(name), _sizes(op)
        if spec is None or now == traced:
            continue  # untouched: the graph's own constants stay (they may be computed at run time)
        if hasattr(op, "split_sizes"):
            spec.extra["split_live"] = list(now)
        else:
            spec.extra.setdefault("slice_live", {})[CHANNEL_AXIS] = now


def _sizes(op: Any) -> tuple[int, ...]:
    """A torch-pruning split op's sizes or a slice op's ``(start, end)``, as they are now."""
    if hasattr(op, "split_sizes"):
        return tuple(int(s) for s in op.split_sizes)
    return int(op.start), int(op.end)
