"""The job spec: an ordered list of steps (each validated by its technique's pydantic model) and eval options."""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from typing import Literal

from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_validator, model_validator

from compression.errors import InvalidSpec
from compression.registry import get_technique, list_techniques
from compression.search_space import BudgetSpec, TargetSpec
from compression.augment import AugmentSpec
from compression.step_spec import StepSpec, StrictModel

__all__ = ["AugmentSpec", "BudgetSpec", "EvalSpec", "FinetuneSpec", "JobSpec", "ParsedSpec", "RecoveryOptions", "StepSpec", "StrictModel", "TargetSpec",
           "parse_spec"]


class RecoveryOptions(StrictModel):
    """The one set of recovery-training options, shared by every step that trains (``finetune`` sections and
    ``distill``): schedule, validation slice, best-epoch keeping, time budget, augmentation."""

    schedule: Literal["auto", "cosine", "constant"] = Field(
        "auto", description="learning rate: linear warm-up then cosine decay to 0, or constant; auto: cosine for runs "
                            "of at least 300 optimizer steps, constant for shorter ones (a decaying rate only slows a "
                            "short recovery)")
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of the optimizer steps spent warming up")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW decoupled weight decay on weight matrices and "
                                "kernels (never biases, norms or scales)")
    validation: float = Field(0.1, ge=0, lt=1, description="fraction of the training split carved off to pick the "
                              "best epoch and stop early (never the held-out split the metrics use); 0: keep the last "
                              "epoch")
    patience: int | Literal["auto"] | None = Field(
        "auto", description="stop after this many epochs without a better validation score; auto: a quarter of the "
                            "epochs, at least 5 (augmented and distilled runs improve slowly); null: run every epoch")
    keep: Literal["best", "last"] = Field("best", description="which epoch's weights the step keeps")
    max_minutes: float = Field(30.0, gt=0, le=10_000, description="time budget of one training run: no epoch starts "
                               "that would end past it")
    @field_validator("patience")
    @classmethod
    def _patience(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and not 1 <= v <= 1000:
            raise ValueError("patience must be between 1 and 1000, 'auto' or null")
        return v

    def patience_for(self, epochs: int) -> int | None:
        """The patience of a run of ``epochs`` epochs (``auto``: ``max(5, ⌈epochs / 4⌉)``)."""
        return max(5, math.ceil(epochs / 4)) if self.patience == "auto" else self.patience

    augment: Literal["auto", "none"] | AugmentSpec = Field(
        "auto", description="auto: on when a teacher distils (images: shifts of 1/14 + mixup 0.2; other floats: noise "
                            "0.05 + mixup 0.2; ids: token dropout 0.05), off when training on labels alone; none; or "
                            "the options")


# Optimizer steps "auto" epochs aim for: small datasets get more passes (cheap: few samples), large ones at least
# two. A distilled student from scratch on 315 images needed ~100 epochs to pass labels alone (30: 0.77 vs 0.85;
# 100: 0.89 vs 0.85), so small datasets may run up to 100.
AUTO_STEPS = 500
AUTO_EPOCHS = (2, 100)


def auto_epochs(train_n: int | None, batch_size: int) -> int:
    """Epochs for ``epochs: auto``: enough for about :data:`AUTO_STEPS` optimizer steps, within
    :data:`AUTO_EPOCHS` (an estimate of 10 when the dataset's size is not known yet).

    Example:
        >>> auto_epochs(4000, 64), auto_epochs(100, 64), auto_epochs(60000, 64)
        (8, 100, 2)
    """
    if not train_n:
        return 10
    per_epoch = max(1, math.ceil(train_n / batch_size))
    return int(min(max(math.ceil(AUTO_STEPS / per_epoch), AUTO_EPOCHS[0]), AUTO_EPOCHS[1]))


class FinetuneSpec(RecoveryOptions):
    """Recovery training after a step: on labels (CE) and/or by distillation from the original."""

    epochs: int | Literal["auto"] = Field("auto", description="the most epochs (early stopping may end sooner); "
                                          f"auto: about {AUTO_STEPS} optimizer steps, {AUTO_EPOCHS[0]}–{AUTO_EPOCHS[1]} "
                                          "epochs by the dataset's size; 0: no training")
    lr: float = Field(1e-3, gt=0, le=10)
    batch_size: int = Field(64, ge=1, le=65536)
    distill: bool = Field(False, description="add KD loss from the original model's outputs")
    temperature: float = Field(4.0, gt=0, le=100)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the label loss when distilling")
    batchnorm: Literal["auto", "off"] = Field(
        "auto", description="re-insert BatchNorm after convs that come without it (exporters fold it into them), "
                            "for training only, folded back on export: the graph keeps its nodes; after a channel-pruning "
                            "cut it re-standardises the kept channels to their statistics before the cut. auto: on, "
                            "except where the step constrains the weights (QAT, clusters, binary/ternary)")

    @field_validator("epochs")
    @classmethod
    def _epochs(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 0 <= v <= 1000:
            raise ValueError("epochs must be between 0 and 1000, or 'auto'")
        return v

    @property
    def enabled(self) -> bool:
        """Whether any training runs (``epochs`` is not 0)."""
        return self.epochs != 0

    def planned_epochs(self, train_n: int | None) -> int:
        """The epoch count for a training split of ``train_n`` samples (:func:`auto_epochs` for ``auto``)."""
        return auto_epochs(train_n, self.batch_size) if self.epochs == "auto" else int(self.epochs)


class EvalSpec(StrictModel):
    holdout: float = Field(0.2, gt=0, lt=1, description="fraction of the dataset held out for metrics")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    latency_runs: int = Field(50, ge=5, le=10000)
    max_eval_samples: int = Field(2000, ge=1, le=1_000_000)
    gate: bool = Field(True, description="fail the job (quality_gate) when a step's model falls past the budget "
                                         "below; false: publish whatever comes out, the verdict still says it")
    max_drop: float = Field(5.0, ge=0, le=100, description="quality gate, in percentage points: with labels the most "
                            "accuracy may fall below the original's; without labels (class scores) the most top-1 "
                            "agreement with the original may fall below 100%")
    min_cosine: float = Field(0.9, ge=-1, le=1, description="quality gate for outputs that are not class scores "
                              "(detector maps, masks, embeddings): the least output cosine to the original's, centred on the "
                              "original's mean output (a detector's anchor grid would keep a plain cosine near 1)")
    max_perplexity_ratio: float = Field(1.10, ge=1, le=1000, description="quality gate for language models (logits "
                                        "[N, T, vocab] on integer ids [N, T]): the most the held-out perplexity may be, "
                                        "as a multiple of the original's (1.10: at most 10% higher); such models are "
                                        "gated on this alone")


class JobSpec(StrictModel):
    steps: list[Any] = Field(min_length=1, max_length=32)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    target: TargetSpec | None = Field(
        None, description="search: what the result must keep (max drop of a metric) and what it minimises")
    search: dict[str, list[Any]] | Literal["auto"] | None = Field(
        None, description="search: lists of values for step fields ('prune.sparsity': [0.5, 0.9], "
                          "'cluster.bits': [4, 5]) or 'auto'; a target alone searches 'auto'")
    budget: BudgetSpec | None = Field(None, description="search: stop after this many minutes or trials")

    @model_validator(mode="after")
    def _search_parts(self) -> "JobSpec":
        if self.budget is not None and self.target is None and self.search is None:
            raise ValueError("budget applies to a search: give target and/or search too")
        return self


class ParsedSpec(BaseModel):
    steps: list[Any]  # each a StepSpec: its technique's spec model
    eval: EvalSpec
    target: TargetSpec | None = None
    search: dict[str, list[Any]] | Literal["auto"] | None = None
    budget: BudgetSpec | None = None
    _candidates: list[Any] | None = PrivateAttr(None)

    def raw_steps(self) -> list[dict[str, Any]]:
        """The steps as the user wrote them (defaults left unset): what a search varies."""
        return [s.model_dump(mode="json", exclude_unset=True) | {"method": s.method} for s in self.steps]

    @property
    def is_search(self) -> bool:
        return self.target is not None or self.search is not None

    @property
    def trains(self) -> bool:
        """Whether any step trains (:attr:`StepSpec.trains`): with routing on, the job goes to the GPU queue."""
        return any(s.trains for s in self.steps)

    def candidates(self) -> list[Any]:
        """A search's candidates (:func:`compression.search_space.expand`), expanded once per parsed spec."""
        if self._candidates is None:
            from compression.search_space import expand

            self._candidates = expand(self.raw_steps(), self.search if self.search is not None else "auto")
        return self._candidates

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": [s.model_dump(mode="json") for s in self.steps],
                               "eval": self.eval.model_dump(mode="json")}
        if self.is_search:
            out["target"] = (self.target or TargetSpec()).model_dump(mode="json")
            out["search"] = self.search if self.search is not None else "auto"
            out["budget"] = (self.budget or BudgetSpec()).model_dump(mode="json")
        return out

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()


def _loc(prefix: list[Any], loc: tuple) -> list[Any]:
    return prefix + list(loc)


def parse_spec(raw: Any) -> ParsedSpec:
    """Validate a spec; raises InvalidSpec whose ``errors`` carry JSON paths like ``["steps", 0, "sparsity"]``.

    Example:
        >>> parse_spec({"steps": [{"method": "prune", "sparsity": 0.5}]}).steps[0].sparsity
        0.5
    """
    if not isinstance(raw, dict):
        raise InvalidSpec("spec must be an object", [{"loc": [], "msg": "spec must be an object"}])
    _reject_nonfinite(raw, [])
    try:
        top = JobSpec.model_validate(raw)
    except ValidationError as e:
        raise InvalidSpec("invalid spec", [{"loc": list(x["loc"]), "msg": x["msg"]} for x in e.errors()]) from None
    errors: list[dict] = []
    steps = []
    for i, step in enumerate(top.steps):
        if not isinstance(step, dict):
            errors.append({"loc": ["steps", i], "msg": "step must be an object"})
            continue
        method = step.get("method")
        try:
            tech = get_technique(str(method))
        except KeyError:
            errors.append({"loc": ["steps", i, "method"],
                           "msg": f"unknown method {method!r}; known: {', '.join(list_techniques())}"})
            continue
        try:
            steps.append(tech.spec_model.model_validate(step))
        except ValidationError as e:
            errors.extend({"loc": _loc(["steps", i], x["loc"]), "msg": x["msg"]} for x in e.errors())
    if errors:
        raise InvalidSpec("invalid spec", errors)
    parsed = ParsedSpec(steps=steps, eval=top.eval, target=top.target, search=top.search, budget=top.budget)
    if parsed.is_search:
        parsed.candidates()  # a bad key or value is refused here, before anything is queued
    return parsed


def _reject_nonfinite(obj: Any, path: list[Any]) -> None:
    """JSON may smuggle NaN/Infinity in; refuse it anywhere in the spec."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise InvalidSpec("invalid spec", [{"loc": path, "msg": "number must be finite"}])
    if isinstance(obj, dict):
        for k, v in obj.items():
            _reject_nonfinite(v, path + [k])
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _reject_nonfinite(v, path + [i])
