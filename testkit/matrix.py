"""The technique × model matrix: every technique with the spec a user would write × every zoo model.

One cell is one job, run the way the worker runs it (:func:`compression.pipeline.run_pipeline`: the
original and the result measured, the quality gate applied), after preflight's analysis of the same
model and spec. Its outcome is one of:

- ``succeeded`` — the artifact re-loaded in ONNX Runtime, fidelity inside the gate's budget;
- ``refused``   — preflight said the step does not apply (with its notes), or the job stopped with a
  precise, deterministic reason (``not_applicable``, ``needs_labels``, ``unsupported_op`` …);
- ``quality_gate`` — the step ran but its model fell outside the accuracy budget: not published;
- ``crashed``   — anything else (a library's exception escaping): always a bug.

The unit matrix (``tests/unit/test_matrix.py``) and ``bench/matrix.py`` (which fills BENCHMARKS.md)
run the same cells through :func:`run_cell`.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from testkit import real_zoo

# The spec a user would write for each technique: its defaults, plus what the issue tracker calls the
# default job where a bare default is not one (a channel prune with one recovery epoch).
TECHNIQUES: dict[str, dict[str, Any]] = {
    "int8": {"method": "quantize"},
    "int8_dynamic": {"method": "quantize", "mode": "dynamic"},
    "fp16": {"method": "quantize", "scheme": "fp16"},
    "cluster": {"method": "quantize", "scheme": "cluster"},
    "prune_weight": {"method": "prune"},
    "prune_channel": {"method": "prune", "granularity": "channel", "sparsity": 0.25, "finetune": {"epochs": 1}},
    "lowrank": {"method": "lowrank"},
    "depthwise": {"method": "depthwise_separable"},
    "early_exit": {"method": "early_exit"},
    "slimmable": {"method": "slimmable"},
}
OUTCOMES = ("succeeded", "refused", "quality_gate", "crashed")


@dataclass
class Cell:
    """One cell's outcome and, when it ran, its measured ratios against the original."""

    model: str
    form: str
    technique: str
    status: str = "crashed"
    reason: str = ""
    preflight_applies: bool | None = None
    preflight_notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    size_x: float | None = None
    latency_b1_x: float | None = None
    latency_b8_x: float | None = None  # measured only when asked (``batch8=True``: the benchmark)
    throughput_x: float | None = None
    fidelity: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return asdict(self)


def zoo_split(built: real_zoo.Built, holdout: float = 0.25) -> Any:
    """The built model's data split as the service splits an uploaded dataset."""
    from compression.data import Arrays, split

    return split(Arrays(dict(built.inputs), built.labels), holdout=holdout, seed=0, max_eval=2000)


def preflight_of(model: onnx.ModelProto, spec: Any, samples: int | None) -> dict[str, Any]:
    """Preflight's report for ``spec`` on ``model``: the probe's structure and MACs, then the analysis."""
    from compression.preflight import analyse, model_facts

    facts = model_facts(model)
    from compression.analysis import param_counts

    return analyse(spec, facts, model_params=param_counts(model)[0], dataset_samples=samples)


def batch_latency_ms(path: Path, inputs: dict[str, np.ndarray], batch: int, runs: int = 30) -> float | None:
    """Median ONNX Runtime latency (2 threads) at ``batch``; None where the model fixes another batch."""
    from compression.metrics import session

    sess = session(path, 2)
    feeds = {k: v[:batch] for k, v in inputs.items()}
    try:
        for _ in range(3):
            sess.run(None, feeds)
    except Exception:
        return None
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        samples.append((time.perf_counter() - t) * 1000)
    return float(np.median(samples))


def run_cell(name: str, form: str, technique: str, folder: Path, *, latency_runs: int = 5,
             threads: int = 2, batch8: bool = False) -> Cell:
    """Build zoo model ``name`` in ``form``, ask preflight, run the one-step job, classify the outcome."""
    from compression.errors import CompressionError
    from compression.pipeline import run_pipeline
    from compression.spec import parse_spec

    cell = Cell(name, form, technique)
    built = real_zoo.build(name, form, folder)
    model = onnx.load(str(built.path))
    data = zoo_split(built)
    spec = parse_spec({"steps": [TECHNIQUES[technique]], "eval": {"latency_runs": latency_runs, "holdout": 0.25}})
    report = preflight_of(model, spec, data.train.samples + data.holdout.samples)
    step = report["steps"][0]
    cell.preflight_applies, cell.preflight_notes = bool(step["applies"]), list(step["notes"])
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cell-") as work:
        try:
            result = run_pipeline(model, spec, data, Path(work), threads=threads)
        except CompressionError as e:
            cell.status = "quality_gate" if e.code == "quality_gate" else "refused"
            cell.reason = f"{e.code}: {e}"
        except Exception as e:  # a bug: the cell says so and the matrix test fails on it
            cell.reason = f"{type(e).__name__}: {e}"
        else:
            cell.status = "succeeded"
            _check_artifact(Path(work) / "model.onnx", data)
            if batch8:
                before = batch_latency_ms(built.path, data.holdout.inputs, 8)
                after = batch_latency_ms(Path(work) / "model.onnx", data.holdout.inputs, 8)
                cell.latency_b8_x = round(before / after, 3) if before and after else None
            m, orig = result.metrics["result"], result.metrics["original"]
            ratios = m.get("ratios", {})
            cell.size_x = ratios.get("file_bytes")
            cell.latency_b1_x = ratios.get("latency_p50_speedup")
            cell.throughput_x = ratios.get("throughput")
            cell.fidelity = {k: m.get(k) for k in ("accuracy", "agreement", "output_cosine", "centered_cosine")
                             if m.get(k) is not None}
            if orig.get("accuracy") is not None:
                cell.fidelity["original_accuracy"] = orig["accuracy"]
    cell.seconds = round(time.perf_counter() - t, 2)
    return cell


def _check_artifact(path: Path, data: Any) -> None:
    """The published model loads in ONNX Runtime and runs on held-out inputs without NaN."""
    from compression.metrics import run_batched, session

    outputs = run_batched(session(path), {k: v[:8] for k, v in data.holdout.inputs.items()})
    if not all(np.isfinite(o).all() for o in outputs if o.dtype.kind == "f"):
        raise AssertionError(f"{path.name}: non-finite outputs")
