"""Slimmable networks through HTTP on PostgreSQL + Redis + a worker: one job trains a BatchNorm CNN at
several widths and publishes one smaller ONNX per width, measured in the report; bad widths are a 422."""
from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compression.analysis import count_params, macs
from testkit.zoo import export_onnx
from testkit.stack import upload, wait_job

EVAL = {"holdout": 0.3, "latency_runs": 10}
WIDTHS = [0.25, 0.5, 1.0]


@pytest.fixture(scope="module")
def bn_cnn_path(trained_cnn, tmp_path_factory):
    """The session's trained SmallCNN, exported with its BatchNorm nodes kept (switchable BN needs them)."""
    return export_onnx(trained_cnn, torch.zeros(2, 1, 28, 28), tmp_path_factory.mktemp("slim-api") / "cnn_bn.onnx",
                       dynamo=True, optimize=False)


def test_slimmable_job_publishes_one_smaller_model_per_width(stack, bn_cnn_path, mnist_npz):
    c = stack.client()
    model, ds = upload(c, bn_cnn_path), upload(c, mnist_npz)
    r = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": ds["id"], "spec": {"eval": EVAL, "steps": [
        {"method": "slimmable", "widths": WIDTHS, "epochs": 2, "lr": 1e-3, "batch_size": 64}]}})
    assert r.status_code == 202, r.text
    job = wait_job(c, r.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    names = {a["name"] for a in job["artifacts"]}
    assert {f"width_{w}.onnx" for w in WIDTHS} <= names and "model.onnx" in names
    data = np.load(mnist_npz)
    X, y = data["input"][:200], data["labels"][:200]
    sample = {"input": X[:1]}
    params, mac = [], []
    for w in WIDTHS:
        blob = c.get(f"/v1/jobs/{job['id']}/artifacts/width_{w}.onnx").content
        m = onnx.load_from_string(blob)
        onnx.checker.check_model(m)
        out = ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, {"input": X})[0]
        assert out.shape == (200, 10) and np.isfinite(out).all()
        assert float((out.argmax(1) == y).mean()) > 0.8, w
        assert sum(n.op_type == "BatchNormalization" for n in m.graph.node) == 2  # this width's statistics
        params.append(count_params(m)[0])
        mac.append(macs(m, sample))
    assert params == sorted(params) and len(set(params)) == 3 and params[0] * 6 < params[-1]
    assert mac == sorted(mac) and len(set(mac)) == 3 and mac[0] * 6 < mac[-1]
    report = c.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()["steps"][0]["report"]
    rows = report["widths"]
    assert [row["width"] for row in rows] == WIDTHS
    assert [row["params"] for row in rows] == params and [row["macs"] for row in rows] == mac
    assert all(row["accuracy"] > 0.8 and row["latency_ms"]["p50"] > 0 for row in rows)
    assert report["switchable_batchnorm_layers"] == 2
    # The step's model is the width-1.0 network: the job's metrics measure it against the original.
    result, orig = job["metrics"]["result"], job["metrics"]["original"]
    assert result["params"] == params[-1] == orig["params"]
    assert result["accuracy"] >= orig["accuracy"] - 0.03
    full = c.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").content
    assert onnx.load(io.BytesIO(full)).graph.node[0].op_type == onnx.load(str(bn_cnn_path)).graph.node[0].op_type


def test_bad_widths_are_a_422(stack, cnn_onnx, mnist_npz):
    c = stack.client()
    model, ds = upload(c, cnn_onnx["legacy"]), upload(c, mnist_npz)
    for widths, msg in (([0.5, 0.25, 1.0], "sorted"), ([0.5, 0.75], "include 1.0"), ([0.5, 0.5, 1.0], "unique"),
                        ([0.0, 1.0], "(0, 1]")):
        r = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": ds["id"],
                                     "spec": {"steps": [{"method": "slimmable", "widths": widths}]}})
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["code"] == "invalid_spec" and body["errors"][0]["path"] == "$.spec.steps[0].widths", body
        assert msg in r.text
    r = c.post("/v1/jobs", json={"model_id": model["id"], "spec": {"steps": [{"method": "slimmable"}]}})
    assert r.status_code == 422 and "needs a dataset" in r.text
