"""Depthwise-separable replacement (``method: depthwise_separable``): MobileNet's block from a trained conv.

Each standard k×k convolution (2-D, ``groups=1``, k > 1) becomes a depthwise k×k conv (``group = Cin``,
same strides/pads/dilations) followed by a pointwise 1×1 conv to ``Cout`` that carries the bias. The new
weights start from the best per-input-channel rank-1 approximation of the original kernel (see
:func:`compression.techniques.factorization.svd.rank1_depthwise`), which is usually far from exact, so the
step then recovers by distillation from the original model (default on; ``finetune.epochs: 0`` keeps the
initialisation).
Parameters go from ``Cout·Cin·k²`` to ``Cin·k² + Cout·Cin`` per layer, MACs by the same factor.
"""
from __future__ import annotations

from typing import Any, Literal

import onnx
from pydantic import Field, model_validator

from compression.context import StepContext, StepResult
from compression.errors import InvalidSpec
from compression.metrics import holdout_accuracy
from compression.registry import register_technique
from compression.spec import FinetuneSpec
from compression.step_spec import StepSpec
from compression.techniques.factorization.layers import find_layers, name_nodes
from compression.techniques.factorization.measure import probe_sample, safe_layer_macs
from compression.techniques.factorization.recovery import recover
from compression.techniques.factorization.surgery import depthwise_rewrite


class RecoverySpec(FinetuneSpec):
    """Recovery training after the replacement: distillation from the original by default."""

    epochs: int = Field(3, ge=0, le=1000, description="0: keep the rank-1 initialisation")
    lr: float = Field(2e-3, gt=0, le=10)
    distill: bool = Field(True, description="KD loss from the original model's outputs")


class DepthwiseSpec(StepSpec):
    """Which convs to replace; trains, needs data and torch when ``finetune`` has epochs (the defaults)."""

    method: Literal["depthwise_separable"] = "depthwise_separable"
    layers: list[str] | None = Field(None, min_length=1, max_length=100_000,
                                     description="Conv node names to replace (default: every eligible conv)")
    exclude: list[str] = Field(default_factory=list, max_length=100_000, description="Conv node names left alone")
    min_channels: int = Field(2, ge=1, le=1_000_000,
                              description="skip convs with fewer input channels (a 1-channel stem gains little "
                                          "and loses most of its capacity); ignored for convs named in layers")
    finetune: RecoverySpec | None = Field(default_factory=RecoverySpec,
                                          description="recovery training; null or epochs 0: initialisation only")

    @model_validator(mode="after")
    def _check(self) -> "DepthwiseSpec":
        clash = sorted(set(self.layers or []) & set(self.exclude))
        if clash:
            raise ValueError(f"layers both selected and excluded: {clash}")
        return self


def _plan(model: onnx.ModelProto, spec: DepthwiseSpec) -> tuple[list[str], list[dict[str, Any]]]:
    """Which convs to replace, and every conv left alone with its reason."""
    convs = [la for la in find_layers(model) if la.op_type == "Conv"]
    known = {la.name for la in convs}
    unknown = sorted((set(spec.layers or []) | set(spec.exclude)) - known)
    if unknown:
        where = ["layers" if u in (spec.layers or []) else "exclude" for u in unknown]
        raise InvalidSpec(f"unknown conv layers {unknown}; Conv nodes: {sorted(known)}",
                          [{"loc": [w, u], "msg": "unknown conv layer"} for w, u in zip(where, unknown)])
    chosen, skipped = [], []
    for la in convs:
        reason = la.reason
        named = spec.layers is not None and la.name in spec.layers
        if reason is None:
            cout, cin, kh, kw = la.shape
            if spec.layers is not None and not named:
                reason = "not listed in layers"
            elif la.name in spec.exclude:
                reason = "excluded by the spec"
            elif kh * kw == 1:
                reason = "1×1 conv: already pointwise"
            elif cin < spec.min_channels and not named:
                reason = f"Cin {cin} < min_channels {spec.min_channels}"
            elif cin * kh * kw + cout * cin >= cout * cin * kh * kw:
                reason = (f"saves nothing: Cin·k² + Cout·Cin = {cin * kh * kw + cout * cin:,} ≥ "
                          f"Cout·Cin·k² = {cout * cin * kh * kw:,}")
        if reason is None:
            chosen.append(la.name)
        else:
            skipped.append({"layer": la.name, "reason": reason})
    return chosen, skipped


@register_technique("depthwise_separable", DepthwiseSpec, phase="factorizing")
def depthwise_separable(model: onnx.ModelProto, spec: DepthwiseSpec, ctx: StepContext) -> StepResult:
    """Replace k×k convs by depthwise k×k + pointwise 1×1 (rank-1 SVD init), then distil from the original.

    Args:
        model: the current model of the pipeline.
        spec: ``layers`` / ``exclude`` / ``min_channels`` select the convs; ``finetune`` (distillation by
            default) recovers accuracy.
        ctx: data (for recovery), the original model (the teacher), progress.

    Returns:
        StepResult with the rewritten graph. The report gives per layer: k, Cin, Cout, params and MACs
        (measured shapes, batch 1) before/after, the rank-1 initialisation's relative error; convs left
        alone with reasons; conv totals; held-out accuracy before, at initialisation and after recovery.
        A model without eligible convs comes back unchanged with a note.

    Raises:
        InvalidSpec: unknown layer names; recovery without a dataset.
        NotTrainable: recovery on a graph the converter cannot make trainable.

    Example:
        >>> depthwise_separable(cnn, DepthwiseSpec(), ctx).report["totals"]["macs_ratio"]  # doctest: +SKIP
        4.2
    """
    model = name_nodes(model)
    chosen, skipped = _plan(model, spec)
    if not chosen:
        note = ("no eligible k×k convolutions (2-D, groups=1, k > 1, enough input channels): model unchanged"
                if skipped else "the model has no convolutions: model unchanged")
        return StepResult(model, {"layers": [], "skipped": skipped, "totals": _totals([], None),
                                  "notes": [note]})
    ctx.progress("factorizing", 0.05, f"replacing {len(chosen)} conv(s)")
    replaced, rewrites = depthwise_rewrite(model, chosen)
    sample = probe_sample(model, ctx)
    macs_before, macs_after = safe_layer_macs(model, sample), safe_layer_macs(replaced, sample)
    acc = {"before": holdout_accuracy(model, ctx), "init": holdout_accuracy(replaced, ctx)}
    out, notes, training = replaced, [], None
    if spec.finetune is not None and spec.finetune.enabled:
        out, training = recover(replaced, spec.finetune, ctx, "distilling")
        notes.extend(training.pop("notes"))
        acc["recovered"] = holdout_accuracy(out, ctx)
    shapes = {la.name: la.shape for la in find_layers(model)}
    rows = []
    for rw in rewrites:
        cout, cin, kh, kw = shapes[rw.name]
        row: dict[str, Any] = {
            "layer": rw.name, "k": [kh, kw], "cin": cin, "cout": cout,
            "params_before": rw.params_before, "params_after": rw.params_after,
            "rank1_relative_error": round(rw.relative_error, 6),
        }
        if macs_before is not None and macs_after is not None:
            row["macs_before"] = macs_before[rw.name]
            row["macs_after"] = macs_after[rw.first] + macs_after[rw.second]
        rows.append(row)
    ctx.progress("factorizing", 1.0, "done")
    conv_macs = None
    if macs_before is not None and macs_after is not None:
        conv_macs = (_conv_macs(model, macs_before), _conv_macs(replaced, macs_after))
    report = {"layers": rows, "skipped": skipped, "totals": _totals(rows, conv_macs),
              "holdout_accuracy": acc, "notes": notes,
              "finetune": spec.finetune.model_dump() if spec.finetune else None}
    if training is not None:
        report["loss_per_epoch"] = training["loss_per_epoch"]
    return StepResult(out, report)


def _totals(rows: list[dict[str, Any]], conv_macs: tuple[int, int] | None) -> dict[str, Any]:
    """Replaced layers' params; MACs of *all* convs in the model (what MobileNet's ratio counts)."""
    before = sum(r["params_before"] for r in rows)
    after = sum(r["params_after"] for r in rows)
    out: dict[str, Any] = {"layers_replaced": len(rows), "params_before": before, "params_after": after,
                           "params_ratio": round(before / after, 4) if after else None}
    if conv_macs is not None:
        out.update(conv_macs_before=conv_macs[0], conv_macs_after=conv_macs[1],
                   conv_macs_ratio=round(conv_macs[0] / conv_macs[1], 4) if conv_macs[1] else None)
    return out


def _conv_macs(model: onnx.ModelProto, macs: dict[str, int]) -> int:
    return sum(macs[n.name] for n in model.graph.node if n.op_type == "Conv" and n.name in macs)
