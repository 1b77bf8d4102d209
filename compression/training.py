"""Fine-tuning a converted module: cross-entropy on labels and/or distillation from a teacher.

The loss is the lecture's: ``alpha * CE(s, y) + (1 - alpha) * KL(softmax(t/T) || softmax(s/T)) * T²``
for class scores; outputs that are not class scores (embeddings, regressions) use MSE (or cosine) to the
teacher. Several teachers are one target: :func:`ensemble_targets`.

A graph that ends in a Softmax (a classifier exported with its softmax) gives probabilities, not logits:
``softmax(p/T)`` of probabilities in ``[0, 1]`` is nearly uniform and CE on them barely moves the
weights. So the losses see *log*-probabilities instead (:func:`output_kind`): the student's final
Softmax runs as LogSoftmax while it trains (:func:`log_prob_outputs`; ``softmax(log p / T)`` is exactly
``softmax(z/T)`` of the logits ``z``) and the teacher's probabilities become ``log p``
(:func:`as_log_probs`). LogSoftmax outputs already are. Sigmoid outputs are not a distribution over
classes: they are matched by MSE, without CE.

Every family that trains an ONNX graph goes through here: :func:`to_trainable` (convert or refuse),
:class:`Finetune` (the spec's loss and the original's outputs, set up once per step) and
:func:`finetune_onnx` (convert → the one loop, :func:`train` → write back).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from compression.augment import Augmenter, Mix, augmenter_for
from compression.converter import OnnxModule, UnsupportedOp, to_torch
from compression.data import Arrays
from compression.errors import InvalidSpec, NotTrainable
from compression.metrics import run_batched, session, top1_accuracy

if TYPE_CHECKING:
    from compression.context import StepContext
    from compression.spec import FinetuneSpec


@dataclass
class LossConfig:
    use_labels: bool
    distill: bool
    temperature: float
    alpha: float
    # Distillation term: "auto" = KL·T² for class scores, MSE otherwise; "kl", "mse" or "cosine" to force one.
    kd_loss: str = "auto"
    # What the graph's first output is (:func:`output_kind`); "sigmoid" outputs are not class scores.
    output: str = "logits"
    # MSE distillation: per-element spread of the teacher's outputs over the training split (set by
    # :func:`_train`), so each output element weighs by how much it varies, not by its units.
    kd_scale: torch.Tensor | None = None


def teacher_outputs(teacher, arrays: Arrays, threads: int = 0) -> np.ndarray:  # teacher: onnx.ModelProto
    """The teacher's first output on every sample, computed once in ONNX Runtime (fast, no grads)."""
    return run_batched(session(teacher, threads), arrays.inputs)[0]


def teacher_targets(teacher: onnx.ModelProto, arrays: Arrays, threads: int = 0) -> np.ndarray:
    """:func:`teacher_outputs` as the losses want them: probabilities (a final Softmax) as log-probabilities."""
    return as_log_probs(teacher_outputs(teacher, arrays, threads), output_kind(teacher))


# Ops that only move values around: the activation before them still decides what the output is.
_LAYOUT_ONLY = frozenset({"Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})
_KINDS = {"Softmax": "probs", "LogSoftmax": "log_probs", "Sigmoid": "sigmoid"}


def _final_activation(nodes: list, output: str, inputs: Callable, outputs: Callable) -> tuple[str, Any]:
    """(kind, node) of the Softmax/LogSoftmax/Sigmoid producing ``output`` through layout-only ops."""
    producers = {o: n for n in nodes for o in outputs(n) if o}
    node = producers.get(output)
    while node is not None and node.op_type in _LAYOUT_ONLY:
        node = producers.get(inputs(node)[0])
    if node is None or node.op_type not in _KINDS:
        return "logits", None
    return _KINDS[node.op_type], node


def output_kind(model: onnx.ModelProto) -> str:
    """What the graph's first output holds: ``"probs"`` (it ends in Softmax), ``"log_probs"`` (LogSoftmax),
    ``"sigmoid"`` or ``"logits"`` (anything else). Reshape/Transpose/Squeeze-like ops after the activation
    are looked through.

    Example:
        >>> output_kind(onnx.load("classifier_with_softmax.onnx"))  # doctest: +SKIP
        'probs'
    """
    return _final_activation(list(model.graph.node), model.graph.output[0].name,
                             lambda n: n.input, lambda n: n.output)[0]


def as_log_probs(out: np.ndarray, kind: str) -> np.ndarray:
    """Probabilities as log-probabilities (floored at 1e-30: a float32 softmax underflows to 0); other
    kinds unchanged."""
    if kind != "probs":
        return out
    return np.log(np.maximum(out, 1e-30)).astype(out.dtype)


@contextmanager
def log_prob_outputs(module: OnnxModule) -> Iterator[str]:
    """While inside, a module whose first output is a Softmax emits log-probabilities (the Softmax runs as
    LogSoftmax: same axis, exact, no underflow); yields the module's :func:`output_kind`. Restored on
    exit, so predictions and the export checks see the graph's own probabilities again."""
    kind, node = _final_activation(module._nodes, module.output_names[0], lambda n: n.inputs, lambda n: n.outputs)
    if kind != "probs":
        yield kind
        return
    impl = node.impl
    node.impl = "LogSoftmax"
    try:
        yield kind
    finally:
        node.impl = impl


def is_class_scores(out: torch.Tensor) -> bool:
    return out.dim() == 2 and out.shape[1] > 1


def loss_fn(student: torch.Tensor, labels: torch.Tensor | None, teacher: torch.Tensor | None,
            cfg: LossConfig, mixed: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """CE and/or KD (KL·T² for class scores, MSE otherwise). ``student`` and ``teacher`` are logits or
    log-probabilities (:func:`log_prob_outputs`, :func:`as_log_probs`), never probabilities.

    Args:
        mixed: a mixup batch's other labels and weight ``(labels_b, lam)``: CE is ``lam·CE(y) + (1−lam)·CE(y_b)``.
    """
    terms: list[tuple[float, torch.Tensor]] = []
    classes = is_class_scores(student) and cfg.output != "sigmoid"
    if cfg.use_labels and labels is not None and classes:
        ce = F.cross_entropy(student, labels)
        if mixed is not None:
            ce = mixed[1] * ce + (1.0 - mixed[1]) * F.cross_entropy(student, mixed[0])
        terms.append((cfg.alpha if cfg.distill else 1.0, ce))
    if cfg.distill and teacher is not None:
        kind = cfg.kd_loss if cfg.kd_loss != "auto" else ("kl" if classes else "mse")
        if kind == "kl":
            if not classes:
                raise ValueError("KL distillation needs class scores [N, C]; use mse or cosine for this output")
            t = cfg.temperature
            kd = F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t
        elif kind == "mse":
            # Standardised: a detector's output mixes pixel boxes (tens) with class probabilities (< 1) and a
            # constant anchor grid; plain MSE spends the whole gradient on the largest units (measured on the
            # zoo's YOLOv8: class part recovered, boxes not, centred cosine 0.02 after 20 epochs).
            diff = student - teacher
            kd = (diff / cfg.kd_scale).pow(2).mean() if cfg.kd_scale is not None else diff.pow(2).mean()
        elif kind == "cosine":
            kd = (1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)).mean()
        else:
            raise ValueError(f"unknown distillation loss {kind!r}")
        terms.append((1.0 - cfg.alpha if terms else 1.0, kd))
    if not terms:
        raise ValueError("nothing to train on: no labels and no teacher")
    return sum(w * l for w, l in terms)


def ensemble_targets(outputs: list[np.ndarray], temperature: float, class_scores: bool) -> np.ndarray:
    """One teacher target from several teachers' outputs.

    Class scores: the average of the softened distributions, returned as logits ``T·log(mean_i
    softmax(t_i/T))`` so that ``softmax(target/T)`` is exactly that average and :func:`loss_fn` needs no
    special case. Other outputs: the mean output. One teacher is returned unchanged.

    Example:
        >>> ensemble_targets([np.zeros((1, 3), np.float32)], 4.0, True).shape
        (1, 3)
    """
    if len(outputs) == 1:
        return outputs[0]
    if not class_scores:
        return np.mean(np.stack(outputs), axis=0).astype(outputs[0].dtype)
    probs = [torch.softmax(torch.from_numpy(o).double() / temperature, 1) for o in outputs]
    mean = torch.stack(probs).mean(0).clamp_min(1e-30)
    return (temperature * mean.log()).float().numpy()


def predict(module: torch.nn.Module, input_names: list[str], arrays: Arrays, batch_size: int = 256,
            device: str = "cpu") -> np.ndarray:
    """The module's first output on every sample (eval mode, no grad)."""
    module.to(device).eval()
    outs = []
    with torch.no_grad():
        for s in range(0, arrays.samples, batch_size):
            batch = arrays.take(np.arange(s, min(s + batch_size, arrays.samples)))
            out = module(*_to_tensors(batch, input_names, device))
            outs.append((out[0] if isinstance(out, (tuple, list)) else out).cpu().numpy())
    return np.concatenate(outs)


def accumulate_grads(module: torch.nn.Module, input_names: list[str], arrays: Arrays, cfg: LossConfig,
                     teacher: np.ndarray | None, batch_size: int, batches: int = 8, device: str = "cpu") -> None:
    """Leave in every parameter's ``.grad`` the training-loss gradient summed over a few batches
    (for Taylor importance). Runs in eval mode: BatchNorm statistics are not touched by scoring."""
    module.to(device).eval()
    module.zero_grad(set_to_none=True)
    n = min(arrays.samples, batches * batch_size)
    with _loss_outputs(module, cfg) as cfg:
        for s in range(0, n, batch_size):
            idx = np.arange(s, min(s + batch_size, n))
            b = arrays.take(idx)
            out = module(*_to_tensors(b, input_names, device))
            out = out[0] if isinstance(out, (tuple, list)) else out
            labels = torch.from_numpy(b.labels).to(device) if b.labels is not None else None
            t = torch.from_numpy(teacher[idx]).to(device) if teacher is not None else None
            loss_fn(out, labels, t, cfg).backward()
    module.eval()


@contextmanager
def _loss_outputs(module: torch.nn.Module, cfg: LossConfig) -> Iterator[LossConfig]:
    """``cfg`` for ``module``'s outputs, which are log-probabilities in here (:func:`log_prob_outputs`)."""
    if not isinstance(module, OnnxModule):
        yield cfg
        return
    with log_prob_outputs(module) as kind:
        yield replace(cfg, output=kind)


def _to_tensors(batch: Arrays, names: list[str], device: str) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(batch.inputs[n])).to(device) for n in names]


# ``schedule: auto`` decays the rate only in runs at least this long. Measured on short runs: distilling a
# from-scratch MNIST student for 4 epochs (84 steps) reached 0.74 with cosine vs 0.85 constant; a 3-epoch
# depthwise recovery (33 steps) 0.923 vs 0.933; from 12 epochs (250 steps) on cosine was ahead (0.872 vs 0.864).
COSINE_MIN_STEPS = 300


@dataclass
class Recipe:
    """How one training run goes, resolved from a spec's :class:`~compression.spec.RecoveryOptions`.

    The defaults are a plain constant-rate Adam run that keeps its last epoch: what callers that pass no
    recipe (tests, the early-exit heads) always had."""

    epochs: int
    lr: float
    batch_size: int
    schedule: str = "constant"  # "cosine": linear warm-up, then cosine decay to 0; "auto": cosine for long runs
    warmup: float = 0.0  # fraction of the optimizer steps
    weight_decay: float = 0.0  # AdamW, on weight matrices and kernels only
    patience: int | None = None  # epochs without a better validation score before stopping
    keep: str = "last"  # or "best" (needs a validation slice)
    max_minutes: float | None = None
    augment: Augmenter | None = None

    @classmethod
    def of(cls, opts: Any, *, epochs: int, lr: float, batch_size: int, augment: Augmenter | None) -> Recipe:
        """The recipe a spec's recovery options describe (``opts``: a FinetuneSpec or DistillSpec)."""
        return cls(epochs=epochs, lr=lr, batch_size=batch_size, schedule=opts.schedule, warmup=opts.warmup,
                   weight_decay=opts.weight_decay, patience=opts.patience_for(epochs), keep=opts.keep,
                   max_minutes=opts.max_minutes, augment=augment)

    def lr_factor(self, step: int, total: int) -> float:
        """The learning-rate multiplier at optimizer step ``step`` of ``total`` (``auto``: cosine from
        :data:`COSINE_MIN_STEPS` steps on, constant below)."""
        if self.schedule == "constant" or (self.schedule == "auto" and total < COSINE_MIN_STEPS):
            return 1.0
        warm = int(self.warmup * total)
        if step < warm:
            return (step + 1) / (warm + 1)
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


@dataclass
class Validation:
    """The slice of the training split that picks the best epoch: inputs, labels, the teacher's targets."""

    arrays: Arrays
    teacher: np.ndarray | None


class TrainLog(list):
    """The mean training loss per epoch (a list, as :func:`train` always returned), plus what the
    validation slice said: its score per epoch, which epoch was kept and why training stopped."""

    def __init__(self, losses: list[float] | None = None) -> None:
        super().__init__(losses or [])
        self.metric: str | None = None  # "accuracy" (higher is better) or "loss" (lower is better)
        self.validation: list[float] = []  # per epoch, the first entry being before any training (epoch 0)
        self.kept_epoch: int | None = None  # None: the last
        self.stopped: str | None = None  # "early stopping" / "time budget" / None (ran every epoch)
        self.planned: int = 0
        self.augment: dict[str, object] = {}
        # How far below the best a validation score may sit and still count as as good: one binomial standard
        # error of the best accuracy on the slice (a 60-sample slice picked a worse epoch by noise alone:
        # binary LeNet 0.864 held-out with the "best" epoch vs 0.890 with the last); 0 for losses.
        self.tolerance: float = 0.0

    def summary(self) -> dict[str, Any]:
        """What a step report shows about the run."""
        out: dict[str, Any] = {"epochs_run": len(self), "epochs_planned": self.planned,
                               "loss_per_epoch": [round(x, 6) for x in self]}
        if self.metric is not None:
            out.update(validation_metric=self.metric, validation_per_epoch=[round(v, 6) for v in self.validation],
                       kept_epoch=self.kept_epoch if self.kept_epoch is not None else len(self))
        if self.stopped:
            out["stopped"] = self.stopped
        if self.augment:
            out["augment"] = self.augment
        return out


class Teacher:
    """Targets from one or more ONNX teachers, computed in ONNX Runtime on whatever batch the student sees
    (the consistent teacher of :mod:`compression.augment`), so any uploaded model can teach. Several
    teachers: the average of their softened distributions (:func:`ensemble_targets`)."""

    def __init__(self, models: list[onnx.ModelProto], temperature: float, threads: int = 0) -> None:
        self.sessions = [session(m, threads) for m in models]
        self.kinds = [output_kind(m) for m in models]
        self.temperature = temperature

    def outputs(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Each teacher's first output (probabilities as log-probabilities)."""
        outs = []
        for sess, kind in zip(self.sessions, self.kinds):
            names = {i.name for i in sess.get_inputs()}
            outs.append(as_log_probs(run_batched(sess, {k: v for k, v in inputs.items() if k in names})[0], kind))
        return outs

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        outs = self.outputs(inputs)
        return ensemble_targets(outs, self.temperature, outs[0].ndim == 2 and outs[0].shape[1] > 1
                                and self.kinds[0] != "sigmoid")


class BatchTargets:
    """The teacher's targets for each training batch: a :class:`Teacher` runs on the batch the student sees
    when it is augmented (consistent teaching); otherwise the targets are computed once for the whole split
    and indexed (mixed like the inputs under mixup)."""

    def __init__(self, teacher: np.ndarray | Teacher | None, arrays: Arrays, *, augmenting: bool) -> None:
        self.live = teacher if isinstance(teacher, Teacher) and augmenting else None
        self.fixed: np.ndarray | None = None
        # the whole split's targets: what MSE's per-element scale is measured on (see LossConfig)
        self.reference: np.ndarray | None = None
        if isinstance(teacher, Teacher):
            if self.live is None or teacher({k: v[:1] for k, v in arrays.inputs.items()}).ndim != 2:
                self.reference = teacher(arrays.inputs)
            self.fixed = self.reference if self.live is None else None
        else:
            self.fixed = self.reference = teacher

    def __call__(self, batch: Arrays, idx: np.ndarray, mix: Mix | None) -> np.ndarray | None:
        if self.live is not None:
            return self.live(batch.inputs)
        if self.fixed is None:
            return None
        t = self.fixed[idx]
        if mix is not None:  # the teacher saw the raw samples: mix its targets in the same proportion
            t = mix.lam * t + (1 - mix.lam) * t[mix.perm]
        return np.ascontiguousarray(t)


def mixed_labels(labels: torch.Tensor | None, mix: Mix | None) -> tuple[torch.Tensor, float] | None:
    """:func:`loss_fn`'s ``mixed`` for a mixup batch: the partner samples' labels and the weight."""
    if mix is None or labels is None:
        return None
    return labels[torch.from_numpy(mix.perm).to(labels.device)], mix.lam


def train(
    module: torch.nn.Module,
    input_names: list[str],
    arrays: Arrays,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    loss: LossConfig,
    teacher: np.ndarray | Teacher | None,
    seed: int,
    device: str = "cpu",
    after_step: Callable[[], None] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    recipe: Recipe | None = None,
    validation: Validation | None = None,
) -> TrainLog:
    """Train ``module`` in place; returns the mean loss per epoch (:class:`TrainLog`).

    Args:
        teacher: the teacher's outputs on ``arrays`` as logits or log-probabilities
            (:func:`teacher_targets`), or a :class:`Teacher` run on each (augmented) batch.
        after_step: called after every optimizer step (pruning masks re-applied here).
        on_epoch: ``(epoch, mean_loss)`` after each epoch; may raise ``Cancelled``.
        recipe: schedule, weight decay, early stopping, best-epoch keeping, time budget, augmentation;
            None: constant-rate Adam for ``epochs``, the last epoch kept.
        validation: the slice that scores each epoch (needed to keep the best one or stop early).
    """
    recipe = recipe or Recipe(epochs=epochs, lr=lr, batch_size=batch_size)
    with _loss_outputs(module, loss) as loss:
        return _train(module, input_names, arrays, loss=loss, teacher=teacher, seed=seed, device=device,
                      after_step=after_step, on_epoch=on_epoch, recipe=recipe, validation=validation)


def _optimizer(module: torch.nn.Module, recipe: Recipe,
               params: list[torch.nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """AdamW; decay only on weight matrices and kernels (a decayed bias, norm or scale only hurts)."""
    if params is None:
        params = list({id(p): p for p in module.parameters() if p.requires_grad}.values())
    if recipe.weight_decay <= 0:
        return torch.optim.Adam(params, lr=recipe.lr)
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=recipe.lr)


def _kd_scaled(loss: LossConfig, reference: np.ndarray | None, device: str) -> LossConfig:
    """MSE distillation weighs each output element by its spread over the training split (see :class:`LossConfig`)."""
    if reference is not None and reference.ndim != 2 and reference.dtype.kind == "f" and len(reference) > 1:
        spread = reference.std(0)
        floor = max(float(spread.mean()) * 0.1, 1e-6)  # elements that never vary must not dominate
        return replace(loss, kd_scale=torch.from_numpy(np.maximum(spread, floor).astype(np.float32)).to(device))
    return loss


def _train(module: torch.nn.Module, input_names: list[str], arrays: Arrays, *, loss: LossConfig,
           teacher: np.ndarray | Teacher | None, seed: int, device: str, after_step: Callable[[], None] | None,
           on_epoch: Callable[[int, float], None] | None, recipe: Recipe, validation: Validation | None) -> TrainLog:
    torch.manual_seed(seed)
    targets = BatchTargets(teacher, arrays, augmenting=recipe.augment is not None)
    loss = _kd_scaled(loss, targets.reference, device)
    module.to(device).train()

    def batch_loss(batch: Arrays, idx: np.ndarray, mix: Mix | None, first: bool) -> torch.Tensor:
        out = _forward(module, _to_tensors(batch, input_names, device), first=first)
        out = out[0] if isinstance(out, (tuple, list)) else out
        labels = torch.from_numpy(batch.labels).to(device) if batch.labels is not None else None
        t = targets(batch, idx, mix)
        t_out = torch.from_numpy(t).to(device) if t is not None else None
        return loss_fn(out, labels, t_out, loss, mixed=mixed_labels(labels, mix))

    def validate(log: TrainLog) -> tuple[float, float]:
        return validate_module(module, input_names, validation, loss, device, log)

    return run_epochs(module, arrays, recipe, seed=seed, batch_loss=batch_loss,
                      validate=validate if validation is not None else None, after_step=after_step,
                      on_epoch=on_epoch)


BatchLoss = Callable[[Arrays, np.ndarray, "Mix | None", bool], "torch.Tensor | None"]


def run_epochs(module: torch.nn.Module, arrays: Arrays, recipe: Recipe, *, seed: int, batch_loss: BatchLoss,
               validate: Callable[[TrainLog], tuple[float, float]] | None = None,
               params: list[torch.nn.Parameter] | None = None, after_step: Callable[[], None] | None = None,
               on_epoch: Callable[[int, float], None] | None = None, train_mode: bool = True) -> TrainLog:
    """The one training loop of every step that trains (fine-tuning, distillation, early-exit heads,
    slimmable widths): shuffled batches, augmentation, the learning-rate schedule, AdamW, validation
    after every epoch, early stopping, the time budget and the best epoch restored.

    Args:
        batch_loss: ``(batch, indices, mixup draw, first batch?) -> loss`` of one (augmented) batch; it may
            call ``backward`` itself and return a detached loss (several widths, one step), or return
            None to skip the batch.
        validate: scores the module after each epoch (higher is better) and appends to the log; None: no
            validation, the last epoch is kept.
        params: what the optimizer updates (default: every parameter that requires grad).
        train_mode: ``module.train()`` between validations (False: a frozen backbone stays in eval mode).

    Returns:
        :class:`TrainLog`.
    """
    rng = np.random.default_rng(seed)
    aug = recipe.augment
    opt = _optimizer(module, recipe, params)
    n = arrays.samples
    total_steps = max(1, recipe.epochs * math.ceil(n / recipe.batch_size))
    log = TrainLog()
    log.planned = recipe.epochs
    log.augment = aug.describe() if aug is not None else {}
    keep_best = validate is not None and recipe.keep == "best"
    best_score, best_epoch, best_state = None, 0, None
    if validate is not None and recipe.epochs:
        best_score = validate(log)
        best_state = _snapshot(module) if keep_best else None
    module.train(train_mode)
    started = time.monotonic()
    step, since_best = 0, 0
    for epoch in range(recipe.epochs):
        t0 = time.monotonic()
        order = rng.permutation(n)
        total, count = 0.0, 0
        for s in range(0, n, recipe.batch_size):
            idx = order[s:s + recipe.batch_size]
            batch, mix = arrays.take(idx), None
            if aug is not None:
                batch, mix = aug(batch, rng)
            for group in opt.param_groups:
                group["lr"] = recipe.lr * recipe.lr_factor(step, total_steps)
            opt.zero_grad(set_to_none=True)
            l = batch_loss(batch, idx, mix, not log and s == 0)
            if l is None:
                continue
            if l.requires_grad:
                l.backward()
            opt.step()
            step += 1
            if after_step is not None:
                after_step()
            total += float(l.detach()) * len(idx)
            count += len(idx)
        log.append(total / max(count, 1))
        if validate is not None:
            score = validate(log)
            module.train(train_mode)
            if best_score is None or score > best_score:
                best_score, best_epoch, since_best = score, epoch + 1, 0
                best_state = _snapshot(module) if keep_best else None
            else:
                since_best += 1
        if on_epoch is not None:
            on_epoch(epoch, log[-1])
        if validate is not None and recipe.patience is not None and since_best >= recipe.patience \
                and epoch + 1 < recipe.epochs:
            log.stopped = f"early stopping: no better validation {log.metric} for {recipe.patience} epochs"
            break
        took = time.monotonic() - t0
        if recipe.max_minutes is not None and epoch + 1 < recipe.epochs \
                and time.monotonic() - started + took > recipe.max_minutes * 60:
            log.stopped = f"time budget: the next epoch would end past {recipe.max_minutes:g} min"
            break
    if keep_best and best_state is not None:
        log.kept_epoch = best_epoch
        if best_epoch != len(log) and log.validation[-1] >= log.validation[best_epoch] - log.tolerance:
            log.kept_epoch = len(log)  # the last is as good within the slice's noise, and has trained longer
        elif best_epoch != len(log):
            module.load_state_dict(best_state)
    module.eval()
    return log


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def validate_module(module: torch.nn.Module, input_names: list[str], val: Validation | None, loss: LossConfig, device: str,
              log: TrainLog) -> tuple[float, float]:
    """Score the module on the validation slice (eval mode): ``(accuracy, -loss)`` with labels on class
    scores, else ``(-loss, 0)``; higher is better. Appends the headline number to ``log``."""
    assert val is not None
    module.eval()
    outs = []
    with torch.no_grad():
        for s in range(0, val.arrays.samples, 256):
            b = val.arrays.take(np.arange(s, min(s + 256, val.arrays.samples)))
            # the first thing a run does with the module: a graph that cannot take the batch is refused here
            out = _forward(module, _to_tensors(b, input_names, device), first=not log.validation)
            outs.append((out[0] if isinstance(out, (tuple, list)) else out).float())
        out = torch.cat(outs)
        labels = torch.from_numpy(val.arrays.labels).to(device) if val.arrays.labels is not None else None
        t = torch.from_numpy(val.teacher).to(device) if val.teacher is not None else None
        value = float(loss_fn(out, labels, t, loss))
    if labels is not None and is_class_scores(out) and loss.output != "sigmoid":
        acc = float((out.argmax(1) == labels).float().mean())
        log.metric = "accuracy"
        log.validation.append(acc)
        best = max(log.validation)
        log.tolerance = math.sqrt(max(best * (1 - best), 1e-12) / len(labels))
        return acc, -value
    log.metric = "loss"
    log.validation.append(value)
    return -value, 0.0


def _forward(module: torch.nn.Module, inputs: list[torch.Tensor], *, first: bool) -> Any:
    """The module on a training batch. A graph exported with a fixed batch may bake it into ops the
    converter cannot re-batch (a ViT's class token: ``Expand`` to 1, then ``Concat`` with 64 patches'
    rows); the first batch then fails, and that is a refusal with its reason, not a crash."""
    try:
        return module(*inputs)
    except RuntimeError as e:
        fixed = getattr(module, "fixed_batch", None)
        if not first or not fixed or len(inputs[0]) == fixed:
            raise
        raise NotTrainable(f"the graph fixes its batch at {fixed} inside its ops, so it cannot be trained on "
                           f"batches of {len(inputs[0])} ({str(e).splitlines()[0][:160]}); export the model with a "
                           "dynamic batch dimension to train it") from None


def loss_config(finetune: Any, has_labels: bool) -> tuple[LossConfig, list[str]]:
    """Resolve the fine-tune spec against the data: unlabelled data forces distillation (noted)."""
    notes = []
    distill = bool(finetune.distill)
    if not has_labels and not distill:
        distill = True
        notes.append("dataset has no labels: fine-tuned by distillation from the original")
    return LossConfig(use_labels=has_labels, distill=distill, temperature=finetune.temperature,
                      alpha=finetune.alpha), notes


def to_trainable(model: onnx.ModelProto, why: str) -> OnnxModule:
    """``model`` converted to a trainable torch module, or refused.

    Args:
        why: what needs the module, named in the error (``"fine-tuning"``, ``"slimmable training"``).

    Raises:
        NotTrainable: the graph has ops the converter cannot turn into torch; the message names ``why``
            and those ops.

    Example:
        >>> module = to_trainable(onnx.load("model.onnx"), "fine-tuning")  # doctest: +SKIP
    """
    from compression.analysis import fixed_batch, input_specs

    try:
        module = to_torch(model)
    except UnsupportedOp as e:
        raise NotTrainable(f"{why} needs a trainable model; unsupported ops: {e.op_types}") from None
    module.fixed_batch = fixed_batch(s["shape"] for s in input_specs(model))  # read by _train's first batch
    return module


def module_holdout_accuracy(module: torch.nn.Module, ctx: StepContext) -> float | None:
    """Top-1 accuracy of a torch module on the held-out split (:func:`compression.metrics.top1_accuracy`;
    None without labels or class scores). For a module between training rounds; an ONNX graph is measured
    by :func:`compression.metrics.holdout_accuracy`."""
    data = ctx.data
    if data is None or data.holdout.labels is None:
        return None
    out = predict(module, list(module.input_names), data.holdout, device=ctx.device)
    return top1_accuracy(out, data.holdout.labels)


# The least samples a validation slice holds, and the least left to train on, for one to be carved: a slice of
# fewer than 32 scores in steps of 3+ points and cannot tell epochs apart.
MIN_VALIDATION, MIN_TRAIN = 32, 32


def carve_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(training, validation) indices of :func:`carve_validation`; validation None when too few samples."""
    k = round(fraction * n)
    if fraction <= 0 or k < MIN_VALIDATION or n - k < MIN_TRAIN:
        return np.arange(n), None
    order = np.random.default_rng(seed + 7919).permutation(n)
    return np.sort(order[k:]), np.sort(order[:k])


def carve_validation(train: Arrays, fraction: float, seed: int) -> tuple[Arrays, Arrays | None]:
    """Split a validation slice off the *training* split (a seeded random ``fraction`` of it): the slice
    that picks the best epoch and stops training early. The held-out split stays untouched, so the
    metrics a job reports were never used to choose anything. None when too few samples for one.

    Example:
        >>> tr, val = carve_validation(Arrays({"x": np.zeros((400, 2))}), 0.1, 0)
        >>> tr.samples, val.samples
        (360, 40)
    """
    keep, val = carve_indices(train.samples, fraction, seed)
    if val is None:
        return train, None
    return train.take(keep), train.take(val)


class Finetune:
    """One step's fine-tuning, set up once: the spec's loss resolved against the data (unlabelled data
    forces distillation, noted), a validation slice carved from the training split, the epoch count and
    recipe (schedule, early stopping, best epoch, augmentation), and the original as the teacher —
    run in ONNX Runtime on each augmented batch, or once on the training split when nothing is jittered.
    A step that alternates pruning and training calls :meth:`run` once per round.

    Example:
        >>> tune = Finetune(FinetuneSpec(epochs=2), ctx, why="fine-tuning")  # doctest: +SKIP
        >>> losses = tune.run(module)                                          # doctest: +SKIP
    """

    def __init__(self, spec: FinetuneSpec, ctx: StepContext, *, why: str) -> None:
        """Raises:
            InvalidSpec: no dataset (``"{why} needs a dataset"``).
        """
        if ctx.data is None:
            raise InvalidSpec(f"{why} needs a dataset", [{"loc": ["finetune"], "msg": "needs a dataset"}])
        self.spec, self.ctx, self.data = spec, ctx, ctx.data
        self.loss, self.notes = loss_config(spec, ctx.data.train.labels is not None)
        self.train_split, val = carve_validation(ctx.data.train, spec.validation, ctx.seed)
        self.val_arrays = val
        if val is None and spec.validation > 0:
            self.notes.append(f"no validation slice ({ctx.data.train.samples} training samples are too few): "
                              "the last epoch is kept")
        self.epochs = spec.planned_epochs(self.train_split.samples)
        self.augment = augmenter_for(spec.augment, self.train_split, distilling=self.loss.distill, epochs=self.epochs)

    @cached_property
    def teacher_model(self) -> Teacher | None:
        """The original in ONNX Runtime (None unless distilling)."""
        return Teacher([self.ctx.original], self.spec.temperature, self.ctx.threads) if self.loss.distill else None

    @cached_property
    def teacher(self) -> np.ndarray | None:
        """The original model's outputs on the training split (None unless distilling), as :func:`teacher_targets`."""
        return self.teacher_model(self.train_split.inputs) if self.teacher_model is not None else None

    @cached_property
    def validation(self) -> Validation | None:
        if self.val_arrays is None:
            return None
        t = self.teacher_model(self.val_arrays.inputs) if self.teacher_model is not None else None
        return Validation(self.val_arrays, t)

    def recipe(self) -> Recipe:
        return Recipe.of(self.spec, epochs=self.epochs, lr=self.spec.lr, batch_size=self.spec.batch_size,
                         augment=self.augment)

    def run(self, module: OnnxModule, *, seed_offset: int = 0, after_step: Callable[[], None] | None = None,
            on_epoch: Callable[[int, float], None] | None = None) -> TrainLog:
        """:func:`train` ``module`` in place (seed: the step's plus ``seed_offset``); returns the loss per
        epoch with the validation record (:class:`TrainLog`)."""
        ft = self.spec
        teacher: np.ndarray | Teacher | None = None
        if self.loss.distill:
            teacher = self.teacher_model if self.augment is not None else self.teacher
        with self._batchnorm(module):
            return train(module, list(module.input_names), self.train_split, epochs=self.epochs, lr=ft.lr,
                         batch_size=ft.batch_size, loss=self.loss, teacher=teacher,
                         seed=self.ctx.seed + seed_offset, device=self.ctx.device, after_step=after_step,
                         on_epoch=on_epoch, recipe=self.recipe(), validation=self.validation)

    @contextmanager
    def _batchnorm(self, module: OnnxModule) -> Iterator[None]:
        """BatchNorm re-inserted after the convs for one :meth:`run` (:mod:`compression.batchnorm`), folded
        back when it ends, so what follows a round (a pruning step, the export) sees the graph's own convs.
        ``auto`` leaves a module with parametrized (quantized, clustered) weights alone; the note is added
        to :attr:`notes` once."""
        from compression.batchnorm import any_parametrized, reinserted_batchnorm

        if (getattr(self.spec, "batchnorm", "auto") == "off" or not self.epochs
                or not isinstance(module, OnnxModule) or any_parametrized(module)):
            yield
            return
        with reinserted_batchnorm(module, self.train_split, device=self.ctx.device) as bn:
            yield
        note = bn.note()
        if note and note not in self.notes:
            self.notes.append(note)

    def gradients(self, module: OnnxModule, batches: int = 8) -> None:
        """Leave the training loss's gradient over a few batches in ``module``'s ``.grad`` (Taylor importance)."""
        accumulate_grads(module, list(module.input_names), self.train_split, self.loss, self.teacher,
                         self.spec.batch_size, batches)


@dataclass
class Finetuned:
    """What :func:`finetune_onnx` gives back."""

    model: onnx.ModelProto  # the graph it was given, holding the trained values
    module: OnnxModule  # the trained module (on the CPU)
    losses: TrainLog  # mean loss per epoch, with the validation record
    notes: list[str]
    distill: bool  # whether the original taught (asked for, or forced by unlabelled data)


def finetune_onnx(model: onnx.ModelProto, spec: FinetuneSpec, ctx: StepContext, *, why: str = "fine-tuning",
                  module: OnnxModule | None = None, after_step: Callable[[], None] | None = None,
                  phase: str = "finetuning", span: tuple[float, float] = (0.0, 1.0)) -> Finetuned:
    """Fine-tune an ONNX graph: convert it, train (labels and/or distillation from the original), write the
    trained values back into the same graph.

    Args:
        why: what trains, for the errors (``"fine-tuning needs a dataset"``).
        module: ``model`` already converted and prepared (a parametrization registered on its layers);
            None: converted here.
        after_step: called after every optimizer step (masks re-applied, latent weights clipped).
        phase, span: progress after each epoch, from ``span[0]`` over ``span[1]`` of the step.

    Returns:
        :class:`Finetuned`. With ``spec.epochs == 0`` nothing trains; the values are still written back.

    Raises:
        InvalidSpec: no dataset.
        NotTrainable: the graph cannot be converted to torch.

    Example:
        >>> finetune_onnx(factored, FinetuneSpec(epochs=2), ctx).losses  # doctest: +SKIP
        [0.41, 0.22]
    """
    tune = Finetune(spec, ctx, why=why)
    module = module if module is not None else to_trainable(model, why)
    start, width = span

    def on_epoch(epoch: int, loss: float) -> None:
        ctx.progress(phase, start + width * (epoch + 1) / tune.epochs,
                     f"fine-tune epoch {epoch + 1}/{tune.epochs}: loss {loss:.4f}")

    losses = tune.run(module, after_step=after_step, on_epoch=on_epoch) if tune.epochs else TrainLog()
    module.cpu()
    return Finetuned(module.write_back(model), module, losses, tune.notes, tune.loss.distill)
