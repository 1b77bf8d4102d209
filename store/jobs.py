"""Job bookkeeping shared by the API and the worker (progress, heartbeats, artifacts, reaper, sweeper).

Status itself is only ever written by :func:`store.transitions.transition`.
"""
from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from store.models import Artifact, Job, JobStatus, utcnow
from store.transitions import transition

log = logging.getLogger(__name__)


def report_progress(session: Session, job_id: str, attempt_id: str, progress: dict[str, Any]) -> bool:
    """Write progress and a heartbeat for the attempt that holds the job.

    Returns False when the attempt no longer holds the job or a cancel was asked for: the worker stops.
    """
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempt_id == attempt_id, Job.status == JobStatus.running.value)
        .values(progress=progress, heartbeat_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        return False
    cancel = session.execute(select(Job.cancel_requested).where(Job.id == job_id)).scalar_one()
    return not cancel


def add_artifact(
    session: Session, job_id: str, *, name: str, kind: str, size_bytes: int, sha256: str, storage_key: str
) -> Artifact:
    art = Artifact(job_id=job_id, name=name, kind=kind, size_bytes=size_bytes, sha256=sha256, storage_key=storage_key)
    session.add(art)
    session.flush()
    return art


def request_cancel(session: Session, job: Job) -> bool:
    """Cancel a queued job at once; ask a running one to stop at its next step or epoch."""
    if job.status == JobStatus.queued.value:
        res = transition(session, job.id, JobStatus.cancelled, reason="cancelled by user",
                         error={"code": "cancelled", "message": "cancelled by user"})
        return res.accepted
    if job.status == JobStatus.running.value:
        job.cancel_requested = True
        session.flush()
        return True
    return False


def reap_lost_jobs(session: Session, *, stale_after_s: float, max_attempts: int) -> list[str]:
    """Hand back running jobs whose heartbeat stopped (worker lost); fail them past ``max_attempts``.

    Returns the ids put back in the queue (deferred: the next dispatch sends them, within the team's quota).
    """
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    stale = session.execute(
        select(Job.id, Job.attempts, Job.attempt_id)
        .where(Job.status == JobStatus.running.value, Job.heartbeat_at < cutoff)
    ).all()
    requeued: list[str] = []
    for job_id, attempts, attempt_id in stale:
        if attempts >= max_attempts:
            transition(session, job_id, JobStatus.failed, reason="worker lost, attempts exhausted",
                       expect_attempt=attempt_id,
                       error={"code": "worker_lost", "message": f"worker lost {attempts} times"})
        elif transition(session, job_id, JobStatus.queued, reason="heartbeat stopped",
                        expect_attempt=attempt_id).accepted:
            requeued.append(job_id)
    return requeued


def lost_messages(session: Session, *, resend_after_s: float) -> list[tuple[str, str]]:
    """Queued jobs sent so long ago that the message was probably lost (a broker restart), as
    ``(job id, queue)``: send them again.

    They still hold their in-flight slot, so re-sending does not go past the team's quota; a duplicate
    message is harmless (the claim guard drops it). Deferred jobs (never sent) are ``store.dispatch``'s.
    """
    cutoff = utcnow() - timedelta(seconds=resend_after_s)
    rows = session.execute(
        select(Job.id, Job.queue).where(Job.status == JobStatus.queued.value, Job.enqueued_at < cutoff)
        .order_by(Job.created_at)
    ).all()
    return [(job_id, queue) for job_id, queue in rows]


def defer(session: Session, job_id: str) -> None:
    """A quota kept this job waiting (or its message could not be sent): forget its message so the next
    dispatch (a finishing job's, the sweeper's) sends it again."""
    session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.queued.value)
                    .values(enqueued_at=None, updated_at=utcnow()).execution_options(synchronize_session=False))


def running_count(session: Session, team_id: str) -> int:
    from sqlalchemy import func

    return session.execute(select(func.count()).select_from(Job).where(
        Job.team_id == team_id, Job.status == JobStatus.running.value)).scalar_one()


def mark_enqueued(session: Session, job_id: str) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow())
                    .execution_options(synchronize_session=False))
