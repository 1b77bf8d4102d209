"""Fair dispatch: which queued jobs get a broker message now.

The broker is FIFO. Were every job sent at submit, one team's 40 queued jobs would stand between a second
team's job and the only worker. So a team has at most its running quota of jobs *in flight* (running, or
sent and not yet running); its other queued jobs wait in the database with ``enqueued_at`` NULL
("deferred") and are sent when a slot frees: at submit, when a job ends, and by the sweeper —
round-robin across teams, oldest first within a team. A duplicate message stays harmless (the claim
guard drops it), so a lost one can always be sent again. A message goes to the queue stored on the job
row at submit (``Job.queue``).
"""
from __future__ import annotations

import logging
from itertools import chain, zip_longest

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from store.jobs import defer
from store.models import Job, JobStatus, Team, utcnow
from store.queue import send_job
from store.settings import Settings

log = logging.getLogger(__name__)

_QUEUED, _RUNNING = JobStatus.queued.value, JobStatus.running.value
_DEFERRED = and_(Job.status == _QUEUED, Job.enqueued_at.is_(None))


def running_quota(team: Team, settings: Settings) -> int:
    """The team's concurrency quota: its own override, else ``NETCOMPRESS_TEAM_MAX_RUNNING_JOBS``."""
    return team.max_running_jobs or settings.team_max_running_jobs


def in_flight(session: Session, team_ids: list[str]) -> dict[str, int]:
    """Per team: jobs running plus jobs sent to the broker and not yet claimed."""
    rows = session.execute(
        select(Job.team_id, func.count()).where(
            Job.team_id.in_(team_ids),
            or_(Job.status == _RUNNING, and_(Job.status == _QUEUED, Job.enqueued_at.is_not(None))),
        ).group_by(Job.team_id)
    ).all()
    return dict(rows)


def _reserve(session: Session, job_id: str) -> bool:
    """Mark a deferred job as sent; False when another dispatcher took it or it left ``queued`` meanwhile."""
    res = session.execute(update(Job).where(Job.id == job_id, _DEFERRED).values(enqueued_at=utcnow())
                          .execution_options(synchronize_session=False))
    return res.rowcount == 1


def reserve_deferred(session: Session, settings: Settings,
                     team_ids: list[str] | None = None) -> list[tuple[str, str]]:
    """Mark as sent the deferred jobs that fit their team's free slots; ``(job id, queue)`` in the order to
    send them.

    Round-robin across teams (the team whose oldest deferred job waited longest first), oldest first
    within a team. ``team_ids`` limits it to those teams (a submit); None: every team. The caller commits,
    *then* sends (a message never names an uncommitted reservation).
    """
    stmt = select(Job.team_id).where(_DEFERRED).distinct()
    if team_ids is not None:
        stmt = stmt.where(Job.team_id.in_(team_ids))
    waiting = sorted(session.execute(stmt).scalars())
    if not waiting:
        return []
    # Lock the teams (in id order, so two dispatchers never deadlock): API nodes, a finishing job and the
    # sweeper may dispatch at once, and must not both fill a team's last slot. The claim locks it too.
    # (SQLite ignores FOR UPDATE: there the guarded reservation stops duplicates and the claim's quota guard
    # holds the running quota.)
    teams = session.execute(select(Team).where(Team.id.in_(waiting)).order_by(Team.id).with_for_update()).scalars().all()
    busy = in_flight(session, waiting)
    per_team: list[list[tuple]] = []
    for team in teams:
        free = running_quota(team, settings) - busy.get(team.id, 0)
        if free > 0:
            rows = session.execute(select(Job.id, Job.queue, Job.created_at)
                                   .where(Job.team_id == team.id, _DEFERRED)
                                   .order_by(Job.created_at, Job.id).limit(free)).all()
            if rows:
                per_team.append(rows)
    per_team.sort(key=lambda rows: rows[0].created_at)
    order = [(row.id, row.queue) for row in chain.from_iterable(zip_longest(*per_team)) if row is not None]
    return [(job_id, queue) for job_id, queue in order if _reserve(session, job_id)]


def send_reserved(session: Session, reserved: list[tuple[str, str]], settings: Settings) -> list[str]:
    """Send reserved ``(job id, queue)`` in order; on broker trouble the rest go back to deferred for the
    sweeper. Returns the ids sent."""
    for i, (job_id, queue) in enumerate(reserved):
        try:
            send_job(job_id, queue, settings)
        except Exception as e:  # broker down: a later dispatch (the sweeper's) tries again
            log.warning("could not send job %s: %s", job_id, e)
            for unsent, _ in reserved[i:]:
                defer(session, unsent)
            session.commit()
            return [job_id for job_id, _ in reserved[:i]]
    return [job_id for job_id, _ in reserved]


def dispatch(session: Session, settings: Settings, team_ids: list[str] | None = None) -> list[str]:
    """Send the deferred jobs that fit their team's free slots; returns the ids sent. Commits ``session``."""
    reserved = reserve_deferred(session, settings, team_ids)
    session.commit()  # the reservation is durable before the message exists
    return send_reserved(session, reserved, settings) if reserved else []
