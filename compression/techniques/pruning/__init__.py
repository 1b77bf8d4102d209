"""Pruning: the ``prune`` step's spec, and which engine it runs.

- ``granularity: weight`` — unstructured magnitude pruning with exact zeros kept in the ONNX
  (:mod:`.weight`). Dense ONNX Runtime kernels do not skip zeros: it shrinks ``nonzero_params`` and
  ``zip_bytes``, not latency, and the metrics say so. With ``rewind: init | random | sign`` it is the
  lottery-ticket procedure (:mod:`.lottery`), optionally beside a Scratch-B baseline (``baseline: scratch``).
- ``granularity: channel`` — filters, neurons, attention heads and FFN neurons removed physically
  (:mod:`.channel`, through the shared planner :mod:`compression.channels`): a smaller graph, fewer MACs,
  faster.

What to remove first is an importance (:mod:`.importance`); the search's per-layer sensitivity scan and
allocation live in :mod:`.sensitivity`.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import onnx
from pydantic import Field, model_validator

from compression.context import StepContext, StepResult
from compression.errors import InvalidSpec
from compression.registry import register_technique
from compression.search_space import ALLOCATION
from compression.spec import FinetuneSpec
from compression.step_spec import ModelFacts, Passes, StepCheck, StepSpec
from compression.techniques.pruning.channel import prune_channels
from compression.techniques.pruning.lottery import lottery
from compression.techniques.pruning.sensitivity import ALLOCATIONS, allocation_applies, allocation_searchable
from compression.techniques.pruning.weight import (check_layer_names, prunable_initializers, prune_onnx_only,
                                                   prune_with_training)


# what ``search: auto`` tries for the sparsity, per granularity
AUTO_SPARSITY = {"weight": [0.5, 0.7, 0.8, 0.9, 0.95], "channel": [0.25, 0.4, 0.5, 0.6]}
TAYLOR_SAMPLES = 512
# channel pruning keeps channel counts multiples of this unless the spec says otherwise: ONNX Runtime's conv
# kernels are much faster at multiples of 8 (a 50% prune of a small BN CNN to 81 channels ran 0.82× as fast)
ROUND_TO = 8  # preflight's estimate of the samples taylor importance takes gradients on


class PruneSpec(StepSpec):
    model_ref_fields: ClassVar[dict[str, frozenset[str]]] = {"rewind_model_id": frozenset()}
    method: Literal["prune"] = "prune"
    granularity: Literal["weight", "channel"] = Field(
        "weight", description="weight: unstructured magnitude (zeros); channel: filters/neurons/heads removed"
    )
    sparsity: float = Field(0.5, ge=0.0, lt=1.0,
                            description="weight: fraction of weights zeroed; channel: fraction of channels removed")
    head_sparsity: float | None = Field(
        None, ge=0.0, lt=1.0, description="channel, transformers: fraction of attention heads removed (default: sparsity)"
    )
    importance: Literal["l1", "l2", "taylor", "bn_scale", "random"] = "l1"
    scope: Literal["global", "layer"] = "global"
    iterations: int = Field(1, ge=1, le=100, description="prune a little, fine-tune, repeat")
    layers: dict[str, float] | None = Field(
        None, description="per-layer sparsity overrides by layer (weight initializer or node) name"
    )
    max_layer_sparsity: float = Field(0.9, gt=0.0, le=1.0,
                                      description="channel: no layer loses more than this fraction of its channels")
    round_to: int | None = Field(
        None, ge=1, le=256, description="channel: keep channel counts multiples of this (ONNX Runtime's blocked "
                                        "conv kernels run fastest at multiples of 8); default 8, 1 turns it off"
    )
    rewind: Literal["none", "init", "random", "sign"] = Field(
        "none", description="lottery ticket (weight granularity): reset survivors each round to the init model "
                            "(init), a fresh random init (random) or the init's signs with new magnitudes (sign), "
                            "then retrain"
    )
    rewind_model_id: str | None = Field(
        None, description="rewind: init | sign — an uploaded model, same graph, at initialisation")
    sign_magnitude: Literal["constant", "random"] | None = Field(
        None, description="rewind: sign — magnitudes of the rewound weights: constant (per layer, the std of the "
                          "init's weights) or random (a fresh random init's |w|); default constant"
    )
    baseline: Literal["none", "scratch"] = Field(
        "none", description="lottery ticket: also train each round's mask from a fresh random init for the "
                            "Scratch-B budget, (round + 1) × finetune.epochs, and report its accuracy beside the "
                            "ticket's; the result is still the ticket"
    )
    baseline_rounds: list[int] | None = Field(
        None, description="baseline: scratch — the rounds (1 = first) that get the scratch baseline; default all"
    )
    finetune: FinetuneSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> "PruneSpec":
        if self.layers:
            for name, s in self.layers.items():
                if not 0.0 <= s < 1.0:
                    raise ValueError(f"layers.{name}: sparsity must be in [0, 1)")
        if self.importance == "taylor" and self.finetune is None:
            raise ValueError("importance 'taylor' needs gradients: give a finetune section (and a dataset)")
        if self.importance == "bn_scale" and self.granularity != "channel":
            raise ValueError("importance 'bn_scale' ranks channels by BatchNorm scale: needs granularity 'channel'")
        if self.rewind != "none":
            if self.granularity != "weight":
                raise ValueError("rewind (lottery ticket) works on granularity 'weight'")
            if self.finetune is None or not self.finetune.enabled:
                raise ValueError("rewind retrains every round: give finetune with epochs >= 1")
            if self.rewind in ("init", "sign") and not self.rewind_model_id:
                raise ValueError(f"rewind '{self.rewind}' needs rewind_model_id (the uploaded model at initialisation)")
        if self.rewind_model_id and self.rewind not in ("init", "sign"):
            raise ValueError("rewind_model_id is only used with rewind 'init' or 'sign'")
        if self.sign_magnitude is not None and self.rewind != "sign":
            raise ValueError("sign_magnitude applies to rewind 'sign'")
        if self.baseline != "none" and self.rewind == "none":
            raise ValueError("baseline 'scratch' is a control of the lottery ticket: give rewind (init, sign or random)")
        if self.baseline_rounds is not None:
            if self.baseline == "none":
                raise ValueError("baseline_rounds applies to baseline 'scratch'")
            bad = [r for r in self.baseline_rounds if not 1 <= r <= self.iterations]
            if bad or not self.baseline_rounds:
                raise ValueError(f"baseline_rounds: rounds run from 1 to iterations ({self.iterations}); got {bad or []}")
        if (self.head_sparsity is not None or self.round_to is not None) and self.granularity != "channel":
            raise ValueError("head_sparsity and round_to apply to granularity 'channel'")
        return self

    @property
    def channel_round_to(self) -> int:
        """The multiple channel counts are kept at: ``round_to``, or :data:`ROUND_TO` when not given."""
        return self.round_to if self.round_to is not None else ROUND_TO

    @property
    def trains(self) -> bool:
        """A fine-tune with epochs, gradient-based importance (taylor) or lottery-ticket rewinding."""
        return self.recovery is not None or self.importance == "taylor" or self.rewind != "none"

    @property
    def needs_data(self) -> bool:
        return self.finetune is not None or self.importance == "taylor" or self.rewind != "none"

    @property
    def needs_torch(self) -> bool:
        return self.trains or self.granularity == "channel"  # channels are removed through the torch planner

    def preflight(self, facts: ModelFacts) -> StepCheck:
        notes = []
        if self.granularity == "weight":
            notes.append("weight pruning: dense ONNX Runtime kernels do not skip zeros — expect smaller zip_bytes, "
                         "not lower latency")
        return StepCheck.acting_on(facts.prunable, notes)

    @property
    def scratch_rounds(self) -> list[int]:
        """The rounds (1 = first) that train the Scratch-B baseline: none without ``baseline: scratch``."""
        if self.baseline == "none":
            return []
        return sorted(set(self.baseline_rounds)) if self.baseline_rounds else list(range(1, self.iterations + 1))

    def forward_passes(self, train_n: int) -> Passes:
        taylor = Passes(train=2 * min(train_n, TAYLOR_SAMPLES)) if self.importance == "taylor" else Passes()
        # Scratch-B at round r trains (r + 1) rounds' worth of epochs (lottery.scratch_epochs)
        scratch = sum(r + 1 for r in self.scratch_rounds)
        return self.recovery_passes(train_n, rounds=self.iterations + scratch) + taylor

    @classmethod
    def auto_grid(cls, raw_step: dict[str, Any]) -> dict[str, list[Any]]:
        """Sparsities by granularity; for weight pruning also the per-layer allocation, unless the step names
        its own per-layer sparsities or is a lottery ticket (:mod:`.sensitivity`)."""
        grid: dict[str, list[Any]] = {"sparsity": list(AUTO_SPARSITY[raw_step.get("granularity", "weight")])}
        if allocation_applies(raw_step) and allocation_searchable(raw_step):
            grid[ALLOCATION] = list(ALLOCATIONS)
        return grid


@register_technique("prune", PruneSpec, phase="pruning")
def prune(model: onnx.ModelProto, spec: PruneSpec, ctx: StepContext) -> StepResult:
    """Weight (unstructured, optionally lottery-ticket) or channel (structured) pruning.

    Args:
        model: the current model of the pipeline.
        spec: granularity, sparsity, importance, scope, iterations, finetune, rewind.
        ctx: data (needed for fine-tuning), the original model (teacher), ``load_model`` (rewind), progress.

    Returns:
        StepResult. ``weight``: exact zeros in the pruned weights, per-layer sparsity in the report.
        ``channel``: a smaller graph, channels per layer before/after and the layers left alone.

    Raises:
        InvalidSpec: unknown layer names, no dataset where one is needed, a rewind model of another graph.
        NotTrainable: fine-tuning or channel pruning on a graph the converter cannot make trainable.

    Example:
        >>> prune(model, PruneSpec(sparsity=0.5), ctx).report["sparsity"]  # doctest: +SKIP
        0.5
    """
    if spec.granularity == "channel":
        return prune_channels(model, spec, ctx)
    names = prunable_initializers(model)
    if not names:
        raise InvalidSpec("no Conv/Gemm/MatMul weights held as initializers: nothing to prune")
    check_layer_names(spec, names)
    rng = np.random.default_rng(ctx.seed)
    if spec.rewind != "none":
        if ctx.data is None:
            raise InvalidSpec("rewind retrains every round: it needs a dataset", [{"loc": ["rewind"], "msg": "needs a dataset"}])
        return lottery(model, spec, ctx, names)
    if spec.needs_data:
        if ctx.data is None:
            raise InvalidSpec("fine-tuning needs a dataset", [{"loc": ["finetune"], "msg": "needs a dataset"}])
        result = prune_with_training(model, spec, ctx, names, rng)
    else:
        result = prune_onnx_only(model, spec, ctx, names, rng)
    return result
