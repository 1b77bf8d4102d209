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

    def example_inputs(self, model: onnx.ModelProto, n: int = 2) -> tuple:
        """``n`` real training samples (synthetic ones without data), as torch tensors in graph input order.

        Two by default: the dynamo exporter specialises size-1 batches, and DepGraph traces with these. A graph
        that fixes its batch (a detector exported at batch 1) gets that many.
        """
        import numpy as np
        import torch

        from compression.analysis import fixed_batch
        from compression.data import synthetic_inputs
        from compression.modelio import describe

        specs = describe(model)["inputs"]
        n = fixed_batch(s["shape"] for s in specs) or n
        if self.data is not None and self.data.train.samples >= n:
            arrays = self.data.train.take(np.arange(n)).inputs
        else:
            arrays = synthetic_inputs(specs, n, seed=self.seed)
        return tuple(torch.from_numpy(np.ascontiguousarray(arrays[s["name"]])) for s in specs)


@dataclass
class StepResult:
    """A step's output model, its report (per-layer facts, settings used) and extra named models."""

    model: onnx.ModelProto
    report: dict[str, Any] = field(default_factory=dict)
    extra_models: dict[str, onnx.ModelProto] = field(default_factory=dict)
