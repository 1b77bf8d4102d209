"""Issue 11, fair queues: a team's queue is capped (429 + Retry-After), and one team's backlog does not
stand between another team's job and the worker — the broker holds at most a team's running quota of its
messages, and freed slots go round-robin across teams.

One worker, a running quota of 1 and a queue cap of 4, on a database of its own (another stack's sweeper
would dispatch these jobs to its own queue).
"""
from __future__ import annotations

from datetime import datetime

import pytest

from testkit.stack import fresh_database, start_stack, tiny_classifier, upload, wait_job

CAP = 4
SPEC = {"steps": [{"method": "prune", "sparsity": 0.2}], "eval": {"latency_runs": 5}}


@pytest.fixture(scope="module")
def fair(pg_url, redis_url, tmp_path_factory):  # pg_url: skip (or fail under CI) without PostgreSQL
    with fresh_database("nc_fair") as url:
        stack = start_stack(tmp_path_factory.mktemp("fair"), database_url=url, broker_url=redis_url,
                            NETCOMPRESS_MAX_QUEUED_PER_TEAM=str(CAP), NETCOMPRESS_TEAM_MAX_RUNNING_JOBS="1")
        try:
            yield stack
        finally:
            stack.stop()


def _submit(client, model_id: str) -> str:
    r = client.post("/v1/jobs", json={"model_id": model_id, "spec": SPEC})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_second_team_starts_before_the_first_teams_backlog_and_the_queue_is_capped(fair, tmp_path):
    onnx_path, _ = tiny_classifier(tmp_path)
    a, b = fair.client(), fair.client(fair.new_key("team-b"))
    model_a, model_b = upload(a, onnx_path)["id"], upload(b, onnx_path)["id"]
    with fair.paused("phase:loading") as pause:
        first = _submit(a, model_a)
        pause.wait(a, first)  # A's first job holds the only worker while the rest is submitted
        backlog = [_submit(a, model_a) for _ in range(CAP)]

        # one more than the cap: 429 problem+json with Retry-After, and nothing created
        r = a.post("/v1/jobs", json={"model_id": model_a, "spec": SPEC})
        assert r.status_code == 429 and r.headers["content-type"] == "application/problem+json", r.text
        problem = r.json()
        assert problem["code"] == "too_many_queued" and problem["status"] == 429
        assert problem["type"] == "/problems/too_many_queued" and str(CAP) in problem["detail"]
        assert int(r.headers["Retry-After"]) > 0
        assert {j["id"] for j in a.get("/v1/jobs", params={"limit": 100}).json()["items"]} == {first, *backlog}

        # another team's queue is its own
        other = _submit(b, model_b)

    jobs = {j: wait_job(a if j != other else b, j, timeout=300) for j in [first, *backlog, other]}
    assert {j["status"] for j in jobs.values()} == {"succeeded"}, jobs
    started = sorted(jobs, key=lambda j: datetime.fromisoformat(jobs[j]["started_at"]))
    # B's job was sent at once; A's backlog was deferred and sent one at a time, as A's slot freed
    assert started == [first, other, *backlog], {j: jobs[j]["started_at"] for j in started}

    # the queue has room again: the request refused above is accepted now
    assert wait_job(a, _submit(a, model_a), timeout=300)["status"] == "succeeded"
