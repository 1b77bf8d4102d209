"""BatchNorm re-inserted after the convs for fine-tuning, folded back into them on exit.

Why: exporters (torch's dynamo exporter, most real ONNX) fold BatchNorm into the convs, so the converted
graph trains without normalisation, and recovery after surgery suffers (measured before this module: a
channel-pruned TinyResNet lost 6.5 pt; torch-pruning on the original SmallCNN, BatchNorm intact, held out
0.949 where the service, on the folded graph, reached 0.931). :func:`reinserted_batchnorm` puts a
BatchNorm behind every conv that comes without one, initialised to the identity from the conv's output
statistics on a sample of training inputs (:class:`ReinsertedNorm`: running statistics = those, the
affine part in units of them), so the module computes the same function when training starts; it trains
with the rest. On exit each BatchNorm is folded into its conv with the running statistics
(``W' = W·γ/√(σ²+ε)``, ``b' = (b−μ)·γ/√(σ²+ε)+β``) and removed, so
:meth:`~compression.converter.OnnxModule.write_back` writes the graph it was given, no new nodes.

After a channel-pruning cut the identity would keep the damage: :func:`remember_statistics` (called before
the cut) lets the next insertion re-standardise each surviving channel to the mean and spread it had, as a
network's own BatchNorm does (measured on an 8×8 digits ResNet, half the channels in 2 rounds of 3 epochs:
0.93 re-standardised, 0.43 without BatchNorm, 0.13 with BatchNorm started at the identity).

The BatchNorm runs as a forward hook of the conv: the conv's ``nn.Parameter`` objects stay the ones
pruning masks, optimizers and DepGraph hold, and folding edits them in place (a pruned weight's zeros
stay zero: folding scales whole output rows). The BatchNorms live in ``module.reinserted_norms`` while
inside, so ``module.parameters()`` and ``.to(device)`` see them.

Convs left alone (:attr:`Reinserted.skipped` says why): already followed by a BatchNormalization node,
weights with a parametrization (quantization grids, clusters: folding would move them off the grid),
no bias initializer to take the shift (a new one would be a new graph input), a weight other nodes also
read, non-float32 weights, ConvTranspose.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from compression.converter import OnnxModule
from compression.data import Arrays

CONTAINER = "reinserted_norms"  # attribute of the module holding the BatchNorms while inside
_BN = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}  # by the conv weight's rank


@dataclass
class Reinserted:
    """What :func:`reinserted_batchnorm` did: the convs that got a BatchNorm, and why others did not."""

    convs: list[str] = field(default_factory=list)  # ONNX node names
    skipped: dict[str, str] = field(default_factory=dict)  # node name -> reason
    folded: bool = False  # set on exit, once every BatchNorm is back in its conv
    recalibrated: int = 0  # BatchNorms started at the channels' statistics from before a surgery

    def note(self) -> str | None:
        """The report's line, or None when nothing was inserted."""
        if not self.convs:
            return None
        return (f"re-inserted BatchNorm after {len(self.convs)} conv{'s' if len(self.convs) != 1 else ''} "
                "for fine-tuning, folded back")


def any_parametrized(module: nn.Module) -> bool:
    """Whether some layer of ``module`` has a parametrization (QAT, clustering, binary/ternary weights):
    the trained values are constrained, and ``batchnorm: auto`` leaves such a module alone."""
    return any(parametrize.is_parametrized(m) for m in module.modules())


def _conv_candidates(module: OnnxModule) -> tuple[dict[str, tuple[str, nn.Module]], dict[str, str]]:
    """node name -> (layer key, conv) for the convs that may get a BatchNorm; node name -> reason for the rest."""
    consumers: dict[str, list[str]] = {}
    for spec in module._nodes:
        for name in spec.inputs:
            if name:
                consumers.setdefault(name, []).append(spec.op_type)
    shared = {src.key for name, src in module._sources.items()
              if name in module._needed and src.container == "weights"}  # weights other nodes read too
    found, skipped = {}, {}
    for spec in module._nodes:
        claim = spec.extra.get("module")
        if spec.op_type != "Conv" or not claim or claim[0] != "weights":
            continue
        conv = module.weights[claim[1]]
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):  # parametrized: a subclass
            continue
        if any(op == "BatchNormalization" for op in consumers.get(spec.outputs[0], [])):
            reason = "already followed by BatchNormalization"
        elif parametrize.is_parametrized(conv):
            reason = "weights constrained by a parametrization"  # folding would move them off their grid
        elif conv.bias is None:
            reason = "no bias initializer to fold the shift into"
        elif claim[1] in shared:
            reason = "weight also read by other nodes"
        elif conv.weight.dtype != torch.float32:
            reason = f"weights are {conv.weight.dtype}, not float32"
        else:
            reason = None
        if reason:
            skipped[spec.name] = reason
        else:
            found[spec.name] = (claim[1], conv)
    return found, skipped


def _channel_stats(module: OnnxModule, convs: list[nn.Module], sample: dict[str, np.ndarray], batch_size: int,
                   device: str) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per-channel (mean, biased variance) of each conv's output over ``sample``, in eval mode, float64; None
    when the module fails on the sample (a graph that fixes its batch inside its ops: batches of that size
    are tried, and a failure is left to the training loop, which refuses such a graph with its reason)."""
    batch_size = getattr(module, "fixed_batch", None) or batch_size
    sums = [None] * len(convs)
    squares = [None] * len(convs)
    counts = [0] * len(convs)

    def hook(i: int):
        def record(_mod, _args, out: torch.Tensor) -> None:
            y = out.detach().double().transpose(0, 1).reshape(out.shape[1], -1)
            s, q = y.sum(1), (y * y).sum(1)
            sums[i] = s if sums[i] is None else sums[i] + s
            squares[i] = q if squares[i] is None else squares[i] + q
            counts[i] += y.shape[1]
        return record

    handles = [c.register_forward_hook(hook(i)) for i, c in enumerate(convs)]
    was_training = module.training
    module.to(device).eval()
    names = list(module.input_names)
    n = len(sample[names[0]])
    try:
        with torch.no_grad():
            for s in range(0, n - n % batch_size if n >= batch_size else n, batch_size):
                module(*[torch.from_numpy(np.ascontiguousarray(sample[k][s:s + batch_size])).to(device)
                         for k in names])
    except RuntimeError:
        return None
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    stats = []
    for s, q, c in zip(sums, squares, counts, strict=True):
        mean = s / max(c, 1)
        stats.append((mean, (q / max(c, 1) - mean * mean).clamp_min(0.0)))
    return stats


class ReinsertedNorm(nn.Module):
    """A BatchNorm whose affine part learns in the units of its channel's initial spread:
    ``y = (γ·x̂ + β)·s + m`` with ``x̂`` the batch-normalised input, ``s = sqrt(var + eps)`` and ``m = mean``
    fixed buffers, ``γ = 1``, ``β = 0`` at the start (so ``y = x`` in eval mode). With a ``target``
    (the channel's statistics before a surgery, :func:`remember_statistics`) ``s`` and ``m`` are those
    instead: each channel is re-standardised to the spread and mean it had (what a network's own BatchNorm
    does after pruning, with its running statistics re-estimated).

    Why not a plain BatchNorm with ``weight = s, bias = m``: Adam moves every parameter by about ``lr`` a
    step, whatever its scale; a channel whose outputs spread over ±8 then needs thousands of steps to move
    its shift (measured: a channel-pruned digits CNN recovered to 47% with that, 68% without BatchNorm at
    all). In these units ``γ`` and ``β`` move like a trained network's BatchNorm parameters do.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor,
                 target: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.bn = bn
        t_mean, t_var = target if target is not None else (mean, var)
        self.register_buffer("scale", torch.sqrt(t_var + bn.eps).float())
        self.register_buffer("shift", t_mean.float())
        with torch.no_grad():
            bn.running_mean.copy_(mean.float())
            bn.running_var.copy_(var.float())
            bn.weight.fill_(1.0)
            bn.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self.bn(x) * self.scale.reshape(shape) + self.shift.reshape(shape)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the equivalent plain BatchNorm, in float64."""
        s, m = self.scale.double(), self.shift.double()
        return self.bn.weight.double() * s, self.bn.bias.double() * s + m


def fold_into(conv: nn.Module, norm: ReinsertedNorm) -> None:
    """Fold ``norm`` (its running statistics) into ``conv``'s weight and bias, in place: the same
    ``nn.Parameter`` objects, so masks and optimizers holding them see the folded values."""
    bn = norm.bn
    with torch.no_grad():
        gamma, beta = norm.affine()
        scale = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        conv.weight.copy_((conv.weight.double() * scale.reshape(shape)).to(conv.weight.dtype))
        bias = (conv.bias.double() - bn.running_mean.double()) * scale + beta
        conv.bias.copy_(bias.to(conv.bias.dtype))


_TARGETS = "_batchnorm_targets"  # module attribute: statistics from before a surgery, consumed by the next insertion


def remember_statistics(module: OnnxModule, sample: Arrays | dict[str, np.ndarray], *, max_samples: int = 512,
                        batch_size: int = 128, device: str = "cpu") -> None:
    """Record each candidate conv's per-channel output statistics (and its bias, to find the channels
    again) before a surgery that removes channels: the next :func:`reinserted_batchnorm` re-standardises
    the surviving channels to them instead of starting at the identity.

    Why: pruning shifts every later layer's input distribution; a network that has its BatchNorm absorbs
    that at once (batch statistics re-centre and re-scale each channel to its learned mean and spread).
    Starting from the damaged network's own statistics, the re-inserted BatchNorm would pin the damage in.
    """
    found, _ = _conv_candidates(module)
    if not found:
        return
    inputs = sample.inputs if isinstance(sample, Arrays) else sample
    convs = [conv for _, conv in found.values()]
    stats = _channel_stats(module, convs, {k: inputs[k][:max_samples] for k in module.input_names}, batch_size,
                           device)
    if stats is None:
        return
    setattr(module, _TARGETS, {key: (conv.bias.detach().cpu().clone(), mean, var)
                               for (key, conv), (mean, var) in zip(found.values(), stats, strict=True)})


def _surviving(before: torch.Tensor, after: torch.Tensor) -> list[int] | None:
    """Indices into ``before`` of the channels whose biases are ``after`` (channel pruning slices, keeping
    the order), or None when they cannot be matched."""
    kept, j = [], 0
    for v in after.tolist():
        while j < len(before) and before[j].item() != v:
            j += 1
        if j == len(before):
            return None
        kept.append(j)
        j += 1
    return kept


def _target(targets: dict, key: str, conv: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    if key not in targets:
        return None
    bias, mean, var = targets[key]
    kept = _surviving(bias, conv.bias.detach().cpu())
    return None if kept is None else (mean[kept], var[kept])


@contextmanager
def reinserted_batchnorm(module: OnnxModule, sample: Arrays | dict[str, np.ndarray], *, max_samples: int = 512,
                         batch_size: int = 128, device: str = "cpu",
                         momentum: float = 0.1) -> Iterator[Reinserted]:
    """While inside, every conv of ``module`` that comes without BatchNorm has one behind it (identity at
    the start, trained with the rest); on exit they are folded back into the convs and removed — also when
    the body raises, so the module is always the graph's own again.

    Args:
        sample: training inputs (the first ``max_samples`` give the initial statistics).
        momentum: the BatchNorms' running-statistics momentum (torch's default).

    Example:
        >>> with reinserted_batchnorm(module, data.train) as bn:  # doctest: +SKIP
        ...     train(module, ...)
        >>> bn.note()  # doctest: +SKIP
        're-inserted BatchNorm after 7 convs for fine-tuning, folded back'
    """
    inputs = sample.inputs if isinstance(sample, Arrays) else sample
    found, skipped = _conv_candidates(module)
    report = Reinserted(list(found), skipped)
    if not found:
        yield report
        return
    if hasattr(module, CONTAINER):
        raise RuntimeError("BatchNorm is already re-inserted in this module")
    names = list(module.input_names)
    sample_in = {k: inputs[k][:max_samples] for k in names}
    convs = [conv for _, conv in found.values()]
    stats = _channel_stats(module, convs, sample_in, batch_size, device)
    targets = module.__dict__.pop(_TARGETS, None) or {}
    if stats is None:  # the graph does not run on these batches: training refuses it with its reason
        report.skipped.update({name: "the statistics pass failed" for name in report.convs})
        report.convs = []
        yield report
        return
    norms = nn.ModuleDict()
    handles = []
    for (key, conv), (mean, var) in zip(found.values(), stats, strict=True):
        target = _target(targets, key, conv)
        report.recalibrated += target is not None
        norm = ReinsertedNorm(_BN[conv.weight.dim()](conv.out_channels, momentum=momentum), mean, var, target)
        norm.to(conv.weight.device).train(module.training)
        norms[key] = norm
        handles.append(conv.register_forward_hook(lambda _m, _a, out, norm=norm: norm(out)))
    module.add_module(CONTAINER, norms)
    try:
        yield report
    finally:
        for h in handles:
            h.remove()
        for (key, conv) in found.values():
            fold_into(conv, norms[key])
        delattr(module, CONTAINER)
        report.folded = True
