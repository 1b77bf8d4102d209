"""The job spec: an ordered list of steps (each validated by its technique's pydantic model) and eval options."""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from typing import Literal

from pydantic import BaseModel, Field, PrivateAttr, ValidationError, model_validator

from compression.errors import InvalidSpec
from compression.registry import get_technique, list_techniques
from compression.search_space import BudgetSpec, TargetSpec
from compression.step_spec import StepSpec, StrictModel

__all__ = ["BudgetSpec", "EvalSpec", "FinetuneSpec", "JobSpec", "ParsedSpec", "StepSpec", "StrictModel", "TargetSpec",
           "parse_spec"]


class FinetuneSpec(StrictModel):
    """Recovery training after a step: on labels (CE) and/or by distillation from the original."""

    epochs: int = Field(2, ge=0, le=1000)
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
