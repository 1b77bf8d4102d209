"""The bases of spec models: ``StrictModel`` (every section of a spec) and ``StepSpec`` (every step).

A step's spec says what running it takes, so the service, preflight and the search read the answer from
the technique instead of from a table of method names:

- ``trains`` — it runs gradient steps (what a GPU speeds up: the job is routed by it);
- ``needs_data`` — it needs the job's dataset (training, calibration, measuring on the held-out split);
- ``needs_torch`` — the ONNX graph must be converted to a trainable torch module (ops the converter lacks
  block it);
- ``handles_large`` — it runs on a model over protobuf's 2 GiB (weights in external data): submit refuses
  the others on such a model;
- ``preflight(facts)`` — what the step can act on in a model, from what preflight's probe measured;
- ``forward_passes(train_n)`` — a rough count of the sample forward passes it runs (preflight's cost);
- ``auto_grid(raw_step)`` — the values ``search: auto`` tries for the step's fields.

The defaults below fit a step whose only training is an optional recovery ``finetune`` section; a family
that differs overrides them on its spec model. Kept apart from :mod:`compression.spec` (which imports the
search space, whose models share ``StrictModel``) and free of our other modules, so every layer can import it.

Example:
    >>> from compression.spec import parse_spec
    >>> step = parse_spec({"steps": [{"method": "prune", "finetune": {"epochs": 1}}]}).steps[0]
    >>> step.trains, step.needs_data, step.needs_torch
    (True, True, True)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for spec models: unknown keys and NaN/inf numbers are refused.

    A step whose fields name uploaded models (teachers, a student, a rewind init) lists them in
    ``model_ref_fields``, each with the values that are not ids (``"original"``): the service checks every
    id in them, in the steps and in searched values alike, belongs to the caller's team.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model_ref_fields: ClassVar[dict[str, frozenset[str]]] = {}

    @classmethod
    def model_ids_in(cls, field: str, value: Any, loc: list[Any]) -> list[tuple[list[Any], str]]:
        """The model ids in a value of ``field`` (an id, or lists of them), each with its path from ``loc``.

        Example:
            >>> DistillSpec.model_ids_in("teachers", ["original", "m1"], ["teachers"])  # doctest: +SKIP
            [(['teachers', 1], 'm1')]
        """
        if field not in cls.model_ref_fields:
            return []
        if isinstance(value, str):
            return [] if value in cls.model_ref_fields[field] else [(loc, value)]
        if isinstance(value, list):
            return [ref for i, v in enumerate(value) for ref in cls.model_ids_in(field, v, [*loc, i])]
        return []  # None, or a value the field's validation refuses anyway

    @property
    def model_refs(self) -> list[tuple[list[Any], str]]:
        """Model ids this step reads, with their spec path (checked for ownership at submit)."""
        return [ref for name in self.model_ref_fields for ref in self.model_ids_in(name, getattr(self, name), [name])]


@dataclass(frozen=True)
class ModelFacts:
    """What preflight's sandboxed probe measured on the uploaded model.

    ``prunable``: Conv/Gemm/MatMul/ConvTranspose nodes whose weight is an initializer; ``quantizable``: nodes
    of the op types quantization acts on; ``macs``: per sample at batch 1 (None: not measured);
    ``weight_only``: the weights blockwise weight-only quantization can take (``[[op, K, N, is_lm_head], ...]``
    under ``"weights"``; see ``quantization.weight_only.weight_summary``), None when not probed.
    """

    op_types: dict[str, int]
    unsupported_ops: list[str]
    prunable: int
    quantizable: int
    macs: int | None = None
    outputs: list[list] | None = None  # the graph outputs' shapes (a dim: size, symbolic name or None)
    weight_only: dict | None = None


@dataclass
class StepCheck:
    """A step against a model's facts: the layers it can act on, whether it applies, notes for the user."""

    targets: int
    notes: list[str] = field(default_factory=list)
    applies: bool = True

    @classmethod
    def acting_on(cls, targets: int, notes: list[str] | None = None) -> "StepCheck":
        """The check of a step that needs layers to act on: without any it does not apply, and says so."""
        missing = [] if targets else ["no layers with weights held as initializers for this step to act on"]
        return cls(targets=targets, notes=missing + (notes or []), applies=targets > 0)


@dataclass(frozen=True)
class Passes:
    """Rough sample forward passes of a step: ``train`` counts 3 per sample-epoch (forward, backward, update)."""

    train: int = 0
    infer: int = 0

    def __add__(self, other: "Passes") -> "Passes":
        return Passes(self.train + other.train, self.infer + other.infer)


class StepSpec(StrictModel):
    """Base of every registered technique's spec model (the registry refuses any other): see the module doc.

    Subclasses declare ``method: Literal[...]`` and override what differs for their family.
    """

    @property
    def recovery(self) -> Any:
        """The step's recovery fine-tune (its ``finetune`` section) when it has epochs to run, else None."""
        ft = getattr(self, "finetune", None)
        return ft if ft is not None and ft.enabled else None

    @property
    def trains(self) -> bool:
        """Whether the step runs gradient steps (the work a GPU speeds up; routes the job when routing is on)."""
        return self.recovery is not None

    @property
    def needs_data(self) -> bool:
        """Whether the step needs the job's dataset (submit refuses it without one)."""
        return self.trains

    @property
    def needs_torch(self) -> bool:
        """Whether the graph must be converted to a trainable torch module (blocked by ops the converter lacks)."""
        return self.trains

    @property
    def handles_large(self) -> bool:
        """Whether the step runs on a model whose weights exceed protobuf's 2 GiB (stored with external data).

        The pipeline hands every step the model with its weights loaded (protobuf holds more than 2 GiB in
        memory; only serializing fails) and writes and measures models from files. By default a step that
        neither trains nor converts to torch: it acts on the graph's tensors. One that does holds the weights
        again in torch (with gradients and optimizer state when it trains); an engine that serializes the
        whole model (a session from bytes, ``onnx.shape_inference.infer_shapes`` on the proto) must say False
        for the settings that do.
        """
        return not (self.trains or self.needs_torch)

    def preflight(self, facts: ModelFacts) -> StepCheck:
        """The step against the model preflight probed: by default it acts on the weighted layers."""
        return StepCheck(targets=facts.prunable)

    def forward_passes(self, train_n: int) -> Passes:
        """Rough sample forward passes over a training split of ``train_n`` samples: the recovery fine-tune's."""
        return self.recovery_passes(train_n)

    def recovery_passes(self, train_n: int, rounds: int = 1) -> Passes:
        """The recovery fine-tune's passes, ``rounds`` times (the teacher's forward too when it distils)."""
        ft = self.recovery
        if ft is None:
            return Passes()
        n = ft.planned_epochs(train_n) * train_n * rounds
        return Passes(train=3 * n, infer=n if ft.distill else 0)

    @classmethod
    def auto_grid(cls, raw_step: dict[str, Any]) -> dict[str, list[Any]]:
        """What ``search: auto`` tries for this step, field -> values; ``raw_step`` is the step as written
        (defaults unset). By default nothing: the step is kept as written."""
        return {}
