"""End to end through HTTP: upload → queue → worker → measured ONNX artifact, on PostgreSQL + Redis
and on the embedded default (SQLite + filesystem broker)."""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from sqlalchemy import create_engine, text

from testkit.stack import upload, wait_job

SPEC = {
    "steps": [
        {"method": "prune", "granularity": "weight", "sparsity": 0.5,
         "finetune": {"epochs": 1, "lr": 5e-4, "batch_size": 64}},
        {"method": "quantize", "scheme": "int8", "mode": "static", "calibration_samples": 128},
    ],
    "eval": {"holdout": 0.3, "latency_runs": 10},
}


def own_nonzero(model: onnx.ModelProto) -> int:
    """Count nonzero learned weights ourselves: dequantize int8 weights, read float ones directly."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    total = 0
    dq_inputs = set()
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].size > 1:
            dq_inputs.add(n.input[0])
            q = inits[n.input[0]].astype(np.int64)
            zp = inits[n.input[2]].astype(np.int64) if len(n.input) > 2 and n.input[2] in inits else 0
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            if np.ndim(zp) == 1 and q.ndim > 1:
                shape = [1] * q.ndim
                shape[axis] = -1
                zp = zp.reshape(shape)
            total += int(np.count_nonzero(q - zp))
    for name, arr in inits.items():
        if name not in dq_inputs and arr.dtype.kind == "f" and arr.size > 1:
            consumers = [n for n in model.graph.node if name in n.input]
            if all(c.op_type not in ("QuantizeLinear", "DequantizeLinear") for c in consumers):
                total += int(np.count_nonzero(arr))
    return total


def run_flow(stack, onnx_path, npz_path, X, y):
    c = stack.client()
    model = upload(c, onnx_path, name=onnx_path.name)
    assert model["format"] == "onnx" and model["sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert model["inputs"][0]["name"] == "input" and model["params"] > 200_000
    ds = upload(c, npz_path, name=npz_path.name)
    assert ds["samples"] == len(X) and ds["arrays"]["input"]["shape"] == list(X.shape)

    r = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": ds["id"], "spec": SPEC, "name": "e2e"})
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    job = wait_job(c, r.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1 and job["progress"]["fraction"] == 1.0

    arts = {a["name"]: a for a in job["artifacts"]}
    assert {"model.onnx", "report.json", "step1-prune.onnx"} <= set(arts)
    blob = c.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").content
    assert hashlib.sha256(blob).hexdigest() == arts["model.onnx"]["sha256"]
    result = job["metrics"]["result"]
    assert len(blob) == result["file_bytes"] == arts["model.onnx"]["size_bytes"]

    art_model = onnx.load_from_string(blob)
    onnx.checker.check_model(art_model)
    assert any(n.op_type == "DequantizeLinear" for n in art_model.graph.node)
    assert own_nonzero(art_model) == result["nonzero_params"]

    orig = ort.InferenceSession(onnx_path.read_bytes(), providers=["CPUExecutionProvider"])
    comp = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    out_o = orig.run(None, {"input": X})[0]
    out_c = comp.run(None, {"input": X})[0]
    acc_o, acc_c = float((out_o.argmax(1) == y).mean()), float((out_c.argmax(1) == y).mean())
    assert acc_o > 0.9
    assert acc_c >= acc_o - 0.03, (acc_o, acc_c)
    assert float((out_o.argmax(1) == out_c.argmax(1)).mean()) > 0.9

    orig_m, prune_m = job["metrics"]["original"], job["metrics"]["steps"][0]
    assert orig_m["params"] == model["params"]
    assert prune_m["nonzero_params"] <= 0.55 * orig_m["nonzero_params"]
    assert prune_m["zip_bytes"] < orig_m["zip_bytes"]
    assert result["file_bytes"] * 3 < orig_m["file_bytes"]  # int8 weights: about 4× smaller
    assert result["ratios"]["file_bytes"] > 3
    assert result["accuracy"] is not None and result["latency_ms"]["p50"] > 0 and result["macs"] == orig_m["macs"]

    report = c.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    assert report["manifest"]["inputs_sha256"]["model"] == model["sha256"]
    assert report["steps"][0]["report"]["sparsity"] >= 0.49
    return job


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_postgres_redis_end_to_end(stack, cnn_onnx, mnist_npz, exporter, pg_url):
    with np.load(mnist_npz) as z:
        X, y = z["input"], z["labels"]
    job = run_flow(stack, cnn_onnx[exporter], mnist_npz, X, y)
    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        moves = conn.execute(text("SELECT from_status, to_status FROM job_transitions WHERE job_id=:j ORDER BY id"),
                             {"j": job["id"]}).all()
        n_artifacts = conn.execute(text("SELECT count(*) FROM artifacts WHERE job_id=:j"), {"j": job["id"]}).scalar()
    engine.dispose()
    assert [tuple(m) for m in moves] == [("queued", "running"), ("running", "succeeded")]
    assert n_artifacts == len(job["artifacts"])


def test_embedded_default_end_to_end(embedded, cnn_onnx, mnist_npz):
    with np.load(mnist_npz) as z:
        X, y = z["input"], z["labels"]
    run_flow(embedded, cnn_onnx["dynamo"], mnist_npz, X, y)
    assert (embedded.home / "netcompress.db").is_file()
    assert any((embedded.home / "artifacts" / "jobs").iterdir())


def test_serve_opens_with_url_key_home_and_logs_and_no_banner(embedded):
    """``netcompress serve``'s first screen (issue 16): the URL, the key once, the home folder and where the logs
    go — Celery's banner and its root paragraph are in the worker's log, not on the console."""
    console = (embedded.home.parent / "serve.log").read_text()
    first = console.splitlines()[:10]
    assert embedded.url in first[0]
    assert first.count(embedded.key) == 1 and console.count(embedded.key) == 1
    assert any(line.startswith("home:") and str(embedded.home) in line for line in first)
    logs = embedded.home / "logs"
    assert any(line.startswith("logs:") and str(logs / "worker.log") in line for line in first)
    assert "celery" not in console.lower() and "superuser" not in console and "-------------- " not in console
    assert (logs / "worker.log").exists() and (logs / "api.log").exists()
