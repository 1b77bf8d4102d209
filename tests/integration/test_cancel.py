"""Cancel: a running job stops at its next epoch and leaves no artifact; a queued one is cancelled at once."""
from __future__ import annotations

from testkit.stack import upload, wait_job


def test_cancel_running_job_stops_within_an_epoch(stack, cnn_onnx, mnist_npz):
    c = stack.client()
    model, ds = upload(c, cnn_onnx["legacy"]), upload(c, mnist_npz)
    # the worker holds the job at the end of its first fine-tune epoch while the cancel is asked for
    with stack.paused("phase:finetuning") as pause:
        job = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": ds["id"], "spec": {"steps": [
            {"method": "prune", "sparsity": 0.5, "finetune": {"epochs": 200, "batch_size": 32}}]}}).json()
        held = pause.wait(c, job["id"])
        cur = c.get(f"/v1/jobs/{job['id']}").json()
        assert cur["status"] == "running" and held["phase"] == "finetuning", (cur, held)
        r = c.post(f"/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 202 and r.json()["cancel_requested"]
    done = wait_job(c, job["id"], timeout=60)
    assert done["status"] == "cancelled" and done["error"]["code"] == "cancelled"
    # it stopped at its first progress report after the cancel: not one more epoch ran
    assert done["progress"]["message"] == held["message"] and "epoch 1:" in held["message"], (done["progress"], held)
    assert done["artifacts"] == []
    assert not (stack.home / "artifacts" / "jobs" / job["id"]).exists()
    r = c.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 409 and r.json()["code"] == "conflict"


def test_cancel_queued_job_is_immediate(stack, cnn_onnx, mnist_npz):
    c = stack.client()
    model, ds = upload(c, cnn_onnx["legacy"]), upload(c, mnist_npz)
    spec = {"steps": [{"method": "prune", "sparsity": 0.5, "finetune": {"epochs": 3}}]}
    # the blocker holds the only worker, so the second job is certainly still queued when it is cancelled
    with stack.paused("phase:loading") as pause:
        blocker = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": ds["id"], "spec": spec}).json()
        pause.wait(c, blocker["id"])
        queued = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": ds["id"], "spec": spec}).json()
        r = c.post(f"/v1/jobs/{queued['id']}/cancel")
        assert r.status_code == 202
        body = r.json()
        assert body["status"] == "cancelled" and body["artifacts"] == [] and body["started_at"] is None, body
    assert wait_job(c, blocker["id"])["status"] == "succeeded"
    assert c.get(f"/v1/jobs/{queued['id']}").json()["started_at"] is None  # its message, if read, ran nothing
