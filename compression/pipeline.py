"""Run a spec: measure the original, apply each step in order, measure every step, write the outputs.

Every model that comes out of a step is written to disk, re-loaded in ONNX Runtime and measured.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from compression import modelio
from compression.context import StepContext
from compression.data import DataSplit, synthetic_inputs
from compression.gate import check_gate, verdict
from compression.metrics import EvalData, measure, ratios, run_batched, session
from compression.numpy_json import json_default
from compression.registry import get_technique
from compression.spec import ParsedSpec

_VERSIONS = ("torch", "onnx", "onnxruntime", "onnxscript", "torch-pruning", "numpy", "netcompress")


@dataclass
class OutputFile:
    name: str
    path: Path
    kind: str  # model | step_model | report


@dataclass
class PipelineResult:
    metrics: dict[str, Any]
    report: dict[str, Any]
    files: list[OutputFile] = field(default_factory=list)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in _VERSIONS:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def eval_data(original: onnx.ModelProto, data: DataSplit | None, *, threads: int, seed: int,
              path: Path | None = None) -> EvalData:
    """Held-out inputs (or synthetic ones when there is no dataset) and the original's outputs on them
    (run from ``path``, the original as written, when given: a model over 2 GiB cannot be serialized)."""
    if data is not None:
        inputs, labels = data.holdout.inputs, data.holdout.labels
    else:
        inputs, labels = synthetic_inputs(modelio.describe(original)["inputs"], 64, seed=seed), None
    reference = run_batched(session(path if path is not None else original, threads), inputs)
    return EvalData(inputs=inputs, labels=labels, reference=reference)


def run_pipeline(
    original: onnx.ModelProto,
    spec: ParsedSpec,
    data: DataSplit | None,
    workdir: Path,
    *,
    progress: Callable[[dict[str, Any]], None] = lambda p: None,
    input_sha256: dict[str, str] | None = None,
    device: str = "cpu",
    threads: int = 0,
    load_model: Callable[[str], onnx.ModelProto] | None = None,
    checkpoint: Any = None,
    external_above: int = modelio.PROTOBUF_LIMIT,
) -> PipelineResult:
    """Apply ``spec`` to ``original`` and measure everything.

    Args:
        original: the uploaded model.
        spec: validated spec.
        data: train/holdout split, or None (synthetic inputs are used for latency/fidelity).
        workdir: private scratch folder; output files are written here.
        progress: receives ``{phase, step, steps, fraction, message}``; may raise ``Cancelled``.
        input_sha256: sha256 of the uploaded model/dataset, for the reproducibility manifest.
        load_model: resolves model ids named in steps (teachers, students, rewind inits); None: none can be.
        checkpoint: a search's durable store of finished candidates (:class:`compression.search.Checkpoint`),
            so a retried job resumes; None: a search starts over.
        external_above: every model written (the original measured, each step's, the result) keeps its
            weights in a ``.data`` file beside its ``.onnx`` above this many bytes (:func:`modelio.save`);
            models are measured from their files, so nothing is serialized whole.

    Returns:
        PipelineResult with ``metrics = {original, steps[], result}`` (each step and the result with its
        ``verdict``), the report, and files to publish.

    Raises:
        QualityGateFailed: a step's model (a search's chosen one) fell past the ``eval`` budget
            (:mod:`compression.gate`); ``eval.gate: false`` publishes it anyway.
    """
    n = len(spec.steps)
    seed = spec.eval.seed

    quiet = [False]  # a search stopped by a cancel publishes what it has: no more progress (it would re-raise)

    def report_progress(phase: str, step: int, fraction: float, message: str) -> None:
        if quiet[0]:
            return
        overall = (step + max(0.0, min(1.0, fraction))) / (n + 1)
        progress({"phase": phase, "step": step, "steps": n, "fraction": round(overall, 4), "message": message})

    report_progress("evaluating", 0, 0.0, "measuring the original")

    def save(model: onnx.ModelProto, path: Path) -> list[Path]:
        return modelio.save(model, path, external_above=external_above)

    files: list[OutputFile] = []
    orig_files = save(original, workdir / "original.onnx")
    ev = eval_data(original, data, threads=threads, seed=seed, path=orig_files[0])
    m_orig = measure(original, orig_files, ev, latency_runs=spec.eval.latency_runs, threads=threads)
    metrics: dict[str, Any] = {"original": m_orig, "steps": []}
    current = original
    reports = []
    files_extra: list[OutputFile] = []
    if spec.is_search:
        current, reports = _search(original, spec, data, workdir, ev, m_orig, metrics, files_extra,
                                   report_progress=report_progress, device=device, threads=threads,
                                   load_model=load_model, checkpoint=checkpoint)
        quiet[0] = metrics["search"]["stopped_by"] not in ("grid exhausted", "trials budget", "time budget")
        # The search keeps its own target among candidates; the gate judges only the chosen one, and a target
        # that allows more drop than eval.max_drop was asked for explicitly: it wins (compression.gate.budget).
        target = metrics["search"]["target"]
        best = metrics["steps"][-1]
        best["verdict"] = verdict(best, m_orig, spec.eval, target=target)
        check_gate(n - 1, best["method"], best, m_orig, spec.eval, target=target)
    for i, step in enumerate([] if spec.is_search else spec.steps):
        tech = get_technique(step.method)

        def step_progress(phase: str, fraction: float, message: str, i: int = i) -> None:
            report_progress(phase, i, fraction * 0.9, f"step {i + 1}/{n} ({step.method}): {message}")

        step_progress(tech.phase, 0.0, "starting")
        ctx = StepContext(workdir=workdir, data=data, original=original, progress=step_progress,
                          seed=seed + i, device=device, threads=threads, load_model=load_model)
        result = tech.apply(current, step, ctx)
        current = result.model
        step_progress("benchmarking", 1.0, "measuring")
        name = f"step{i + 1}-{step.method}.onnx"
        step_files = save(current, workdir / name)
        m = measure(current, step_files, ev, latency_runs=spec.eval.latency_runs, threads=threads)
        m["ratios"] = ratios(m, m_orig)
        m["verdict"] = verdict(m, m_orig, spec.eval)
        metrics["steps"].append({"method": step.method, **m})
        check_gate(i, step.method, m, m_orig, spec.eval)  # before anything is published or built on it
        reports.append({"method": step.method, "spec": step.model_dump(mode="json"), "report": result.report})
        files.extend(OutputFile(f.name, f, "step_model") for f in step_files)
        for extra_name, extra_model in result.extra_models.items():
            for f in save(extra_model, workdir / extra_name):
                files.append(OutputFile(f.name, f, "model"))
    files.extend(files_extra)
    report_progress("exporting", n, 0.5, "writing artifacts")
    final_files = save(current, workdir / "model.onnx")
    result_metrics = dict(metrics["steps"][-1])
    result_metrics.pop("method", None)
    metrics["result"] = result_metrics
    # The final model is the last step's model byte for byte; publish it once as model.onnx.
    last = [f for f in files if f.name.startswith(f"step{n}-")]
    files = [f for f in files if f not in last]
    files.extend(OutputFile(f.name, f, "model") for f in final_files)
    from compression.xz_artifact import MAX_COMPRESS_BYTES, write_compressed

    if len(final_files) == 1 and final_files[0].stat().st_size <= MAX_COMPRESS_BYTES:
        xz = write_compressed(final_files[0])  # the entropy-coded download: metrics' compressed_bytes
        files.append(OutputFile(xz.name, xz, "compressed_model"))
    report = {
        "metrics": metrics,
        "steps": reports,
        "manifest": {
            "versions": _versions(),
            "seed": seed,
            "spec": spec.to_json(),
            "spec_sha256": spec.sha256(),
            "inputs_sha256": input_sha256 or {},
            "eval": {"samples": int(len(next(iter(ev.inputs.values())))),
                     "source": "holdout split" if data is not None else "synthetic inputs (no dataset)",
                     **(data.meta if data is not None else {})},
            "result_sha256": _sha256_files(final_files),
        },
    }
    report_path = workdir / "report.json"
    report_path.write_text(json.dumps(report, indent=2, default=json_default))
    files.append(OutputFile("report.json", report_path, "report"))
    report_progress("exporting", n, 1.0, "done")
    return PipelineResult(metrics=json.loads(json.dumps(metrics, default=json_default)), report=report, files=files)


def _sha256_files(paths: list[Path]) -> str:
    """sha256 of the files' bytes one after another, read in chunks (a model with external data is GiBs)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _search(original: onnx.ModelProto, spec: ParsedSpec, data: DataSplit | None, workdir: Path, ev: EvalData,
            m_orig: dict[str, Any], metrics: dict[str, Any], files: list[OutputFile], *,
            report_progress: Callable[..., None], device: str, threads: int,
            load_model: Callable[[str], onnx.ModelProto] | None, checkpoint: Any) -> tuple[onnx.ModelProto, list]:
    """Run a search (spec ``target``/``search``/``budget``): the best candidate becomes the job's model,
    every front member and the front's plot become artifacts, the summary goes into the metrics."""
    from compression.search import run_search, write_plot

    n = len(spec.steps)

    def progress(phase: str, fraction: float, message: str) -> None:  # the search spans the steps' share
        overall = max(0.0, min(1.0, fraction)) * n * 0.999
        report_progress(phase, int(overall), overall - int(overall), message)

    outcome = run_search(original, spec, data, workdir, ev=ev, m_orig=m_orig, progress=progress,
                         device=device, threads=threads, load_model=load_model, checkpoint=checkpoint)
    best = outcome.best
    assert best is not None and outcome.best_model is not None
    label = ", ".join(f"{k}={v}" for k, v in best["values"].items()) or "as written"
    step_metrics = dict(best["metrics"])
    metrics["steps"].append({"method": f"search best ({label})", **step_metrics})
    metrics["search"] = outcome.summary
    for name, model in outcome.front_models.items():
        for f in modelio.save(model, workdir / name):
            files.append(OutputFile(f.name, f, "search_front"))
    files.append(OutputFile("pareto.svg", write_plot(outcome.summary, workdir / "pareto.svg"), "plot"))
    # the final model must be written as the last "step": the loop below is skipped, so save it here
    for f in modelio.save(outcome.best_model, workdir / f"step{n}-search.onnx"):
        files.append(OutputFile(f.name, f, "step_model"))
    return outcome.best_model, outcome.reports
