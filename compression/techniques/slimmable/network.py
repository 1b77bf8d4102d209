"""The slimmable network: one set of shared weights that runs at several widths (switchable BatchNorm).

Slimmable Networks (Yu et al. 2018) train a network at a few widths with *switchable BatchNorm*: the
convolution/linear weights are shared, every width has its own BatchNorm (its activations have other
statistics). Universally Slimmable Networks (Yu & Huang 2019) add the *sandwich rule* (widest + narrowest
+ random widths per step) and *in-place distillation* (narrower widths learn the widest's outputs).

Here a width ``w`` keeps, in every channel group that DepGraph finds (:mod:`compression.channels`:
a layer's filters together with the BatchNorm, residual adds and concat slices coupled to them), the
first ``round(w·C)`` channels of one fixed order (L1 importance of the original by default), so the
width slices nest and share weights. Training does not slice: it *masks*. At width ``w`` a forward
hook zeroes the dropped output channels of each grouped layer and of the BatchNorms after them (BN(0)
is not 0); the next layer then reads zeros on those inputs, so the masked full-size forward is the
sliced network's forward, and its gradients are the sliced network's gradients. Export removes the
dropped channels physically (torch-pruning with explicit indices) from a copy carrying that width's
BatchNorm set and writes the smaller ONNX (:meth:`OnnxModule.export_resized`). How it trains is
:mod:`.training`; how each export is proved and measured, :mod:`.export`.

Example:
    >>> module = to_torch(model); module.record_shapes(*example)                   # doctest: +SKIP
    >>> groups, _ = find_groups(module, plan_channels(module, model, example), example)  # doctest: +SKIP
    >>> net = SlimmableNet(module, groups, example, [0.5, 1.0])                    # doctest: +SKIP
    >>> net.select(0.5); logits = net(*example)            # == the 0.5-wide network  # doctest: +SKIP
    >>> half = net.export(0.5, model, example)             # its ONNX, channels removed  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import onnx
import torch
from torch import nn

from compression.depgraph import build_graph, sync_live_sizes
from compression.channels import ChannelPlan, Layer, group_importance, out_channel_pruner

if TYPE_CHECKING:
    from compression.converter import OnnxModule

Location = tuple[str, str]  # ("weights" | "norms", module key in that container of the OnnxModule)


@dataclass
class ChannelGroup:
    """Channels that must shrink together, and the order in which they go.

    Args:
        root: the layer DepGraph groups from (its out-channel pruning triggers the rest).
        layers: ONNX node names of every Conv/Gemm/MatMul whose output channels are in the group
            (more than one for a residual add or a concat).
        channels: channels of the group at width 1.0.
        order: channel indices of the root, most important first; width ``w`` keeps ``order[:k]``.
    """

    root: Layer
    layers: list[str]
    channels: int
    order: list[int]
    kept: dict[float, int] = field(default_factory=dict)  # width -> channels kept


def kept_channels(channels: int, width: float, round_to: int | None = None) -> int:
    """Channels a group of ``channels`` keeps at ``width``: ``round(width·C)``, at least 1 (or ``round_to``),
    rounded to a multiple of ``round_to`` when given (ONNX Runtime's blocked conv kernels want multiples of 8);
    width 1.0 keeps every channel.

    Example:
        >>> kept_channels(16, 0.25), kept_channels(300, 0.25), kept_channels(20, 0.3, round_to=8)
        (4, 75, 8)
    """
    if width >= 1.0:
        return int(channels)  # the full network is the original, whatever round_to says
    k = int(round(width * channels))
    if round_to and round_to < channels:
        k = int(round(k / round_to)) * round_to
        k = max(k, round_to)
    return int(min(channels, max(1, k)))


def _locations(module: OnnxModule) -> dict[int, Location]:
    """id(layer) -> where the OnnxModule keeps it, for every weight layer and BatchNorm."""
    out = {id(m): ("weights", k) for k, m in module.weights.items()}
    out.update({id(m): ("norms", k) for k, m in module.norms.items()})
    return out


def _size(m: nn.Module) -> int:
    if isinstance(m, nn.modules.conv._ConvNd):
        return int(m.out_channels)
    if isinstance(m, nn.Linear):
        return int(m.out_features)
    return int(m.num_features)


def find_groups(module: OnnxModule, plan: ChannelPlan, example: tuple[torch.Tensor, ...], order: str = "l1",
                ) -> tuple[list[ChannelGroup], dict[str, str]]:
    """The channel groups of the plan's prunable layers, each once, with their channel order.

    A group that would shrink a layer the plan leaves alone (a classifier, a layer that failed the
    export probe) is skipped whole, with the reason.

    Args:
        module: the converted module (unchanged).
        plan: :func:`compression.channels.plan_channels` for it.
        example: inputs to trace DepGraph with.
        order: ``"l1"`` (group L1 magnitude of the original, largest first: the narrow widths start from
            the strongest channels) or ``"index"`` (the first channels, as in the paper, trained from scratch).

    Returns:
        (groups, skipped: layer name -> why).
    """
    dg = build_graph(module, example)
    by_module = {id(la.module): name for name, la in plan.layers.items()}
    groups: list[ChannelGroup] = []
    covered: set[str] = set()
    skipped: dict[str, str] = {}
    imp = group_importance("l1") if order == "l1" else None
    for name, layer in plan.layers.items():
        if name in plan.ignored or name in covered:
            continue
        if layer.channels < 2:
            skipped[name] = "a single output channel: nothing to slim"
            continue
        group = dg.get_pruning_group(layer.module, out_channel_pruner(layer.module), idxs=list(range(layer.channels)))
        members = [by_module[id(dep.target.module)] for dep, _ in group
                   if dg.is_out_channel_pruning_fn(dep.handler) and id(dep.target.module) in by_module]
        members = list(dict.fromkeys(members))
        blocked = [m for m in members if m in plan.ignored]
        if blocked:
            for m in members:
                if m not in plan.ignored:
                    skipped[m] = f"coupled to {blocked[0]}, which keeps its channels"
            covered.update(members)
            continue
        covered.update(members)
        scores = imp(group) if imp is not None else None  # None too when the group holds no weights to rank
        if scores is not None and len(scores) == layer.channels:
            ranked = [int(i) for i in torch.argsort(-scores.detach().float(), stable=True)]
        else:
            ranked = list(range(layer.channels))
        groups.append(ChannelGroup(layer, members, layer.channels, ranked))
    return groups, skipped


class SlimmableNet(nn.Module):
    """A converted :class:`~compression.converter.OnnxModule` that runs at any of ``widths``.

    ``select(w)`` swaps in width ``w``'s BatchNorm set (switchable BN) and turns on its channel masks;
    ``forward`` then equals the ``w``-wide sliced network's forward. ``parameters()`` holds the shared
    weights and every width's BatchNorm parameters, so one optimizer trains them all.

    Args:
        module: the converted module; :meth:`OnnxModule.record_shapes` must have run on it.
        groups: from :func:`find_groups`.
        example: inputs to trace DepGraph with (CPU tensors).
        widths: sorted, unique, in (0, 1], ending at 1.0.
        round_to: keep channel counts multiples of this (None: exact ``round(w·C)``).
    """

    def __init__(self, module: OnnxModule, groups: list[ChannelGroup], example: tuple[torch.Tensor, ...],
                 widths: list[float], round_to: int | None = None) -> None:
        super().__init__()
        if not widths or widths[-1] != 1.0:
            raise ValueError("widths must end at 1.0")
        self.module = module
        self.widths = list(widths)
        self.groups = groups
        self.norm_sets = nn.ModuleDict({self._key(i): copy.deepcopy(module.norms) for i in range(len(widths))})
        self._index = len(widths) - 1
        self._masks: list[dict[Location, torch.Tensor]] = []
        for g in groups:
            g.kept = {w: kept_channels(g.channels, w, round_to) for w in widths}
        self._build_masks(example)
        self._handles: list = []
        self.select(1.0)
        self._attach()

    @staticmethod
    def _key(i: int) -> str:
        return f"w{i}"  # ModuleDict keys cannot hold the "." of "0.25"

    # ------------------------------------------------------------------------------------ masks
    def _build_masks(self, example: tuple[torch.Tensor, ...]) -> None:
        """Per width: which output channels of which layer/BatchNorm are zero. Read from the same
        DepGraph groups that export prunes with, so masks and export cannot disagree."""
        dg = build_graph(self.module, example)
        where = _locations(self.module)
        for w in self.widths:
            masks: dict[Location, torch.Tensor] = {}
            for g in self.groups:
                drop = sorted(g.order[g.kept[w]:])
                if not drop:
                    continue
                group = dg.get_pruning_group(g.root.module, out_channel_pruner(g.root.module), idxs=drop)
                for dep, idxs in group:
                    target = dep.target.module
                    if not dg.is_out_channel_pruning_fn(dep.handler) or id(target) not in where:
                        continue
                    loc = where[id(target)]
                    mask = masks.setdefault(loc, torch.ones(_size(target)))
                    mask[list(idxs)] = 0.0
            self._masks.append(masks)

    def _hook(self, loc: Location, fixed: int | None) -> Callable:
        """Zero the masked channels of a layer's output (dim 1 for conv/BN, the last dim for Linear)."""
        last = loc[0] == "weights" and isinstance(self.module.weights[loc[1]], nn.Linear)

        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            mask = self._masks[self._index if fixed is None else fixed].get(loc)
            if mask is None:
                return None
            mask = mask.to(out.device, out.dtype)
            shape = [1] * out.dim()
            shape[-1 if last else 1] = -1
            return out * mask.reshape(shape)

        return hook

    def _attach(self) -> None:
        locs = {loc for masks in self._masks for loc in masks}
        for container, key in sorted(locs):
            if container == "weights":
                self._handles.append(self.module.weights[key].register_forward_hook(self._hook((container, key), None)))
            else:  # each width's BatchNorm copy only ever runs at that width
                for i in range(len(self.widths)):
                    bn = self.norm_sets[self._key(i)][key]
                    self._handles.append(bn.register_forward_hook(self._hook((container, key), i)))

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextlib.contextmanager
    def _unhooked(self) -> Iterator[None]:
        """Without the masks (a deep copy must not inherit hooks that index the original's masks)."""
        self._detach()
        try:
            yield
        finally:
            self._attach()

    # ------------------------------------------------------------------------------------ running
    def select(self, width: float) -> None:
        """Run at ``width`` from now on: its BatchNorm set and its channel masks."""
        self._index = self.widths.index(width)
        self.module.norms = self.norm_sets[self._key(self._index)]

    @property
    def width(self) -> float:
        return self.widths[self._index]

    def forward(self, *inputs: torch.Tensor):
        return self.module(*inputs)

    def norms_of(self, width: float) -> list[nn.modules.batchnorm._BatchNorm]:
        bns = self.norm_sets[self._key(self.widths.index(width))].values()
        return [m for m in bns if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def channels(self, width: float) -> dict[str, int]:
        """Channels kept at ``width`` per grouped layer (ONNX node name)."""
        return {name: g.kept[width] for g in self.groups for name in g.layers}

    # ------------------------------------------------------------------------------------ export
    def sliced(self, width: float, example: tuple[torch.Tensor, ...]) -> OnnxModule:
        """A copy of the module at ``width`` with the dropped channels physically removed (on the CPU)."""
        previous = self.width
        self.select(width)
        try:
            with self._unhooked():
                clone = copy.deepcopy(self.module).cpu().eval()
        finally:
            self.select(previous)
        drops = [(g, sorted(g.order[g.kept[width]:])) for g in self.groups]
        if any(d for _, d in drops):
            dg = build_graph(clone, example)
            for g, drop in drops:
                if drop:
                    root = clone.weights[g.root.key]
                    dg.get_pruning_group(root, out_channel_pruner(root), idxs=drop).prune()
            sync_live_sizes(clone, dg)  # splits and slices follow the removed channels (YOLOv8's C2f)
        return clone

    def export(self, width: float, model: onnx.ModelProto, example: tuple[torch.Tensor, ...]) -> onnx.ModelProto:
        """The ONNX of the ``width``-wide network: ``model``'s graph with smaller initializers, this width's
        BatchNorm statistics, Reshape targets that follow the new channel counts."""
        return self.sliced(width, example).export_resized(model, *example)
