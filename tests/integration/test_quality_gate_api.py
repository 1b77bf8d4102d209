"""The quality gate through HTTP on PostgreSQL + Redis + a worker: a step that breaks the model ends the job
``failed`` with ``quality_gate``, the measured numbers and no model published; ``eval.gate: false`` publishes it."""
from __future__ import annotations

from testkit.stack import tiny_classifier, upload, wait_job

BROKEN = [{"method": "prune", "sparsity": 0.99}]  # 99% of the weights zeroed, no fine-tuning


def test_a_broken_step_fails_the_job_with_quality_gate(stack, tmp_path):
    c = stack.client()
    onnx_path, npz_path = tiny_classifier(tmp_path, samples=500)
    model, ds = upload(c, onnx_path), upload(c, npz_path)
    r = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": ds["id"],
                                 "spec": {"steps": BROKEN, "eval": {"latency_runs": 5}}})
    assert r.status_code == 202, r.text
    job = wait_job(c, r.json()["id"], timeout=300)
    assert job["status"] == "failed" and job["attempts"] == 1, job  # deterministic: not retried
    err = job["error"]
    assert err["code"] == "quality_gate", err
    d = err["details"]
    assert d["step"] == 0 and d["metric"] == "accuracy" and d["original"] == 1.0 and d["value"] < 0.95
    assert err["message"].startswith(f"step 1 (prune): accuracy {d['value']:.3f} vs 1.000 original (drop "
                                     f"{d['drop_pt']:.1f} pt > max_drop 5 pt)"), err
    assert "eval.gate: false" in err["message"]
    assert not any(a["name"] == "model.onnx" for a in job["artifacts"]), job["artifacts"]
    assert c.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").status_code == 404

    r = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": ds["id"],
                                 "spec": {"steps": BROKEN, "eval": {"latency_runs": 5, "gate": False}}})
    job = wait_job(c, r.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    verdict = job["metrics"]["result"]["verdict"]
    assert verdict["within_budget"] is False and "over budget" in verdict["summary"]
    assert any(a["name"] == "model.onnx" for a in job["artifacts"])
