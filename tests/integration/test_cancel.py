"""Cancel: a running job stops at its next epoch and leaves no artifact; a queued one is cancelled at once."""
from __future__ import annotations

import time

from tests.stack import wait_job


def _upload(c, cnn_onnx, mnist_npz):
    with open(cnn_onnx["legacy"], "rb") as f:
        model = c.post("/v1/models", files={"file": ("cnn.onnx", f)}).json()
    with open(mnist_npz, "rb") as f:
        ds = c.post("/v1/datasets", files={"file": ("mnist.npz", f)}).json()
    return model, ds


def test_cancel_running_job_stops_within_an_epoch(stack, cnn_onnx, mnist_npz):
    c = stack.client()
    model, ds = _upload(c, cnn_onnx, mnist_npz)
    job = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": ds["id"], "spec": {"steps": [
        {"method": "prune", "sparsity": 0.5, "finetune": {"epochs": 200, "batch_size": 32}}]}}).json()
    deadline = time.time() + 120
    while time.time() < deadline:
        cur = c.get(f"/v1/jobs/{job['id']}").json()
        if cur["status"] == "running" and cur["progress"].get("phase") == "finetuning":
            break
        time.sleep(0.2)
    assert cur["progress"]["phase"] == "finetuning", cur
    t0 = time.time()
    r = c.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"]
    done = wait_job(c, job["id"], timeout=60)
    assert done["status"] == "cancelled" and done["error"]["code"] == "cancelled"
    assert time.time() - t0 < 30  # an epoch of 800 samples is well under that
    assert done["artifacts"] == []
    assert not (stack.home / "artifacts" / "jobs" / job["id"]).exists()
    r = c.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 409 and r.json()["code"] == "conflict"


def test_cancel_queued_job_is_immediate(stack, cnn_onnx, mnist_npz):
    c = stack.client()
    model, ds = _upload(c, cnn_onnx, mnist_npz)
    spec = {"steps": [{"method": "prune", "sparsity": 0.5, "finetune": {"epochs": 3}}]}
    blocker = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": ds["id"], "spec": spec}).json()
    queued = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": ds["id"], "spec": spec}).json()
    r = c.post(f"/v1/jobs/{queued['id']}/cancel")
    assert r.status_code == 202
    body = r.json()
    if body["status"] != "cancelled":  # the single worker may already have picked it up
        body = wait_job(c, queued["id"])
    assert body["status"] == "cancelled" and body["artifacts"] == []
    assert wait_job(c, blocker["id"])["status"] == "succeeded"
