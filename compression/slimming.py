"""Slimmable networks: one set of shared weights that runs at several widths.

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
BatchNorm set and writes the smaller ONNX (:meth:`OnnxModule.export_resized`).

Example:
    >>> module = to_torch(model); module.record_shapes(*example)                   # doctest: +SKIP
    >>> net = SlimmableNet(module, plan_channels(module, model, example), example, [0.5, 1.0])  # doctest: +SKIP
    >>> net.select(0.5); logits = net(*example)            # == the 0.5-wide network  # doctest: +SKIP
    >>> half = net.export(0.5, model, example)             # its ONNX, channels removed  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from torch import nn

from compression.data import Arrays
from compression.channels import (ChannelPlan, Layer, first_output, group_importance, out_channel_pruner,
                                  torch_pruning)
from compression.training import LossConfig, loss_fn

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


def _locations(module) -> dict[int, Location]:  # noqa: ANN001 - OnnxModule
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


def find_groups(module, plan: ChannelPlan, example: tuple[torch.Tensor, ...], order: str = "l1",  # noqa: ANN001
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
    tp = torch_pruning()
    dg = tp.DependencyGraph().build_dependency(module, example_inputs=example)
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

    def __init__(self, module, groups: list[ChannelGroup], example: tuple[torch.Tensor, ...],  # noqa: ANN001
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
        tp = torch_pruning()
        dg = tp.DependencyGraph().build_dependency(self.module, example_inputs=example)
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

    def forward(self, *inputs: torch.Tensor):  # noqa: ANN201 - tensor or tuple, like OnnxModule
        return self.module(*inputs)

    def norms_of(self, width: float) -> list[nn.modules.batchnorm._BatchNorm]:
        bns = self.norm_sets[self._key(self.widths.index(width))].values()
        return [m for m in bns if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def channels(self, width: float) -> dict[str, int]:
        """Channels kept at ``width`` per grouped layer (ONNX node name)."""
        return {name: g.kept[width] for g in self.groups for name in g.layers}

    # ------------------------------------------------------------------------------------ export
    def sliced(self, width: float, example: tuple[torch.Tensor, ...]):  # noqa: ANN201 - OnnxModule
        """A copy of the module at ``width`` with the dropped channels physically removed (on the CPU)."""
        tp = torch_pruning()
        previous = self.width
        self.select(width)
        try:
            with self._unhooked():
                clone = copy.deepcopy(self.module).cpu().eval()
        finally:
            self.select(previous)
        drops = [(g, sorted(g.order[g.kept[width]:])) for g in self.groups]
        if any(d for _, d in drops):
            dg = tp.DependencyGraph().build_dependency(clone, example_inputs=example)
            for g, drop in drops:
                if drop:
                    root = clone.weights[g.root.key]
                    dg.get_pruning_group(root, out_channel_pruner(root), idxs=drop).prune()
        return clone

    def export(self, width: float, model: onnx.ModelProto, example: tuple[torch.Tensor, ...]) -> onnx.ModelProto:
        """The ONNX of the ``width``-wide network: ``model``'s graph with smaller initializers, this width's
        BatchNorm statistics, Reshape targets that follow the new channel counts."""
        return self.sliced(width, example).export_resized(model, *example)


# ------------------------------------------------------------------------------------ training
def step_widths(widths: list[float], rule: str, random_widths: int, rng: np.random.Generator) -> list[float]:
    """The widths one optimizer step trains, widest first.

    ``sum``: all of them (Slimmable Networks). ``sandwich``: the widest, the narrowest and
    ``random_widths`` others drawn without replacement (US-Nets, over a discrete set of widths).

    Example:
        >>> step_widths([0.25, 0.5, 0.75, 1.0], "sandwich", 1, np.random.default_rng(0))
        [1.0, 0.25, 0.75]
    """
    ordered = sorted(widths, reverse=True)
    if rule == "sum" or len(ordered) <= 2:
        return ordered
    middle = ordered[1:-1]
    n = min(random_widths, len(middle))
    picked = [middle[i] for i in sorted(rng.choice(len(middle), size=n, replace=False))] if n else []
    return [ordered[0], ordered[-1], *picked]


def _tensors(batch: Arrays, names: list[str], device: str) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(batch.inputs[n])).to(device) for n in names]


def train_slimmable(net: SlimmableNet, input_names: list[str], arrays: Arrays, *, epochs: int, lr: float,
                    batch_size: int, loss: LossConfig, teacher: np.ndarray | None, rule: str, random_widths: int,
                    inplace_distill: bool, seed: int, device: str = "cpu",
                    on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Train the shared weights and every width's BatchNorm; returns the mean summed loss per epoch.

    Each step accumulates the gradients of the widths :func:`step_widths` picks and takes one Adam
    step. The widest learns from ``loss`` (labels and/or the original's outputs); with
    ``inplace_distill`` the others learn the widest's detached outputs of the same batch (KL at T = 1
    for class scores, MSE otherwise), weighted ``1 - loss.alpha`` against CE on the labels when there
    are labels; without ``inplace_distill`` they learn from ``loss`` too.

    Args:
        teacher: the original model's outputs on ``arrays`` (when ``loss.distill``).
        on_epoch: ``(epoch, mean_loss)`` after each epoch; may raise ``Cancelled``.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net.to(device).train()
    params = list({id(p): p for p in net.parameters() if p.requires_grad}.values())
    opt = torch.optim.Adam(params, lr=lr)
    # In-place distillation at T = 1 (US-Nets), mixed with the labels when there are any: on the short
    # fine-tunes this service runs, the widest is still moving and labels keep the narrow widths anchored.
    kd = LossConfig(use_labels=loss.use_labels, distill=True, temperature=1.0, alpha=loss.alpha)
    widest = net.widths[-1]
    history = []
    for epoch in range(epochs):
        order = rng.permutation(arrays.samples)
        total, count = 0.0, 0
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            if len(idx) < 2 and net.norms_of(widest):
                continue  # BatchNorm cannot train on one sample
            batch = arrays.take(idx)
            xs = _tensors(batch, input_names, device)
            labels = torch.from_numpy(batch.labels).to(device) if batch.labels is not None else None
            t_out = torch.from_numpy(teacher[idx]).to(device) if teacher is not None else None
            opt.zero_grad(set_to_none=True)
            soft = None
            step_loss = 0.0
            for w in step_widths(net.widths, rule, random_widths, rng):
                net.select(w)
                out = first_output(net(*xs))
                if w == widest or not inplace_distill:
                    l = loss_fn(out, labels, t_out, loss)
                    if w == widest:
                        soft = out.detach()
                else:
                    l = loss_fn(out, labels, soft, kd)
                l.backward()
                step_loss += float(l.detach())
            opt.step()
            total += step_loss * len(idx)
            count += len(idx)
        history.append(total / max(count, 1))
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    net.select(widest)
    net.eval()
    return history


def calibrate_bn(net: SlimmableNet, input_names: list[str], arrays: Arrays, *, samples: int, batch_size: int,
                 seed: int, device: str = "cpu") -> int:
    """Re-estimate every width's BatchNorm statistics with the final weights (US-Nets' BN calibration).

    Running averages gathered while the weights moved lag behind them; an exact average over
    ``samples`` training samples (momentum None: a cumulative mean) at each width is cheap and fixes
    that. Returns the number of samples used (0 when the model has no BatchNorm).
    """
    n = min(samples, arrays.samples)
    if n < 2 or not net.norms_of(net.widths[-1]):
        return 0
    idx_all = np.sort(np.random.default_rng(seed).permutation(arrays.samples)[:n])
    net.to(device).eval()
    with torch.no_grad():
        for w in net.widths:
            net.select(w)
            bns = net.norms_of(w)
            momenta = [bn.momentum for bn in bns]
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None
                bn.train()
            for s in range(0, n, batch_size):
                idx = idx_all[s:s + batch_size]
                if len(idx) < 2:
                    continue
                net(*_tensors(arrays.take(idx), input_names, device))
            for bn, m in zip(bns, momenta, strict=True):
                bn.momentum = m
                bn.eval()
    net.select(net.widths[-1])
    return n


# ------------------------------------------------------------------------------------ export checks
@dataclass
class Exported:
    model: onnx.ModelProto
    max_abs_error: float  # exported graph in ONNX Runtime vs the masked full-size network, same inputs


def export_checked(net: SlimmableNet, width: float, model: onnx.ModelProto, example: tuple[torch.Tensor, ...],
                   check: Arrays, threads: int = 0, samples: int = 64) -> Exported:
    """Export ``width`` and prove it: ``onnx.checker`` passes, ONNX Runtime runs it, and on ``samples`` of
    ``check`` it computes what the masked full-size network computes at that width.

    Raises:
        RuntimeError: the exported graph disagrees with the masked network (a channel the masks could
            not silence, e.g. a bias added outside the layer): the export would not be that width.
    """
    from compression.metrics import session

    out = net.export(width, model, example)
    onnx.checker.check_model(out)
    names = list(net.module.input_names)
    take = check.take(np.arange(min(samples, check.samples)))
    feeds = {n: take.inputs[n] for n in names}
    previous = net.width
    net.select(width)
    net.eval()
    try:
        with torch.no_grad():
            want = first_output(net(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names])).numpy()
    finally:
        net.select(previous)
    got = session(out, threads).run(None, feeds)[0]
    err = float(np.abs(got - want).max())
    if not err <= 1e-3 * (float(np.abs(want).max()) + 1.0):
        raise RuntimeError(f"width {width}: the exported graph disagrees with the masked network "
                           f"(max error {err:.3g})")
    return Exported(out, err)


def width_metrics(model: onnx.ModelProto, holdout: Arrays, reference: np.ndarray | None, threads: int = 0,
                  latency_runs: int = 30) -> dict:
    """Measured facts of one width's ONNX: params, MACs and ONNX Runtime latency at batch 1, held-out
    accuracy (with labels) and agreement / output cosine with the original's ``reference`` outputs."""
    from compression.analysis import count_params, macs
    from compression.metrics import accuracy, fidelity, latency, run_batched, session

    sess = session(model, threads)
    sample = {k: v[:1] for k, v in holdout.inputs.items()}
    outputs = run_batched(sess, holdout.inputs)
    res = {"params": int(count_params(model)[0]), "macs": int(macs(model, sample)),
           "latency_ms": latency(sess, sample, latency_runs), "accuracy": accuracy(outputs, holdout.labels)}
    if reference is not None:
        fid = fidelity(outputs, [reference], holdout.labels)
        res.update({k: fid[k] for k in ("agreement", "output_cosine") if k in fid})
    return res
