"""Slimmable networks: train one set of shared weights at several widths, export one ONNX per width.

Slimmable Networks (Yu et al. 2018): shared convolution/linear weights, a private (switchable)
BatchNorm per width, trained on the summed loss of every width (``rule: sum``). Universally Slimmable
Networks (Yu & Huang 2019): the sandwich rule (widest + narrowest + ``random_widths`` others per step)
with in-place distillation from the widest (``rule: sandwich``). The channels that shrink are the ones
channel pruning can remove (DepGraph groups of :mod:`compression.channels`; the net is
:mod:`.network`); the classifier keeps its classes. Each width is exported physically smaller with its own BatchNorm statistics and measured here
(params, MACs, ONNX Runtime latency, held-out accuracy).
"""
from __future__ import annotations

import time
from typing import Literal

import onnx
from pydantic import Field, field_validator, model_validator

from compression.channels import plan_channels
from compression.context import StepContext, StepResult
from compression.errors import InvalidSpec
from compression.registry import register_technique
from compression.spec import FinetuneSpec
from compression.step_spec import StepSpec
from compression.techniques.slimmable.export import export_checked, width_metrics
from compression.techniques.slimmable.network import SlimmableNet, find_groups
from compression.techniques.slimmable.training import calibrate_bn, train_slimmable
from compression.augment import augmenter_for
from compression.training import (Recipe, Teacher, Validation, carve_validation, loss_config, teacher_outputs,
                                  to_trainable)

LATENCY_RUNS = 30


class SlimmableSpec(FinetuneSpec, StepSpec):
    """Widths and training rule; ``epochs, lr, batch_size, distill, temperature, alpha`` as in fine-tuning
    (CE on labels and/or KD from the original model for the widest width)."""

    method: Literal["slimmable"] = "slimmable"
    batchnorm: Literal["off"] = Field("off", description="not re-inserted: slimmable training keeps the graph's own "
                                                         "normalisation and recalibrates BatchNorm per width")
    widths: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0], min_length=2, max_length=16,
                                description="fractions of each channel group kept; sorted, unique, in (0, 1], with 1.0")
    rule: Literal["sandwich", "sum"] = Field(
        "sandwich", description="sandwich: widest + narrowest + random_widths others per step (US-Nets); "
                                "sum: every width every step (Slimmable Networks)")
    random_widths: int = Field(2, ge=0, le=14, description="sandwich: widths drawn per step besides the two ends")
    inplace_distill: bool = Field(True, description="sandwich: narrower widths learn the widest's outputs (KL at T=1; "
                                  "with labels, alpha weighs CE on them)")
    channel_order: Literal["l1", "index"] = Field(
        "l1", description="which channels a narrow width keeps: the largest group L1 norms of the original, "
                          "or the first ones")
    round_to: int | None = Field(None, ge=1, le=256, description="keep channel counts multiples of this")
    bn_calibration_samples: int = Field(1024, ge=0, le=1_000_000,
                                        description="training samples to re-estimate each width's BatchNorm stats")
    epochs: int = Field(5, ge=0, le=1000)

    @field_validator("widths")
    @classmethod
    def _widths(cls, v: list[float]) -> list[float]:
        bad = [w for w in v if not 0.0 < w <= 1.0]
        if bad:
            raise ValueError(f"every width must be in (0, 1]; got {bad}")
        if len(set(v)) != len(v):
            raise ValueError("widths must be unique")
        if v != sorted(v):
            raise ValueError("widths must be sorted ascending")
        if v[-1] != 1.0:
            raise ValueError("widths must include 1.0 (the full network, the step's model)")
        return v

    @model_validator(mode="after")
    def _check(self) -> "SlimmableSpec":
        if self.rule == "sum" and self.inplace_distill:
            if "inplace_distill" in self.model_fields_set:
                raise ValueError("inplace_distill belongs to rule 'sandwich'")
            # the default belongs to sandwich: stored as off, so the stored spec parses again (the worker does)
            object.__setattr__(self, "inplace_distill", False)
        return self

    @property
    def trains(self) -> bool:
        return self.epochs > 0  # the shared weights at every width

    @property
    def needs_data(self) -> bool:
        return True  # training, BatchNorm calibration and per-width accuracy

    @staticmethod
    def artifact(width: float) -> str:
        """Name of the extra model holding ``width`` (``width_0.25.onnx``)."""
        return f"width_{float(width)}.onnx"


@register_technique("slimmable", SlimmableSpec, phase="finetuning")
def slimmable(model: onnx.ModelProto, spec: SlimmableSpec, ctx: StepContext) -> StepResult:
    """Train shared weights at several widths (switchable BatchNorm) and export each width's smaller ONNX.

    Args:
        model: the current model of the pipeline (a CNN or MLP the converter can train).
        spec: widths, rule (sandwich / sum), in-place distillation, epochs, lr, batch_size, distill.
        ctx: the dataset (labels optional: without them the widest learns from the original), progress.

    Returns:
        StepResult whose model is the width-1.0 network (same graph as ``model``, trained) and whose
        ``extra_models`` hold ``width_<w>.onnx`` for every width (1.0 included). The report lists the
        channel groups, the channels each width keeps, and per width: params, MACs, ONNX Runtime latency
        p50/p90 (batch 1), held-out accuracy and agreement with the original, and the largest difference
        between the exported graph and the masked full-size network it was cut from.

    Raises:
        InvalidSpec: no dataset, a transformer (heads/FFN slimming is not supported), no layer whose
            channels can shrink, or ``round_to`` that leaves two widths with the same channels.
        NotTrainable: the graph has ops the converter cannot train.

    Example:
        >>> res = slimmable(model, SlimmableSpec(widths=[0.5, 1.0], epochs=3), ctx)      # doctest: +SKIP
        >>> sorted(res.extra_models)                                                      # doctest: +SKIP
        ['width_0.5.onnx', 'width_1.0.onnx']
    """
    data = ctx.data
    if data is None:
        raise InvalidSpec("slimmable training needs a dataset", [{"loc": ["method"], "msg": "needs a dataset"}])
    module = to_trainable(model, "slimmable training")
    names = list(module.input_names)
    example = ctx.example_inputs(model)
    module.record_shapes(*example)
    ctx.progress("finetuning", 0.0, "tracing channel groups")
    plan = plan_channels(module, model, example)
    if plan.transformer:
        raise InvalidSpec("slimmable supports CNN/MLP channel groups; attention heads and FFN neurons of a "
                          "transformer are not slimmed", [{"loc": ["method"], "msg": "transformers not supported"}])
    groups, skipped = find_groups(module, plan, example, spec.channel_order)
    if not groups:
        why = "; ".join(f"{k}: {v}" for k, v in {**plan.ignored, **skipped}.items()) or "no Conv/Gemm/MatMul layers"
        raise InvalidSpec(f"no layer of this model can change width ({why})",
                          [{"loc": ["widths"], "msg": "no layer of this model can change width"}])
    net = SlimmableNet(module, groups, example, spec.widths, round_to=spec.round_to)
    kept = [tuple(g.kept[w] for g in groups) for w in spec.widths]
    if len(set(kept)) != len(kept):
        raise InvalidSpec(f"widths {spec.widths} give the same channel counts twice (round_to {spec.round_to}): "
                          f"{kept}", [{"loc": ["widths"], "msg": "two widths keep the same channels"}])
    cfg, notes = loss_config(spec, data.train.labels is not None)
    inplace = spec.inplace_distill and spec.rule == "sandwich"
    train_split, val = carve_validation(data.train, spec.validation, ctx.seed)
    augment = augmenter_for(spec.augment, train_split, distilling=cfg.distill or inplace, epochs=spec.epochs)
    teacher = Teacher([ctx.original], spec.temperature, ctx.threads) if cfg.distill else None
    validation = Validation(val, teacher(val.inputs) if teacher is not None else None) if val is not None else None
    recipe = Recipe.of(spec, epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size, augment=augment)
    switchable = len(net.norms_of(1.0))
    if not switchable:
        notes.append("the graph has no BatchNormalization nodes (exporters fold them into Conv in eval mode): "
                     "widths share every tensor, biases included; for a private BatchNorm per width export with "
                     "BatchNorm kept (torch.onnx.export(..., dynamo=True, optimize=False))")

    def on_epoch(epoch: int, loss: float) -> None:
        ctx.progress("finetuning", 0.85 * (epoch + 1) / max(spec.epochs, 1),
                     f"epoch {epoch + 1}/{spec.epochs}: summed loss {loss:.4f}")

    t0 = time.perf_counter()
    history = train_slimmable(net, names, train_split, recipe=recipe, loss=cfg, teacher=teacher, rule=spec.rule,
                              random_widths=spec.random_widths, inplace_distill=inplace, seed=ctx.seed,
                              device=ctx.device, validation=validation, on_epoch=on_epoch)
    train_s = time.perf_counter() - t0
    calibrated = calibrate_bn(net, names, data.train, samples=spec.bn_calibration_samples,
                              batch_size=spec.batch_size, seed=ctx.seed, device=ctx.device)
    net.cpu().eval()
    ctx.progress("exporting", 0.9, f"exporting {len(spec.widths)} widths")
    extras: dict[str, onnx.ModelProto] = {}
    rows = []
    reference = teacher_outputs(ctx.original, data.holdout, ctx.threads)
    for i, w in enumerate(spec.widths):
        exported = export_checked(net, w, model, example, data.holdout, ctx.threads)
        extras[spec.artifact(w)] = exported.model
        rows.append({"width": w, "artifact": spec.artifact(w), **width_metrics(
            exported.model, data.holdout, reference, ctx.threads, LATENCY_RUNS),
            "export_max_abs_error": exported.max_abs_error})
        ctx.progress("exporting", 0.9 + 0.1 * (i + 1) / len(spec.widths), f"width {w}: exported and measured")
    report = {
        "widths": rows,
        "rule": spec.rule,
        "random_widths": spec.random_widths if spec.rule == "sandwich" else None,
        "inplace_distill": spec.inplace_distill and spec.rule == "sandwich",
        "channel_order": spec.channel_order,
        "switchable_batchnorm_layers": switchable,
        "bn_calibration_samples": calibrated,
        "groups": [{"root": g.root.name, "layers": g.layers, "channels": g.channels,
                    "kept": {str(w): g.kept[w] for w in spec.widths}} for g in groups],
        "ignored": [{"layer": k, "reason": v} for k, v in {**plan.ignored, **skipped}.items()],
        "labels_used": cfg.use_labels, "distill": cfg.distill,
        "epochs": spec.epochs, "loss_per_epoch": [round(h, 6) for h in history], "train_seconds": round(train_s, 2),
        "training": history.summary(),
        "notes": notes,
    }
    return StepResult(extras[spec.artifact(1.0)], report, extras)
