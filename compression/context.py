"""What a technique gets besides the model and its spec, and what it gives back.

``compression`` never sees service settings: the worker fills this small object instead.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from compression.data import DataSplit

# progress(phase, fraction_of_this_step, message) — may raise Cancelled.
ProgressFn = Callable[[str, float, str], None]


def _no_progress(phase: str, fraction: float, message: str) -> None:
    return None


@dataclass
class StepContext:
    """Args:
    workdir: private scratch folder (deleted by the caller).
    data: train/holdout split of the uploaded dataset, or None.
    original: the uploaded model — the default teacher and the fidelity reference.
    progress: callback between epochs/batches; raises ``Cancelled`` to stop.
    seed: every random choice derives from it.
    device: "cpu" or "cuda".
    threads: intra-op threads for torch and ONNX Runtime (0 = library default).
    load_model: resolves a model id named in a spec (distillation teachers, ``student_model_id``,
        ``rewind_model_id``) to its ONNX; the service only resolves ids of the job's own team
        (checked at submit too). None where no model store is at hand.
    """

    workdir: Path
    data: DataSplit | None
    original: onnx.ModelProto
    progress: ProgressFn = _no_progress
    seed: int = 0
    device: str = "cpu"
    threads: int = 0
    load_model: Callable[[str], onnx.ModelProto] | None = None


@dataclass
class StepResult:
    """A step's output model, its report (per-layer facts, settings used) and extra named models."""

    model: onnx.ModelProto
    report: dict[str, Any] = field(default_factory=dict)
    extra_models: dict[str, onnx.ModelProto] = field(default_factory=dict)
