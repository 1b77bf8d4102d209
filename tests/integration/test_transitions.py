"""The job state machine on real PostgreSQL and on SQLite: the table, the guards, the history."""
from __future__ import annotations

import pytest
from sqlalchemy import select

from store.db import session_factory
from store.migrate import upgrade
from store.models import Job, JobStatus, JobTransition, ModelRecord, Team
from store.settings import Settings
from store.transitions import ALLOWED, TERMINAL, transition


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request, tmp_path, monkeypatch):
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path / 'nc.db'}"
    monkeypatch.setenv("NETCOMPRESS_DATABASE_URL", url)
    monkeypatch.setenv("NETCOMPRESS_HOME", str(tmp_path))
    from store.settings import get_settings

    get_settings.cache_clear()
    upgrade()
    settings = Settings()
    yield session_factory(settings)
    get_settings.cache_clear()


def _job(factory) -> str:
    with factory() as s:
        team = Team(name=f"t-{id(s)}")
        s.add(team)
        s.flush()
        m = ModelRecord(team_id=team.id, name="m", format="onnx", sha256="0" * 64, size_bytes=1, params=1,
                        inputs=[], outputs=[], storage_key="models/x/model.onnx")
        s.add(m)
        s.flush()
        j = Job(team_id=team.id, model_id=m.id, spec={"steps": []}, queue="netcompress")
        s.add(j)
        s.commit()
        return j.id


def test_table_is_complete_and_terminal_states_are_final():
    assert set(ALLOWED) == set(JobStatus)
    for t in TERMINAL:
        assert ALLOWED[t] == frozenset()


def test_claim_finish_and_history(db):
    job_id = _job(db)
    with db() as s:
        claim = transition(s, job_id, JobStatus.running, reason="claim")
        s.commit()
    assert claim.accepted and claim.attempt_id
    with db() as s:
        # Guard: redelivered_task — a second claim of a running job is refused, as data.
        again = transition(s, job_id, JobStatus.running, reason="claim again")
        assert not again.accepted and "not allowed" in again.reason
        # Guard: stale_attempt — only the holder of the attempt may finish.
        stale = transition(s, job_id, JobStatus.succeeded, expect_attempt="someone-else")
        assert not stale.accepted and stale.reason == "stale attempt"
        done = transition(s, job_id, JobStatus.succeeded, expect_attempt=claim.attempt_id, metrics={"x": 1})
        assert done.accepted
        s.commit()
    with db() as s:
        job = s.get(Job, job_id)
        assert job.status == "succeeded" and job.attempts == 1 and job.metrics == {"x": 1} and job.finished_at
        hist = s.execute(select(JobTransition.from_status, JobTransition.to_status)
                         .where(JobTransition.job_id == job_id).order_by(JobTransition.id)).all()
        assert [tuple(h) for h in hist] == [("queued", "running"), ("running", "succeeded")]
        assert not transition(s, job_id, JobStatus.cancelled).accepted


def test_lost_worker_requeue_counts_attempts(db):
    job_id = _job(db)
    with db() as s:
        a1 = transition(s, job_id, JobStatus.running).attempt_id
        assert transition(s, job_id, JobStatus.queued, reason="heartbeat stopped", expect_attempt=a1).accepted
        a2 = transition(s, job_id, JobStatus.running).attempt_id
        s.commit()
    assert a1 != a2
    with db() as s:
        assert s.get(Job, job_id).attempts == 2
        # The first worker wakes up late: its finish is refused.
        assert not transition(s, job_id, JobStatus.succeeded, expect_attempt=a1).accepted


def test_unknown_job_is_rejected_not_raised(db):
    with db() as s:
        res = transition(s, "nope", JobStatus.running)
    assert not res.accepted and res.reason == "job not found"
