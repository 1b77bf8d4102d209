"""GET /v1/jobs/{id}/events: Server-Sent Events of a job's progress and state changes.

The API process polls the job row (~0.5 s) and sends an event when something a client shows has changed;
the stream ends after the terminal state. Each poll borrows a pooled connection for one SELECT and gives
it back, so a thousand open streams do not hold a thousand connections.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from api.deps import JobDep, SessionDep, SettingsDep
from api.errors import COMMON_PROBLEMS
from api.schemas import JobPublic
from store.db import session_factory
from store.models import Job
from store.settings import Settings

# Problem responses without a response model: FastAPI would otherwise list text/event-stream for them too.
router = APIRouter(prefix="/v1/jobs", tags=["jobs"],
                   responses={c: {k: v for k, v in r.items() if k != "model"} for c, r in COMMON_PROBLEMS.items()})

TERMINAL = {"succeeded", "failed", "cancelled"}
POLL_S = 0.5
KEEPALIVE_S = 15.0

EVENTS_DOC = """\
`text/event-stream`. Events:

- `state` — on connect and whenever status, progress, attempts, error or cancel_requested change:
  `{"id", "status", "progress": {phase, step, steps, fraction, message}, "attempts", "error", "cancel_requested", "updated_at"}`
- `done` — once, at a terminal status: the whole job (as `GET /v1/jobs/{id}`, with metrics and artifacts);
  then the stream closes.

Comment lines (`: keep-alive`) are sent every 15 s while nothing changes.
"""


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"


def _snapshot(job: Job) -> dict[str, Any]:
    return {"id": job.id, "status": job.status, "progress": job.progress or {}, "attempts": job.attempts,
            "error": job.error, "cancel_requested": job.cancel_requested, "updated_at": job.updated_at.isoformat()}


def _load(settings: Settings, job_id: str) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """The job's snapshot, plus its full public form when it is terminal; None when it is gone."""
    with session_factory(settings)() as s:
        job = s.execute(select(Job).where(Job.id == job_id)).scalar_one_or_none()
        if job is None:
            return None
        snap = _snapshot(job)
        full = JobPublic.model_validate(job).model_dump(mode="json") if job.status in TERMINAL else None
        return snap, full


def _frame(event: str, data: dict[str, Any], event_id: int) -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def job_events(request: Request, settings: Settings, job_id: str) -> AsyncIterator[str]:
    """Yield SSE frames until the job is terminal or the client goes away."""
    yield "retry: 2000\n\n"
    last: dict[str, Any] | None = None
    n = 0
    last_sent = time.monotonic()
    while True:
        loaded = await run_in_threadpool(_load, settings, job_id)
        if loaded is None:  # deleted with its model meanwhile
            n += 1
            yield _frame("gone", {"id": job_id}, n)
            return
        snap, full = loaded
        compare = {k: v for k, v in snap.items() if k != "updated_at"}  # heartbeats alone are not news
        if compare != last:
            last = compare
            n += 1
            last_sent = time.monotonic()
            yield _frame("state", snap, n)
        if full is not None:
            n += 1
            yield _frame("done", full, n)
            return
        if time.monotonic() - last_sent > KEEPALIVE_S:
            last_sent = time.monotonic()
            yield ": keep-alive\n\n"
        if await request.is_disconnected():
            return
        await asyncio.sleep(POLL_S)


@router.get("/{job_id}/events", response_class=EventStreamResponse, description=EVENTS_DOC,
            responses={200: {"description": "an event stream", "content": {"text/event-stream": {
                "schema": {"type": "string"}}}}})
def stream_job_events(job: JobDep, request: Request, session: SessionDep, settings: SettingsDep) -> EventStreamResponse:
    """Server-Sent Events of the job's progress and state changes; the stream ends at a terminal state."""
    job_id = job.id
    session.close()  # the ownership check is done: hold no connection for the life of the stream
    return EventStreamResponse(job_events(request, settings, job_id),
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
