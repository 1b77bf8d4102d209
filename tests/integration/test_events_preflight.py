"""``GET /v1/jobs/{id}/events`` (Server-Sent Events) and ``POST /v1/jobs/preflight`` on the live stack."""
from __future__ import annotations

import json
import threading
import time

import onnx
import pytest

from compression.converter import unsupported_ops
from testkit.stack import METRICS_TOKEN, tiny_classifier, upload, wait_job

FAST_EVAL = {"holdout": 0.3, "latency_runs": 5}


@pytest.fixture(scope="module")
def uploaded(stack, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-ev")
    # 8,000 samples: the preflight test checks the count; the events test holds its job where it must be seen
    onnx_path, npz_path = tiny_classifier(d, samples=8000)
    det_path, _ = tiny_classifier(d / "det", extra_op="Det")
    c = stack.client()
    ids = {key: upload(c, path)["id"] for key, path in (("model", onnx_path), ("det", det_path), ("data", npz_path))}
    ids["det_path"] = det_path
    return ids


def read_events(client, job_id: str, timeout: float = 300, into: list | None = None) -> list[tuple[str, dict]]:
    """The job's events until the stream ends; each is appended to ``into`` (default a new list) as it comes."""
    events, event, data = ([] if into is None else into), None, []
    deadline = time.time() + timeout
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            assert time.time() < deadline, events
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and data:
                events.append((event, json.loads("\n".join(data))))
                event, data = None, []
    return events


@pytest.fixture(scope="module")
def finished(stack, uploaded):
    """The job the events test followed (the other tests need a finished job, not another run)."""
    return {}


def _until_streamed(events: list, c, job_id: str, timeout: float = 120) -> None:
    """Wait until the stream has sent the job's state as the row shows it now (held: the row stands still)."""
    now = c.get(f"/v1/jobs/{job_id}").json()
    deadline = time.time() + timeout
    while not any(e == "state" and d["status"] == now["status"] and d["progress"].get("message") ==
                  now["progress"]["message"] for e, d in list(events)):
        assert time.time() < deadline, (now, events)
        time.sleep(0.1)


def test_events_stream_progress_until_done(stack, uploaded, finished):
    c = stack.client()
    spec = {"steps": [{"method": "prune", "granularity": "weight", "sparsity": 0.5,
                       "finetune": {"epochs": 8, "batch_size": 4}},
                      {"method": "quantize", "scheme": "int8", "mode": "dynamic"}],
            # the stream is under test, not the result: 8 epochs at batch 4 cost the tiny model a few points
            "eval": {**FAST_EVAL, "gate": False}}
    events: list[tuple[str, dict]] = []
    # The API samples the row every 0.5 s, so a short phase may fall between two samples: the worker holds
    # the job twice — after the first fine-tune epoch (the row still says pruning), then after the second
    # (the row says the first epoch) — until the stream has sent what the row says.
    with stack.paused("phase:finetuning") as pause:
        r = c.post("/v1/jobs", json={"model_id": uploaded["model"], "dataset_id": uploaded["data"], "spec": spec})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        reader = threading.Thread(target=read_events, args=(stack.client(), job_id), kwargs={"into": events})
        reader.start()
        pause.wait(c, job_id)
        _until_streamed(events, c, job_id)
        pause.arm("epoch 2:")
        pause.wait(c, job_id)
        _until_streamed(events, c, job_id)
    reader.join(timeout=300)
    assert not reader.is_alive() and events, events
    kinds = [e for e, _ in events]
    assert kinds[-1] == "done" and kinds.count("done") == 1 and set(kinds) == {"state", "done"}
    states = [d for e, d in events if e == "state"]
    assert states[0]["id"] == job_id
    statuses = [s["status"] for s in states]
    assert "running" in statuses and statuses[-1] == "succeeded"
    phases = {s["progress"].get("phase") for s in states}
    assert {"pruning", "finetuning"} <= phases, states
    running = [s["progress"]["fraction"] for s in states if s["status"] == "running"]
    assert running == sorted(running) and len(running) >= 2
    # no event repeats the one before it (an event is a change)
    assert all(a != b for a, b in zip(states, states[1:]))
    done = events[-1][1]
    assert done["status"] == "succeeded" and done["metrics"]["result"]["file_bytes"] > 0
    assert {a["name"] for a in done["artifacts"]} >= {"model.onnx", "report.json"}
    # a finished job: its state and done at once, then the stream ends
    again = read_events(c, job_id, timeout=10)
    assert [e for e, _ in again] == ["state", "done"] and again[1][1]["id"] == job_id
    finished["id"] = job_id


def test_events_auth_and_other_team(stack, uploaded, finished):
    job_id = finished.get("id") or wait_job(stack.client(), stack.client().post("/v1/jobs", json={
        "model_id": uploaded["model"], "spec": {"steps": [{"method": "quantize", "scheme": "fp16"}],
                                                "eval": FAST_EVAL}}).json()["id"])["id"]
    other = stack.client(stack.new_key("team-events-other"))
    r = other.get(f"/v1/jobs/{job_id}/events")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "not_found"
    r = stack.client(key="nc_nope").get(f"/v1/jobs/{job_id}/events")
    assert r.status_code == 401


def test_preflight_reports_steps_blockers_and_cost(stack, uploaded):
    c = stack.client()
    spec = {"steps": [{"method": "prune", "granularity": "weight", "sparsity": 0.5},
                      {"method": "prune", "granularity": "channel", "sparsity": 0.25},
                      {"method": "quantize", "scheme": "int8", "mode": "static"}]}
    before = c.get("/v1/jobs", params={"limit": 100}).json()["items"]
    r = c.post("/v1/jobs/preflight", json={"model_id": uploaded["det"], "dataset_id": uploaded["data"], "spec": spec})
    assert r.status_code == 200, r.text
    rep = r.json()
    blockers = unsupported_ops(onnx.load(uploaded["det_path"]))
    assert blockers, "the test model needs an op the converter lacks; pick another extra_op"
    assert rep["model"]["unsupported_ops"] == blockers
    assert rep["model"]["macs"] == 16 * 32 + 32 * 4 and rep["model"]["macs_source"] == "measured"
    weight, channel, quant = rep["steps"]
    assert weight["applies"] and not weight["trains"] and weight["blocking_ops"] == [] and weight["targets"] == 2
    assert not channel["applies"] and channel["needs_torch"] and channel["blocking_ops"] == blockers
    assert quant["applies"] and quant["needs_data"] and not quant["trains"] and quant["forward_passes"] > 0
    assert rep["runnable"] is False and rep["rejection"] is None and rep["dataset_samples"] == 8000
    assert rep["cost"]["seconds_cpu"] > 0 and rep["cost"]["size"] == "small"
    assert c.get("/v1/jobs", params={"limit": 100}).json()["items"] == before  # nothing queued


def test_preflight_explains_what_submit_refuses(stack, uploaded):
    c = stack.client()
    spec = {"steps": [{"method": "prune", "sparsity": 0.5, "finetune": {"epochs": 1}}]}
    r = c.post("/v1/jobs/preflight", json={"model_id": uploaded["model"], "spec": spec})
    assert r.status_code == 200, r.text
    rep = r.json()
    step = rep["steps"][0]
    assert step["trains"] and step["needs_data"] and not step["applies"]
    assert any("dataset" in n for n in step["notes"])
    assert rep["rejection"]["status"] == 422 and rep["rejection"]["code"] == "invalid_spec"
    assert c.post("/v1/jobs", json={"model_id": uploaded["model"], "spec": spec}).status_code == 422
    # with the data it trains and is runnable; training multiplies the estimated cost
    r2 = c.post("/v1/jobs/preflight", json={"model_id": uploaded["model"], "dataset_id": uploaded["data"], "spec": spec})
    assert r2.json()["runnable"] is True
    assert r2.json()["steps"][0]["forward_passes"] > rep["steps"][0]["forward_passes"]
    # what preflight cannot analyse is the same error as submit's
    bad = {"steps": [{"method": "prune", "sparsity": 3}]}
    r = c.post("/v1/jobs/preflight", json={"model_id": uploaded["model"], "spec": bad})
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "$.spec.steps[0].sparsity"
    r = stack.client(stack.new_key("team-pf-other")).post("/v1/jobs/preflight",
                                                           json={"model_id": uploaded["model"], "spec": spec})
    assert r.status_code == 404


def test_metrics_endpoint(stack, uploaded, finished):
    c = stack.client()
    if not finished.get("id"):  # run alone: make one finished job
        wait_job(c, c.post("/v1/jobs", json={"model_id": uploaded["model"], "spec": {
            "steps": [{"method": "quantize", "scheme": "fp16"}], "eval": FAST_EVAL}}).json()["id"])
    else:
        assert c.get(f"/v1/jobs/{finished['id']}").status_code == 200
    r = httpx_get(stack.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    assert samples["netcompress_database_up"] == 1.0
    assert samples['netcompress_jobs{status="succeeded"}'] >= 1
    assert samples["netcompress_queue_depth"] == samples['netcompress_jobs{status="queued"}']
    count = samples['netcompress_job_duration_seconds_count{status="succeeded"}']
    assert count == samples['netcompress_jobs{status="succeeded"}']
    assert samples['netcompress_job_duration_seconds_bucket{le="+Inf",status="succeeded"}'] == count
    assert samples['netcompress_job_duration_seconds_sum{status="succeeded"}'] > 0
    key = 'netcompress_http_request_duration_seconds_count{method="POST",route="/v1/jobs",status="202"}'
    assert samples[key] >= 1, [k for k in samples if "http" in k][:20]
    assert any('route="/v1/jobs/{job_id}"' in k for k in samples), sorted(k for k in samples if "route" in k)  # templates, not ids


def httpx_get(url: str, headers: dict[str, str] | None = None):
    import httpx

    return httpx.get(url, headers=headers, timeout=30)
