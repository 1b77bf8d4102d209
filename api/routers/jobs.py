"""/v1/jobs: create (validated, idempotent), list, detail, cancel, artifact download."""
from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import JobDep, SessionDep, SettingsDep, StoreDep, TeamDep, load_owned_job, team_from_header
from api.errors import COMMON_PROBLEMS, Problem, not_found, problem_responses
from api.pagination import paginate
from api.schemas import JobCreate, JobList, JobPublic
from api.services import create_job
from store.db import read_session_factory
from store.dispatch import dispatch
from store.jobs import request_cancel
from store.models import Artifact, Job, JobStatus
from store.settings import Settings

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=COMMON_PROBLEMS)
log = logging.getLogger(__name__)


def _public(job: Job) -> dict:
    return JobPublic.model_validate(job).model_dump(mode="json")


def _dispatch_team(session: Session, settings: Settings, team_id: str) -> None:
    """Send the team's deferred jobs that fit its free slots. The request's own change is committed
    already, so trouble here (database gone) leaves them to the sweeper rather than failing the request."""
    try:
        dispatch(session, settings, [team_id])
    except Exception as e:
        session.rollback()
        log.warning("dispatch for team %s left to the sweeper: %s", team_id, e)


@router.post("", status_code=202, response_model=JobPublic, responses=problem_responses(413, 429))
def submit_job(body: JobCreate, team: TeamDep, session: SessionDep, settings: SettingsDep,
               idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JSONResponse:
    """Validate and queue a job; 202 with ``Location``. The row is committed before the task is sent."""
    job, created = create_job(session=session, team=team, body=body, idempotency_key=idempotency_key,
                              settings=settings)
    session.commit()
    if created:
        # Sent now only if the team has a free in-flight slot (its older deferred jobs go first).
        _dispatch_team(session, settings, team.id)
    session.refresh(job)
    return JSONResponse(_public(job), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("", response_model=JobList)
def list_jobs(team: TeamDep, session: SessionDep, limit: Annotated[int, Query(ge=1, le=100)] = 20,
              cursor: str | None = None, status: JobStatus | None = None, model_id: str | None = None) -> dict:
    """List the team's jobs, newest first; filter by status or model."""
    stmt = select(Job).where(Job.team_id == team.id)
    if status is not None:
        stmt = stmt.where(Job.status == status.value)
    if model_id is not None:
        stmt = stmt.where(Job.model_id == model_id)
    items, nxt = paginate(session, stmt, Job, limit, cursor)
    return {"items": [_public(j) for j in items], "next_cursor": nxt}


def _job_for(settings: Settings, authorization: str, job_id: str) -> dict:
    """Authenticate and load the job in one session and one thread-pool call (see :func:`get_job`)."""
    with read_session_factory(settings)() as session:
        return _public(load_owned_job(session, team_from_header(session, authorization), job_id))


@router.get("/{job_id}", response_model=JobPublic)
async def get_job(job_id: str, request: Request) -> JSONResponse:
    """Status, progress, attempts, error, metrics and artifacts."""
    # The hot path of every client's polling: one thread hop and one session for auth + load, instead of
    # one per dependency, and no second validation of what _public already validated.
    body = await run_in_threadpool(_job_for, request.app.state.settings, request.headers.get("authorization", ""),
                                   job_id)
    return JSONResponse(body)


@router.post("/{job_id}/cancel", response_model=JobPublic, status_code=202, responses=problem_responses(409))
def cancel_job(job: JobDep, session: SessionDep, settings: SettingsDep) -> dict:
    """Cancel: a queued job at once; a running one stops at its next step or epoch."""
    if job.status not in (JobStatus.queued.value, JobStatus.running.value):
        raise Problem(409, "conflict", "job already finished", f"the job is {job.status}")
    was_queued = job.status == JobStatus.queued.value
    request_cancel(session, job)
    session.commit()
    if was_queued:  # its in-flight slot (if it had one) is free at once: hand it on
        _dispatch_team(session, settings, job.team_id)
    session.refresh(job)
    return _public(job)


@router.get("/{job_id}/artifacts/{name}")
def download_artifact(job: JobDep, name: str, session: SessionDep, store: StoreDep) -> StreamingResponse:
    """Download an artifact (``model.onnx``, ``report.json``, per-step models)."""
    art = session.execute(select(Artifact).where(Artifact.job_id == job.id, Artifact.name == name)).scalar_one_or_none()
    if art is None:
        raise not_found("artifact")
    media = "application/json" if name.endswith(".json") else "application/octet-stream"
    return StreamingResponse(store.iter_bytes(art.storage_key), media_type=media,
                             headers={"Content-Disposition": f'attachment; filename="{art.name}"',
                                      "Content-Length": str(art.size_bytes), "ETag": f'"{art.sha256}"'})
