"""Faults injected for real: workers SIGKILLed and SIGTERMed mid-job, the broker down at submit and
restarted mid-job, the database restarted under a job and under API traffic, a job time limit.

The stack here runs on a private redis-server and a private PostgreSQL cluster so they can be killed.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from sqlalchemy import create_engine, text

from testkit.faults import PrivatePostgres, PrivateRedis
from testkit.stack import Pause, start_embedded, start_stack, upload, wait_job, wait_log

LONG_SPEC = {"steps": [{"method": "prune", "sparsity": 0.5, "finetune": {"epochs": 15, "batch_size": 32}}],
             "eval": {"latency_runs": 5}}


@pytest.fixture(scope="module")
def fault(tmp_path_factory, cnn_onnx, mnist_npz):
    home = tmp_path_factory.mktemp("faults")
    pg, redis = PrivatePostgres(), PrivateRedis(home / "redis")
    pg.start()
    redis.start()
    # room for the quota test's 50 queued jobs per team
    stack = start_stack(home / "stack", database_url=pg.url, broker_url=redis.url, workers=2,
                        NETCOMPRESS_MAX_ATTEMPTS="2", NETCOMPRESS_MAX_QUEUED_PER_TEAM="50")
    c = stack.client()
    model, ds = upload(c, cnn_onnx["legacy"]), upload(c, mnist_npz)
    engine = create_engine(pg.url.replace("postgresql://", "postgresql+psycopg://"), pool_pre_ping=True)
    yield {"stack": stack, "pg": pg, "redis": redis, "model": model, "ds": ds, "engine": engine}
    engine.dispose()
    stack.stop()
    redis.stop()
    pg.destroy()


def _submit(f, spec=LONG_SPEC) -> dict:
    r = f["stack"].client().post("/v1/jobs", json={"model_id": f["model"]["id"], "dataset_id": f["ds"]["id"],
                                                   "spec": spec})
    assert r.status_code == 202, r.text
    return r.json()


@contextmanager
def _held_mid_job(f, spec=LONG_SPEC, at: str = "phase:finetuning") -> Iterator[tuple[dict, Pause]]:
    """Submit a job and hold it mid-way (the worker's test pause) until the block ends: what a test does
    to it meanwhile happens while it runs, however fast or slow the machine."""
    with f["stack"].paused(at) as pause:
        job = _submit(f, spec)
        pause.wait(f["stack"].client(), job["id"])
        yield job, pause


def _history(f, job_id: str) -> list[tuple]:
    with f["engine"].connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT from_status, to_status, reason FROM job_transitions WHERE job_id=:j ORDER BY id"), {"j": job_id})]


def _worker_of(pause: Pause, job_id: str) -> tuple[int, int]:
    """(main process, pool child) of the worker the pause last saw holding the job."""
    child = pause.holder_pid(job_id)
    with open(f"/proc/{child}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1]), child


def _kill_worker_of(f, pause: Pause, job_id: str) -> None:
    """SIGKILL the worker that runs the job: its main process first (so nothing hands the job back), then the child."""
    parent, child = _worker_of(pause, job_id)
    os.kill(parent, signal.SIGKILL)
    os.kill(child, signal.SIGKILL)
    f["stack"].add_worker()  # keep two workers


def _artifact_attempt_dirs(f, job_id: str) -> list[str]:
    d = f["stack"].home / "artifacts" / "jobs" / job_id
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_sigkill_mid_job_requeues_and_another_worker_finishes(fault):
    with _held_mid_job(fault) as (job, pause):
        _kill_worker_of(fault, pause, job["id"])
    done = wait_job(fault["stack"].client(), job["id"], timeout=180)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    moves = [(a, b) for a, b, _ in _history(fault, job["id"])]
    assert moves == [("queued", "running"), ("running", "queued"), ("queued", "running"), ("running", "succeeded")]
    assert len(_artifact_attempt_dirs(fault, job["id"])) == 1  # exactly one set of artifacts
    names = [a["name"] for a in done["artifacts"]]
    assert len(names) == len(set(names)) and "model.onnx" in names


def test_search_resumes_after_the_last_finished_candidate(fault):
    """A worker lost mid-search: the next attempt takes the finished candidates from the checkpoint."""
    spec = {"steps": [{"method": "prune", "sparsity": 0.5, "finetune": {"epochs": 1, "batch_size": 32}}],
            "search": {"prune.sparsity": [0.3, 0.5, 0.7, 0.8, 0.9]},
            "target": {"max_accuracy_drop": 0.05, "optimize": "file_bytes"}, "eval": {"latency_runs": 5}}
    c = fault["stack"].client()
    with _held_mid_job(fault, spec, at="candidate 3 ") as (job, pause):  # two candidates done, the third begun
        _kill_worker_of(fault, pause, job["id"])
    done = wait_job(c, job["id"], timeout=300)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    s = done["metrics"]["search"]
    assert s["resumed"] == 2 and s["finished"] == 5 and not s["partial"], s
    assert sum(1 for x in s["candidates"] if x["resumed"]) == s["resumed"]
    # the checkpoint is gone once the job is done; one attempt's artifacts remain
    assert len(_artifact_attempt_dirs(fault, job["id"])) == 1


def test_attempt_limit_ends_failed(fault):
    c = fault["stack"].client()
    with _held_mid_job(fault) as (job, pause):
        assert c.get(f"/v1/jobs/{job['id']}").json()["attempts"] == 1
        pause.arm("phase:finetuning")  # before the kill: now only the next attempt can say it is held
        _kill_worker_of(fault, pause, job["id"])  # the first attempt's worker: the wait above saw it
        pause.wait(c, job["id"])
        assert c.get(f"/v1/jobs/{job['id']}").json()["attempts"] == 2
        _kill_worker_of(fault, pause, job["id"])
    done = wait_job(fault["stack"].client(), job["id"], timeout=120)
    assert done["status"] == "failed" and done["error"]["code"] == "worker_lost"
    assert done["attempts"] == 2 and done["artifacts"] == []
    assert _artifact_attempt_dirs(fault, job["id"]) == []


def test_sigterm_warm_shutdown_finishes_the_job(fault):
    stack = fault["stack"]
    with _held_mid_job(fault) as (job, pause):
        parent, _child = _worker_of(pause, job["id"])
        os.kill(parent, signal.SIGTERM)
        wait_log([stack.worker_logs[parent]], "Warm shutdown")  # the shutdown began while the job runs
    done = wait_job(stack.client(), job["id"], timeout=180)
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert next(p for p in stack.procs if p.pid == parent).wait(timeout=60) == 0  # then the worker left
    stack.add_worker()


def test_broker_down_at_submit_then_sweeper_sends(fault):
    fault["redis"].stop()
    try:
        t = time.time()
        job = _submit(fault, {"steps": [{"method": "prune", "sparsity": 0.3}], "eval": {"latency_runs": 5}})
        assert time.time() - t < 10
        assert job["status"] == "queued"
        # a sweeper tried to send it and could not: the job waits, queued, for the broker
        wait_log(list(fault["stack"].worker_logs.values()), f"could not send job {job['id']}")
        assert fault["stack"].client().get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
    finally:
        fault["redis"].start()
    done = wait_job(fault["stack"].client(), job["id"], timeout=120)
    assert done["status"] == "succeeded" and done["attempts"] == 1


def test_broker_restart_while_job_runs(fault):
    with _held_mid_job(fault) as (job, _):
        fault["redis"].stop()
        time.sleep(1)  # an outage, not a wait for anything: the job is held mid-way throughout
        fault["redis"].start()
    done = wait_job(fault["stack"].client(), job["id"], timeout=180)
    assert done["status"] == "succeeded" and done["attempts"] == 1


def test_database_restart_under_job_and_api(fault):
    c = fault["stack"].client()
    with _held_mid_job(fault) as (job, _):
        fault["pg"].stop()  # released at once: the job computes on, its progress writes failing
    try:
        r = c.get(f"/v1/jobs/{job['id']}")
        assert r.status_code == 503, r.text
        assert r.headers["content-type"].startswith("application/problem+json") and r.json()["code"] == "unavailable"
        assert httpx.get(fault["stack"].url + "/readyz").status_code == 503
        time.sleep(3)
    finally:
        fault["pg"].start()
    deadline = time.time() + 30
    while c.get(f"/v1/jobs/{job['id']}").status_code != 200:
        assert time.time() < deadline, "API did not recover"
        time.sleep(0.3)
    done = wait_job(c, job["id"], timeout=180)
    assert done["status"] == "succeeded"
    running = [h for h in _history(fault, job["id"]) if h[1] == "running"]
    assert len(running) == 1 and done["attempts"] == 1  # not lost, not run twice


def test_time_limit_fails_the_job(tmp_path_factory, cnn_onnx, mnist_npz):
    stack = start_embedded(tmp_path_factory.mktemp("limit"), NETCOMPRESS_JOB_TIME_LIMIT_S="10")
    try:
        c = stack.client()
        model, ds = upload(c, cnn_onnx["legacy"]), upload(c, mnist_npz)
        spec = {"steps": [{"method": "prune", "finetune": {"epochs": 500, "batch_size": 32}}]}
        job = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": ds["id"], "spec": spec}).json()
        done = wait_job(c, job["id"], timeout=90)
        assert done["status"] == "failed" and done["error"]["code"] == "time_limit"
        assert done["artifacts"] == []
    finally:
        stack.stop()


def test_200_jobs_4_teams_with_quota(fault, tmp_path):
    import threading
    from collections import defaultdict

    import torch

    from testkit.zoo import export_onnx

    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    path = export_onnx(net, torch.zeros(2, 8), tmp_path / "tiny.onnx", dynamo=False)
    stack = fault["stack"]
    teams = {f"quota-{i}": stack.new_key(f"quota-{i}") for i in range(4)}
    with fault["engine"].begin() as conn:
        conn.execute(text("UPDATE teams SET max_running_jobs=1 WHERE name LIKE 'quota-%'"))
    # quotas are under test, not fidelity: an untrained random MLP flips >5% of its argmaxes at 20% sparsity
    spec = {"steps": [{"method": "prune", "sparsity": 0.2}], "eval": {"latency_runs": 5, "gate": False}}
    ids: dict[str, list[str]] = defaultdict(list)

    def submit(team: str, key: str) -> None:
        c = stack.client(key)
        model = upload(c, path)
        for _ in range(50):
            r = c.post("/v1/jobs", json={"model_id": model["id"], "spec": spec})
            assert r.status_code == 202
            ids[team].append(r.json()["id"])

    threads = [threading.Thread(target=submit, args=kv) for kv in teams.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_ids = [j for v in ids.values() for j in v]
    assert len(all_ids) == 200
    deadline = time.time() + 600
    with fault["engine"].connect() as conn:
        while True:
            left = conn.execute(text("SELECT count(*) FROM jobs WHERE id = ANY(:ids) AND status IN ('queued','running')"),
                                {"ids": all_ids}).scalar()
            if left == 0:
                break
            assert time.time() < deadline, f"{left} jobs unfinished"
            time.sleep(1)
        statuses = dict(conn.execute(text("SELECT status, count(*) FROM jobs WHERE id = ANY(:ids) GROUP BY status"),
                                     {"ids": all_ids}).all())
        assert statuses == {"succeeded": 200}
        rows = conn.execute(text(
            "SELECT t.job_id, j.team_id, t.to_status, t.at FROM job_transitions t JOIN jobs j ON j.id = t.job_id "
            "WHERE t.job_id = ANY(:ids) ORDER BY t.at, t.id"), {"ids": all_ids}).all()
    runs = defaultdict(int)
    for job_id, _, to, _ in rows:
        runs[job_id] += to == "running"
    assert set(runs.values()) == {1}  # none ran twice
    active: dict[str, int] = defaultdict(int)
    peak: dict[str, int] = defaultdict(int)
    for _, team, to, _ in rows:  # replay the history in order: concurrent running jobs per team
        if to == "running":
            active[team] += 1
            peak[team] = max(peak[team], active[team])
        elif to in ("succeeded", "failed", "cancelled", "queued"):
            active[team] -= 1
    assert set(peak.values()) == {1}, peak
