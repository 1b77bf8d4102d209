"""The job state machine: one table of allowed moves and the one function that writes job status.

Every status change, from the API (cancel) or the worker (claim, finish, hand back), goes through
:func:`transition`, which locks the row, checks ``ALLOWED``, applies the change with a guarded UPDATE
and writes a history row, all in the caller's transaction. A refused move is data, not an exception.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from store.models import Job, JobStatus, JobTransition, new_id, utcnow

TERMINAL: frozenset[JobStatus] = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    # queued -> failed: attempts exhausted or the model vanished before a worker got to it.
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.cancelled, JobStatus.failed}),
    # running -> queued: the worker was lost (reaper) or shut down warm and handed the job back.
    JobStatus.running: frozenset(
        {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled, JobStatus.queued}
    ),
    JobStatus.succeeded: frozenset(),
    JobStatus.failed: frozenset(),
    JobStatus.cancelled: frozenset(),
}


@dataclass(frozen=True)
class TransitionResult:
    accepted: bool
    job_id: str
    from_status: JobStatus | None
    to_status: JobStatus
    reason: str | None = None
    attempt_id: str | None = None


def transition(
    session: Session,
    job_id: str,
    to: JobStatus,
    *,
    reason: str | None = None,
    attempt_id: str | None = None,
    expect_attempt: str | None = None,
    error: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> TransitionResult:
    """Move a job to ``to`` if the table allows it; flush, the caller commits.

    Args:
        session: open session; the row lock lasts until the caller's commit.
        job_id: the job.
        to: target status.
        reason: human-readable why, stored in the history row.
        attempt_id: for ``queued -> running`` a fresh id is made when None; returned in the result.
        expect_attempt: guard against a stale worker: only the holder of the current attempt may
            finish or hand back a running job (a reaped worker that wakes up must not overwrite).
        error: ``{code, message}`` for failed/cancelled jobs.
        metrics: final metrics for succeeded jobs.

    Returns:
        TransitionResult with ``accepted`` False and a reason when the move is not allowed.
    """
    to = JobStatus(to)
    # Lock the row: the API (cancel), a worker (claim) and the reaper may race on it.
    job = session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one_or_none()
    if job is None:
        return TransitionResult(False, job_id, None, to, "job not found")
    current = JobStatus(job.status)
    if to not in ALLOWED[current]:
        return TransitionResult(False, job_id, current, to, f"{current.value} -> {to.value} is not allowed")
    if expect_attempt is not None and job.attempt_id != expect_attempt:
        # Guard: stale_attempt — a worker whose attempt was reaped and re-queued must not write.
        return TransitionResult(False, job_id, current, to, "stale attempt")

    now: datetime = utcnow()
    values: dict[str, Any] = {"status": to.value, "updated_at": now}
    if to is JobStatus.running:
        attempt_id = attempt_id or new_id()
        values.update(attempts=Job.attempts + 1, attempt_id=attempt_id, started_at=now, heartbeat_at=now)
    elif to is JobStatus.queued:
        values.update(attempt_id=None, heartbeat_at=None, enqueued_at=None)
    if to in TERMINAL:
        values.update(finished_at=now)
    if error is not None:
        values["error"] = error
    if metrics is not None:
        values["metrics"] = metrics

    # Guarded UPDATE: even where FOR UPDATE is a no-op (SQLite), the status check is atomic.
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.status == current.value).values(**values)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        return TransitionResult(False, job_id, current, to, "lost a race on the job row")
    session.add(
        JobTransition(
            job_id=job_id, from_status=current.value, to_status=to.value, reason=reason,
            attempt_id=attempt_id if to is JobStatus.running else (expect_attempt or job.attempt_id),
        )
    )
    session.flush()
    session.refresh(job)
    return TransitionResult(True, job_id, current, to, reason, attempt_id if to is JobStatus.running else None)
