"""Early exits through HTTP on PostgreSQL + Redis + a worker: both artifacts run in ONNX Runtime, the gated one
is an ``If`` graph, report.json carries the per-threshold metrics, and bad specs are refused."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from testkit.stack import upload, wait_job

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EVAL = {"holdout": 0.3, "latency_runs": 10}
STEP = {"method": "early_exit", "epochs": 3, "threshold": "auto", "thresholds": [0.5, 0.8, 0.9, 0.95, 0.99],
        "latency_samples": 40, "latency_rounds": 1}


def _sess(blob: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])


@pytest.mark.usefixtures("one_torch_thread")
def test_early_exit_job_publishes_a_multi_exit_and_a_gated_model(stack, cnn_onnx, mnist_npz, mnist_data):
    c = stack.client()
    model, ds = upload(c, cnn_onnx["dynamo"]), upload(c, mnist_npz)
    r = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": ds["id"],
                                 "spec": {"steps": [STEP], "eval": EVAL}})
    assert r.status_code == 202, r.text
    job = wait_job(c, r.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    names = {a["name"] for a in job["artifacts"]}
    assert {"model.onnx", "early_exit_gated.onnx", "report.json"} <= names

    X, y = mnist_data
    x = X[:64]  # not in the uploaded dataset
    original = _sess(onnx.load(str(cnn_onnx["dynamo"])).SerializeToString())
    ref = original.run(None, {"input": x})[0]
    multi_blob = c.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").content
    multi = _sess(multi_blob)
    assert [o.name for o in multi.get_outputs()] == ["logits", "exit_1", "exit_2"]
    outs = multi.run(None, {"input": x})
    np.testing.assert_allclose(outs[0], ref, rtol=1e-5, atol=1e-5)  # frozen backbone: the original's head
    assert all(o.shape == (64, 10) for o in outs)

    gated_blob = c.get(f"/v1/jobs/{job['id']}/artifacts/early_exit_gated.onnx").content
    gated_model = onnx.load_from_string(gated_blob)
    onnx.checker.check_model(gated_model)
    assert [n.op_type for n in gated_model.graph.node].count("If") == 1
    gated = _sess(gated_blob)
    assert [i.name for i in gated_model.graph.input] == ["input", "threshold"]
    assert [i.name for i in gated.get_overridable_initializers()] == ["threshold"]  # an input with a default
    def exit_index(i: int, threshold: float) -> int:
        return int(gated.run(None, {"input": x[i:i + 1], "threshold": np.array(threshold, np.float32)})[1][0])

    idx_low, idx_high = [exit_index(i, 0.0) for i in range(16)], [exit_index(i, 1.5) for i in range(16)]
    assert set(idx_low) == {1} and set(idx_high) == {3}
    logits, _ = gated.run(None, {"input": x[:1], "threshold": np.array(1.5, np.float32)})
    np.testing.assert_allclose(logits, outs[0][:1], rtol=1e-5, atol=1e-5)
    preds = [int(gated.run(None, {"input": x[i:i + 1]})[0].argmax()) for i in range(64)]  # default threshold
    assert np.mean(np.array(preds) == y[:64]) > 0.85

    report = c.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()["steps"][0]["report"]
    rows = report["thresholds"]
    assert [row["threshold"] for row in rows] == [0.5, 0.8, 0.9, 0.95, 0.99]
    for row in rows:
        assert len(row["exit_fractions"]) == 3 and abs(sum(row["exit_fractions"]) - 1) < 1e-5
        assert row["mean_macs"] < report["full"]["macs"] * 1.05 and row["latency_ms"] > 0
    assert rows[0]["macs_ratio"] > 2  # most samples leave at the first exit (~9% of the MACs)
    rec = report["recommended_threshold"]
    assert rec in [row["threshold"] for row in rows] and report["gated_default_threshold"] == rec
    assert report["gated_matches_simulation"] == 1.0
    orig, result = job["metrics"]["original"], job["metrics"]["result"]
    assert result["agreement"] == 1.0 and result["accuracy"] == orig["accuracy"]


def test_early_exit_bad_specs(stack, cnn_onnx, mnist_npz):
    c = stack.client()
    model, ds = upload(c, cnn_onnx["legacy"]), upload(c, mnist_npz)
    r = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": ds["id"],
                                 "spec": {"steps": [{"method": "early_exit", "threshold": 1.5}]}})
    assert r.status_code == 422 and r.json()["code"] == "invalid_spec"
    assert r.json()["errors"][0]["path"].startswith("$.spec.steps[0].threshold")
    r = c.post("/v1/jobs", json={"model_id": model["id"], "spec": {"steps": [{"method": "early_exit"}]}})
    assert r.status_code == 422 and "needs a dataset" in r.text
    # A node inside the graph that is not a cut can only be checked against the model: the job fails with a
    # reason that lists the valid cut points.
    r = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": ds["id"], "spec": {
        "steps": [{"method": "early_exit", "exits": ["/features/features.4/Conv", "no-such-node"], "epochs": 1}],
        "eval": EVAL}})
    assert r.status_code == 202, r.text
    job = wait_job(c, r.json()["id"], timeout=120)
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_spec"
    assert "/features/features.3/MaxPool" in job["error"]["message"]
