"""Low-rank factorisation (``method: lowrank``): truncated SVD of Linear/MatMul weights, spatial SVD of convs.

A weight ``W`` (``M × N``) becomes two smaller ones, ``P`` (``M × K``) and ``Q`` (``K × N``), as two nodes in
the ONNX graph, so the saving is real in the file, the parameter count, the MACs and (for big enough
layers) ONNX Runtime's latency. Convolutions use the spatial SVD of Jaderberg et al. (a ``kh×1`` conv to
``K`` channels, then a ``1×kw`` conv): see :mod:`compression.techniques.factorization.svd`. A layer whose factorisation would
not save parameters (``K·(M + N) ≥ M·N``) is left alone and the report says so. The factored graph can be
fine-tuned (on labels and/or by distillation from the original) to win back what the truncation lost.

Ranks: ``rank_ratio`` or ``energy`` when the spec gives one; by default, with a dataset, a per-layer
sensitivity scan on a slice of the training split spends the step's ``max_drop`` (1 pt) over the layers
(:mod:`compression.techniques.factorization.sensitivity`) — a uniform rule cannot tell a layer whose small
singular values matter (LeNet-300-100's 300→100 layer: rank 9 keeps 92%, rank 8 falls to 78%) from one that
barely notices (its 784→300 layer at rank 19). Without a dataset the default is ``energy 0.9``.
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
import onnx
from pydantic import Field, model_validator

from compression.analysis import fixed_batch
from compression.context import StepContext, StepResult
from compression.errors import InvalidSpec
from compression.metrics import holdout_accuracy
from compression.modelio import describe
from compression.registry import register_technique
from compression.spec import FinetuneSpec, StrictModel
from compression.step_spec import StepSpec
from compression.techniques.factorization.layers import (Layer, conv_auto_pad, find_layers, initializers,
                                                          name_nodes, output_layers)
from compression.techniques.factorization.measure import probe_sample, safe_layer_macs
from compression.techniques.factorization.recovery import recover
from compression.techniques.factorization.sensitivity import (DEFAULT_MAX_DROP, VALIDATION_MAX,
                                                               VALIDATION_MAX_FIXED_BATCH, choose, scan_layers,
                                                               validation_slice)
from compression.techniques.factorization.sensitivity import report as scan_report
from compression.techniques.factorization.surgery import lowrank_rewrite, reconstruct
from compression.techniques.factorization.svd import choose_rank, relative_error, singular_values

DEFAULT_ENERGY = 0.9
# The least rank a layer is factored to unless the spec asks for less. Below ~8 a truncated SVD keeps too
# little for fine-tuning to win back (LeNet-300-100 at rank_ratio 0.2 put its 100→10 classifier at rank 2 and
# fell from 89% to 37%), and ONNX Runtime's GEMM kernels work in blocks of 8+ columns, so a thinner middle
# dimension saves parameters but no time.
DEFAULT_MIN_RANK = 8
AUTO_ENERGY = [0.8, 0.9, 0.95]  # what ``search: auto`` tries


class LayerRank(StrictModel):
    """A per-layer override: exactly one of ``rank_ratio``, ``energy``, ``rank``."""

    rank_ratio: float | None = Field(None, gt=0, le=1, description="K = ⌈ratio · min(M, N)⌉")
    energy: float | None = Field(None, gt=0, le=1, description="keep this fraction of Σσ²")
    rank: int | None = Field(None, ge=1, le=1_000_000, description="K itself (clipped to min(M, N))")

    @model_validator(mode="after")
    def _one(self) -> "LayerRank":
        if sum(v is not None for v in (self.rank_ratio, self.energy, self.rank)) != 1:
            raise ValueError("give exactly one of rank_ratio, energy, rank")
        return self

    def criterion(self) -> dict[str, float | int]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class LowRankSpec(StepSpec):
    method: Literal["lowrank"] = "lowrank"
    rank_ratio: float | None = Field(None, gt=0, le=1, description="rank per layer as a fraction of min(M, N)")
    energy: float | None = Field(None, gt=0, le=1,
                                 description=f"rank per layer keeping this fraction of the squared singular values. "
                                             f"When neither this nor rank_ratio is given, ranks come from a "
                                             f"sensitivity scan on a slice of the training data (see max_drop); "
                                             f"without a dataset, energy {DEFAULT_ENERGY}")
    max_drop: float = Field(DEFAULT_MAX_DROP, ge=0, le=100,
                            description="the sensitivity scan's budget, in percentage points on the validation "
                                        "slice (the last 20% of the training split, at most 1,000 samples; never "
                                        "the held-out split): 100 − top-1 agreement (%) with the original for class "
                                        "scores (it bounds the accuracy drop), else 100·(1 − cosine). Spent greedily over the layers, each "
                                        "tried alone at ranks 1/2 … 1/16 of min(M, N), before any fine-tuning. "
                                        "Unused with rank_ratio or energy")
    layers: dict[str, LayerRank] | None = Field(None, description="per-layer overrides by node name: "
                                                 "{name: {rank_ratio | energy | rank: value}} (exactly one each)")
    exclude: list[str] = Field(default_factory=list, max_length=100_000, description="node names left alone")
    convs: bool = Field(True, description="also factor k×k convolutions (spatial SVD)")
    min_rank: int = Field(DEFAULT_MIN_RANK, ge=1, le=1_000_000,
                          description="no layer is factored below this rank (clipped to min(M, N)); a layer whose "
                                      "floor rank saves nothing stays dense. Layers named in `layers` are exempt")
    keep_classifier: bool = Field(True, description="leave dense every layer whose output reaches a graph output "
                                                    "through elementwise/Softmax/reshape ops only (the classifier, a "
                                                    "detector's head); name one in `layers` to factor it anyway")
    finetune: FinetuneSpec | None = Field(None, description="recovery training of the factored graph")

    @model_validator(mode="after")
    def _check(self) -> "LowRankSpec":
        if self.rank_ratio is not None and self.energy is not None:
            raise ValueError("give rank_ratio or energy, not both")
        clash = sorted(set(self.layers or {}) & set(self.exclude))
        if clash:
            raise ValueError(f"layers both overridden and excluded: {clash}")
        return self

    @property
    def scans(self) -> bool:
        """Whether the ranks come from the sensitivity scan (when the step has data): no global criterion given."""
        return self.rank_ratio is None and self.energy is None

    def criterion(self) -> dict[str, float]:
        """The global spectrum criterion (the no-data fallback of the scan: energy 0.9)."""
        if self.rank_ratio is not None:
            return {"rank_ratio": self.rank_ratio}
        return {"energy": self.energy if self.energy is not None else DEFAULT_ENERGY}

    @classmethod
    def auto_grid(cls, raw_step: dict[str, Any]) -> dict[str, list[Any]]:
        return {"energy": list(AUTO_ENERGY)}


def _plan(model: onnx.ModelProto, spec: LowRankSpec, ctx: StepContext,
          ) -> tuple[dict[str, int], list[dict[str, Any]], dict[str, dict], dict[str, Any] | None]:
    """Choose a rank for every layer; returns (ranks, skipped layers with reasons, per-layer facts, the
    sensitivity scan's report or None when the ranks came from a criterion)."""
    layers = find_layers(model)
    known = {la.name for la in layers}
    unknown = sorted((set(spec.layers or {}) | set(spec.exclude)) - known)
    if unknown:
        where = ["layers" if u in (spec.layers or {}) else "exclude" for u in unknown]
        raise InvalidSpec(f"unknown layers {unknown}; Conv/Gemm/MatMul nodes: {sorted(known)}",
                          [{"loc": [w, u], "msg": "unknown layer"} for w, u in zip(where, unknown)])
    inits = initializers(model)
    heads = output_layers(model) if spec.keep_classifier else {}
    skipped: list[dict[str, Any]] = []
    todo: list[tuple[Layer, np.ndarray, LayerRank | None]] = []
    for la in layers:
        reason = la.reason
        node = model.graph.node[la.index]
        override = (spec.layers or {}).get(la.name)
        if reason is None and la.name in spec.exclude:
            reason = "excluded by the spec"
        if reason is None and la.name in heads and override is None:
            reason = (f"feeds the graph output {heads[la.name]!r} (the classifier): kept dense "
                      "(keep_classifier: false, or name it in layers, to factor it)")
        if reason is None and la.op_type == "Conv":
            if not spec.convs:
                reason = "convs: false"
            elif la.shape[2] < 2 or la.shape[3] < 2:
                reason = f"{la.shape[2]}×{la.shape[3]} kernel: spatial SVD needs k×k with k > 1"
            elif conv_auto_pad(node) not in ("NOTSET", "VALID"):
                reason = f"auto_pad {conv_auto_pad(node)}: its padding depends on the input size"
        if reason is not None:
            skipped.append({"layer": la.name, "op_type": la.op_type, "reason": reason})
            continue
        todo.append((la, la.matrix(inits), override))
    scanned, scan = _scan(model, spec, ctx, [(la, w) for la, w, o in todo if o is None])
    ranks: dict[str, int] = {}
    facts: dict[str, dict] = {}
    for la, matrix, override in todo:
        m, n = matrix.shape
        if la.name in scanned:
            k = scanned[la.name]
            if k is None:
                skipped.append({"layer": la.name, "op_type": la.op_type, "reason": _dense_reason(scan, la.name)})
                continue
            criterion: dict[str, Any] = {"sensitivity": {"max_drop": spec.max_drop, "metric": scan["metric"]}}
        else:
            criterion = override.criterion() if override else spec.criterion()
            k = chosen = choose_rank(singular_values(matrix), **criterion)
            floor = min(spec.min_rank, m, n)
            if override is None and k < floor:
                k = floor
            if k * (m + n) >= m * n:
                why = (f"rank {k}" if k == chosen
                       else f"rank {chosen} raised to the floor {k} (min_rank {spec.min_rank})")
                skipped.append({"layer": la.name, "op_type": la.op_type, "rank": k,
                                "reason": f"{why} saves nothing: K·(M+N) = {k * (m + n):,} ≥ M·N = {m * n:,}"})
                continue
            if k != chosen:
                criterion = {**criterion, "raised_to_min_rank": k, "rank_from_criterion": chosen}
        ranks[la.name] = k
        facts[la.name] = {"weight": la.weight, "criterion": criterion, "shape": [int(m), int(n)],
                          "max_rank": int(min(m, n))}
    order = {la.name: i for i, la in enumerate(layers)}
    skipped.sort(key=lambda r: order[r["layer"]])
    return ranks, skipped, facts, scan


def _scan(model: onnx.ModelProto, spec: LowRankSpec, ctx: StepContext, layers: list[tuple[Layer, np.ndarray]],
          ) -> tuple[dict[str, int | None], dict[str, Any] | None]:
    """Ranks of the layers the sensitivity scan decides (name -> rank, None: stays dense) and its report;
    nothing when the spec gives a criterion, there is no dataset, or no layer to scan."""
    if not spec.scans or ctx.data is None or not layers:
        return {}, None
    fixed = fixed_batch(i["shape"] for i in describe(model)["inputs"])
    val, where = validation_slice(ctx.data.train, ctx.seed, VALIDATION_MAX_FIXED_BATCH if fixed else VALIDATION_MAX)
    progress = lambda f, msg: ctx.progress("factorizing", 0.1 * f, msg)
    scan = scan_layers(model, layers, val, max_drop=spec.max_drop, min_rank=spec.min_rank, threads=ctx.threads,
                       progress=progress)
    chosen = choose(scan, spec.max_drop)
    return ({la.name: chosen["ranks"].get(la.name) for la, _ in layers},
            scan_report(scan, chosen, where, spec.max_drop))


def _dense_reason(scan: dict[str, Any], name: str) -> str:
    """Why the scan left a layer dense, with its numbers."""
    row = next(r for r in scan["layers"] if r["layer"] == name)
    if not row["ranks_tried"]:
        return f"sensitivity scan: no candidate rank (≥ min_rank) saves parameters on a {row['shape']} matrix"
    tried = ", ".join(f"rank {k}: {d:+.2f} pt" for k, d in zip(row["ranks_tried"], row["drop_pt"]))
    return (f"sensitivity scan: kept dense within max_drop {scan['max_drop_pt']:g} pt on the validation slice "
            f"({scan['metric']}; {tried})")


@register_technique("lowrank", LowRankSpec, phase="factorizing")
def lowrank(model: onnx.ModelProto, spec: LowRankSpec, ctx: StepContext) -> StepResult:
    """Factor Linear/MatMul weights (truncated SVD) and k×k convs (spatial SVD) into two smaller layers.

    Args:
        model: the current model of the pipeline.
        spec: the rank criterion (``rank_ratio`` or ``energy``; default: the sensitivity scan within
            ``max_drop``, or energy 0.9 without data), per-layer overrides, ``exclude``, ``convs``, the rank
            floor ``min_rank`` (default 8), ``keep_classifier`` (default: layers that feed a graph output stay
            dense), optional ``finetune``.
        ctx: data (the scan's validation slice is the tail of ``data.train``; needed for fine-tuning), the
            original (teacher when ``finetune.distill``), progress, seed.

    Returns:
        StepResult with the rewritten graph. The report lists every factored layer (node, kind, rank,
        params before/after, the relative reconstruction error ``‖W − PQ‖_F/‖W‖_F`` at the SVD and, after
        fine-tuning, of the trained factors against the original weight, MACs before/after), every
        layer left alone with its reason, totals, and ``sensitivity`` (None unless scanned): per layer the
        ranks tried, the drop at each, the rank chosen and the budget it spent; the joint drop.

    Raises:
        InvalidSpec: unknown layer names; fine-tuning without a dataset.
        NotTrainable: fine-tuning a graph the converter cannot make trainable.

    Example:
        >>> lowrank(model, LowRankSpec(rank_ratio=0.25), ctx).report["totals"]["params_ratio"]  # doctest: +SKIP
        3.1
    """
    model = name_nodes(model)
    ranks, skipped, facts, scan = _plan(model, spec, ctx)
    ctx.progress("factorizing", 0.1, f"factoring {len(ranks)} layer(s)")
    notes: list[str] = []
    criterion: dict[str, Any] = spec.criterion()
    if scan is not None:
        criterion = {"sensitivity": {"max_drop": spec.max_drop, "metric": scan["metric"]}}
    elif spec.scans:
        notes.append(f"no dataset: ranks from energy {DEFAULT_ENERGY} (the default sensitivity scan measures on "
                     "a slice of the training data)" if ctx.data is None else
                     "no layer for the sensitivity scan (each factorable one is named in layers, or none is)")
    if not ranks:
        notes.append("no layer could be factored with a saving: model unchanged")
        return StepResult(model, {"criterion": criterion, "layers": [], "skipped": skipped,
                                  "totals": _totals([]), "notes": notes, "sensitivity": scan})
    factored, rewrites = lowrank_rewrite(model, ranks)
    sample = probe_sample(model, ctx)
    macs_before, macs_after = safe_layer_macs(model, sample), safe_layer_macs(factored, sample)
    acc = {"before": holdout_accuracy(model, ctx), "factored": holdout_accuracy(factored, ctx)}
    out, training = factored, None
    if spec.finetune is not None and spec.finetune.enabled:
        out, training = recover(factored, spec.finetune, ctx, "finetuning")
        notes.extend(training.pop("notes"))
        acc["finetuned"] = holdout_accuracy(out, ctx)
    originals = initializers(model)
    rows = []
    for rw in rewrites:
        weight = originals[facts[rw.name]["weight"]]
        row = {"layer": rw.name, "kind": rw.kind, **facts[rw.name], "rank": rw.rank,
               "params_before": rw.params_before, "params_after": rw.params_after,
               "relative_error": round(rw.relative_error, 6)}
        if training is not None:
            row["relative_error_after_finetune"] = round(relative_error(weight, reconstruct(out, rw)), 6)
        if macs_before is not None and macs_after is not None:
            row["macs_before"] = macs_before.get(rw.name)
            row["macs_after"] = macs_after.get(rw.first, 0) + macs_after.get(rw.second, 0)
        rows.append(row)
    ctx.progress("factorizing", 1.0, "done")
    report = {"criterion": criterion, "sensitivity": scan, "convs": spec.convs, "layers": rows, "skipped": skipped,
              "totals": _totals(rows), "holdout_accuracy": acc, "notes": notes,
              "finetune": spec.finetune.model_dump() if spec.finetune else None}
    if training is not None:
        report["loss_per_epoch"] = training["loss_per_epoch"]
    return StepResult(out, report)


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    before = sum(r["params_before"] for r in rows)
    after = sum(r["params_after"] for r in rows)
    return {"layers_factored": len(rows), "params_before": before, "params_after": after,
            "params_ratio": round(before / after, 4) if after else None}
