"""Compression to a target: try recipes from a grid under a budget, keep every candidate's metrics, the
Pareto front and the best candidate that meets the target — anytime and resumable.

Why this exists: Intel Neural Compressor's tuning gives up with nothing saved when no candidate meets the
accuracy goal. Here every finished candidate is kept, a cancel or a time-out ends with the best so far
(``partial``), and a crashed worker's successor picks up after the last finished candidate (each one is
checkpointed as it finishes, through :class:`Checkpoint`).

Each candidate runs its steps exactly as a plain job would and is measured by the same
:func:`compression.metrics.measure` on the same held-out split, so candidates compare fairly with each
other and with hand-written specs.

Example:
    >>> result = run_search(original, parse_spec({"steps": [{"method": "prune"}], "target": {}}), data, wd)  # doctest: +SKIP
    >>> result.metrics["search"]["best"]["values"]                                                        # doctest: +SKIP
    {'steps[0].sparsity': 0.8, 'steps[0].allocation': 'sensitivity'}
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import onnx

from compression import modelio
from compression.context import StepContext
from compression.data import DataSplit
from compression.errors import Cancelled, CompressionError, InvalidSpec
from compression.metrics import EvalData, measure, ratios
from compression.numpy_json import json_default
from compression.plots import pareto_svg
from compression.registry import get_technique
from compression.search_space import BudgetSpec, Candidate, TargetSpec, expand
from compression.spec import ParsedSpec
from compression.techniques.pruning.sensitivity import allocate_step, layer_sensitivity


class Checkpoint(Protocol):
    """Durable key → bytes storage that outlives a worker (the service backs it with the artifact store)."""

    def get(self, name: str) -> bytes | None: ...
    def put(self, name: str, data: bytes) -> None: ...


class _BudgetSpent(Cancelled):
    code = "budget_spent"


@dataclass
class SearchOutcome:
    """What the search leaves for the pipeline to publish."""

    best: dict[str, Any] | None
    best_model: onnx.ModelProto | None
    front_models: dict[str, onnx.ModelProto]
    summary: dict[str, Any]
    reports: list[dict[str, Any]]


def _objective(m: dict[str, Any], optimize: str) -> float:
    if optimize == "latency":
        return float(m["latency_ms"]["p50"])
    value = m.get(optimize)
    return float(value) if value is not None else float("inf")


_NOT_MEASURABLE = {"accuracy": " (the dataset has no labels: use agreement or output_cosine)",
                   "perplexity": " (it needs a language model: a first output [N, T, vocab] on integer ids [N, T])"}


def metric_drop(m: dict[str, Any], original: dict[str, Any], metric: str) -> float:
    """How far the candidate's metric fell below the original's (negative: it rose); for ``perplexity``, which
    is better lower, its relative rise ``model / original − 1`` (see :class:`TargetSpec`)."""
    if m.get(metric) is None or original.get(metric) is None:
        raise InvalidSpec(f"target metric {metric!r} is not measurable here" + _NOT_MEASURABLE.get(metric, ""),
                          [{"loc": ["target", "metric"], "msg": "not measurable for this model/dataset"}])
    if metric == "perplexity":
        return round(float(m[metric]) / float(original[metric]) - 1.0, 6)
    return round(float(original[metric]) - float(m[metric]), 6)


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Ids of the points no other point beats on both (drop, objective), both minimised; sorted by drop."""
    front = []
    for pid, d, o in points:
        dominated = any((d2 <= d and o2 <= o) and (d2 < d or o2 < o) for _, d2, o2 in points)
        if not dominated:
            front.append((d, o, pid))
    return [pid for _, _, pid in sorted(front)]


# ------------------------------------------------------------------------------------------ the search
class _Search:
    def __init__(self, original: onnx.ModelProto, spec: ParsedSpec, data: DataSplit | None, workdir: Path, *,
                 ev: EvalData, m_orig: dict[str, Any], progress: Callable[[str, float, str], None],
                 device: str, threads: int, load_model: Callable[[str], onnx.ModelProto] | None,
                 checkpoint: Checkpoint | None) -> None:
        self.original, self.spec, self.data, self.workdir = original, spec, data, workdir
        self.ev, self.m_orig, self.progress = ev, m_orig, progress
        self.device, self.threads, self.load_model, self.checkpoint = device, threads, load_model, checkpoint
        self.target: TargetSpec = spec.target or TargetSpec()
        self.budget: BudgetSpec = spec.budget or BudgetSpec()
        self.started = time.monotonic()
        self.finished = 0  # candidates done (resumed ones too): the time budget never leaves the job empty-handed
        self._sens: dict[str, dict[str, Any]] | None = None

    # ------------------------------------------------------------------ checkpoint
    def _get(self, name: str) -> bytes | None:
        return self.checkpoint.get(name) if self.checkpoint is not None else None

    def _put(self, name: str, blob: bytes) -> None:
        if self.checkpoint is not None:
            self.checkpoint.put(name, blob)

    def sensitivity(self) -> dict[str, dict[str, Any]]:
        if self._sens is None:
            cached = self._get("sensitivity.json")
            if cached is not None:
                self._sens = json.loads(cached)
            else:
                self.progress("searching", self._fraction(0), "scanning per-layer sensitivity")
                self._sens = layer_sensitivity(self.original, self.ev, self.threads)
                self._put("sensitivity.json", json.dumps(self._sens).encode())
        return self._sens

    # ------------------------------------------------------------------ budget
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def over_budget(self) -> bool:
        return self.elapsed_s() > self.budget.minutes * 60

    def _fraction(self, done: int) -> float:
        return min(done / max(min(self.budget.trials, self.n_candidates), 1), 1.0)

    # ------------------------------------------------------------------ one candidate
    def _steps_for(self, cand: Candidate) -> list[Any]:
        raw = json.loads(json.dumps(cand.steps))
        if cand.sensitivity_steps:
            sens = self.sensitivity()
            for i in cand.sensitivity_steps:
                allocate_step(raw[i], sens)
        return [get_technique(s["method"]).spec_model.model_validate(s) for s in raw]

    def run_candidate(self, k: int, cand: Candidate) -> tuple[dict[str, Any], onnx.ModelProto]:
        label = ", ".join(f"{key}={v}" for key, v in cand.values.items()) or "as written"
        steps = self._steps_for(cand)
        current = self.original
        reports = []
        for i, step in enumerate(steps):
            tech = get_technique(step.method)

            def step_progress(phase: str, fraction: float, message: str, i: int = i) -> None:
                if self.over_budget() and self.finished > 0:  # anytime: the first candidate always finishes
                    raise _BudgetSpent(f"search budget of {self.budget.minutes:g} min spent")
                inner = (i + max(0.0, min(1.0, fraction))) / len(steps)
                self.progress("searching", self._fraction(k + inner),
                              f"candidate {k + 1} ({label}): step {i + 1}/{len(steps)} {step.method}: {message}")

            ctx = StepContext(workdir=self.workdir, data=self.data, original=self.original, progress=step_progress,
                              seed=self.spec.eval.seed + i, device=self.device, threads=self.threads,
                              load_model=self.load_model)
            result = tech.apply(current, step, ctx)
            current = result.model
            reports.append({"method": step.method, "spec": step.model_dump(mode="json"), "report": result.report})
        path = self.workdir / f"candidate-{cand.id}.onnx"
        files = modelio.save(current, path)
        m = measure(current, files, self.ev, latency_runs=self.spec.eval.latency_runs, threads=self.threads)
        m["ratios"] = ratios(m, self.m_orig)
        drop = metric_drop(m, self.m_orig, self.target.metric)
        row = {
            "id": cand.id, "values": cand.values, "status": "done", "resumed": False,
            "steps": [s.model_dump(mode="json") for s in steps],
            "drop": drop, "objective": _objective(m, self.target.optimize),
            "meets_target": drop <= self.target.allowed_drop() + 1e-9,
            "metrics": m, "reports": reports, "seconds": None,
        }
        return row, current

    # ------------------------------------------------------------------ the loop
    def run(self) -> SearchOutcome:
        candidates = expand(self.spec.raw_steps(), self.spec.search if self.spec.search is not None else "auto")
        self.n_candidates = len(candidates)
        rows: list[dict[str, Any]] = []
        models: dict[str, onnx.ModelProto] = {}
        stopped_by = "grid exhausted"
        resumed = 0
        first_error: CompressionError | None = None
        for k, cand in enumerate(candidates):
            if len(rows) >= self.budget.trials:
                stopped_by = "trials budget"
                break
            if self.over_budget() and self.finished > 0:
                stopped_by = "time budget"
                break
            saved, blob = self._get(f"cand-{cand.id}.json"), self._get(f"cand-{cand.id}.onnx")
            if saved is not None and (blob is not None or json.loads(saved)["status"] != "done"):
                row = json.loads(saved)
                row["resumed"] = True
                self.finished += row["status"] == "done"
                resumed += 1
                rows.append(row)
                if blob is not None:
                    models[cand.id] = onnx.load_model_from_string(blob)
                continue
            t0 = time.monotonic()
            try:
                row, model = self.run_candidate(k, cand)
            except _BudgetSpent:
                stopped_by = "time budget"
                break
            except Cancelled as e:  # a user's cancel or the job's time limit: keep what is finished
                if not any(r["status"] == "done" for r in rows):
                    raise
                stopped_by = "cancelled" if e.code == "cancelled" else e.code
                break
            except CompressionError as e:  # this recipe does not apply (e.g. not trainable): record, go on
                first_error = first_error or e
                row = {"id": cand.id, "values": cand.values, "status": "failed", "resumed": False,
                       "error": f"{e.code}: {str(e)[:300]}", "seconds": round(time.monotonic() - t0, 3)}
                self._put(f"cand-{cand.id}.json", json.dumps(row).encode())
                rows.append(row)
                continue
            row["seconds"] = round(time.monotonic() - t0, 3)
            self.finished += 1
            blob = model.SerializeToString()
            self._put(f"cand-{cand.id}.onnx", blob)  # the model first: a json without its model is not resumed
            self._put(f"cand-{cand.id}.json", json.dumps(row, default=json_default).encode())
            rows.append(json.loads(json.dumps(row, default=json_default)))
            models[cand.id] = model
        done = [r for r in rows if r["status"] == "done"]
        if not done:
            if first_error is not None:
                raise first_error
            raise InvalidSpec("the search finished no candidate within its budget",
                              [{"loc": ["budget"], "msg": "no candidate finished"}])
        meeting = [r for r in done if r["meets_target"]]
        if meeting:
            best = min(meeting, key=lambda r: (r["objective"], r["drop"]))
        else:  # nothing meets the bar: still return the closest one, and say so
            best = min(done, key=lambda r: (r["drop"], r["objective"]))
        front = pareto_front([(r["id"], r["drop"], r["objective"]) for r in done])
        # a planned stop (grid done, trials used) is complete; a time-out or a cancel leaves it partial
        partial = stopped_by not in ("grid exhausted", "trials budget")
        summary = {
            "target": self.target.model_dump(mode="json"), "allowed_drop": round(self.target.allowed_drop(), 6),
            "budget": self.budget.model_dump(mode="json"),
            "grid_size": len(candidates), "tried": len(rows), "finished": len(done), "resumed": resumed,
            "failed": len(rows) - len(done), "stopped_by": stopped_by, "partial": partial,
            "elapsed_s": round(self.elapsed_s(), 3), "target_met": bool(meeting),
            "best": _compact(best, self.target.optimize), "front": front,
            "candidates": [_compact(r, self.target.optimize) for r in rows],
            "original": {"metric": self.m_orig.get(self.target.metric), "objective": _objective(self.m_orig, self.target.optimize)},
        }
        if self._sens:
            summary["sensitivity"] = {k: {"node": v["node"], "relative_error": dict(zip(map(str, v["levels"]), v["relative_error"]))}
                                      for k, v in self._sens.items()}
        return SearchOutcome(best=best, best_model=models[best["id"]],
                             front_models={f"front-{i + 1}-{pid}.onnx": models[pid] for i, pid in enumerate(front)},
                             summary=summary, reports=best.get("reports", []))


def _compact(row: dict[str, Any], optimize: str) -> dict[str, Any]:
    """A candidate as the job's metrics hold it (the full metrics stay in report.json)."""
    out = {k: row.get(k) for k in ("id", "values", "status", "drop", "objective", "meets_target", "resumed",
                                   "seconds", "error") if k in row}
    m = row.get("metrics")
    if m:
        out["metrics"] = {k: m.get(k) for k in ("accuracy", "agreement", "output_cosine", "perplexity",
                                                 "token_agreement", "kl", "file_bytes", "compressed_bytes", "macs",
                                                 "params", "nonzero_params")}
        out["metrics"]["latency_p50_ms"] = m["latency_ms"]["p50"]
    return out


def run_search(original: onnx.ModelProto, spec: ParsedSpec, data: DataSplit | None, workdir: Path, *,
               ev: EvalData, m_orig: dict[str, Any], progress: Callable[[str, float, str], None],
               device: str = "cpu", threads: int = 0, load_model: Callable[[str], onnx.ModelProto] | None = None,
               checkpoint: Checkpoint | None = None) -> SearchOutcome:
    """Explore the spec's grid under its budget; see the module docstring.

    Args:
        original: the uploaded model; ev/m_orig: its held-out data and measured metrics.
        progress: ``(phase, fraction, message)``; may raise ``Cancelled`` (a cancel ends the search with
            what it has, if anything finished).
        checkpoint: where finished candidates are kept so a retried job resumes; None: nothing is kept.

    Returns:
        SearchOutcome: the best candidate (meeting the target if any does), the front's models, a summary
        for the job's metrics (every candidate, the front, partial/stopped_by, the sensitivity scan).

    Raises:
        InvalidSpec: the target's metric cannot be measured (accuracy without labels), or nothing finished.
    """
    if data is None and (spec.target or TargetSpec()).metric == "accuracy":
        raise InvalidSpec("target metric 'accuracy' needs a dataset with labels",
                          [{"loc": ["target", "metric"], "msg": "needs labelled data"}])
    return _Search(original, spec, data, workdir, ev=ev, m_orig=m_orig, progress=progress, device=device,
                   threads=threads, load_model=load_model, checkpoint=checkpoint).run()


def write_plot(summary: dict[str, Any], path: Path) -> Path:
    """The front as an SVG scatter: every candidate, the front joined, the best ringed."""
    path.write_text(pareto_svg(summary))
    return path
