"""Dependencies: settings, a DB session per request, the caller's team, fetch-or-404 lookups."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, joinedload

from api.errors import Problem, not_found
from store.artifacts import ArtifactStore, get_artifact_store
from store.auth import authenticate
from store.db import session_factory
from store.models import DatasetRecord, Job, ModelRecord, Team
from store.settings import Settings


def settings_dep(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(settings_dep)]


def session_dep(settings: SettingsDep) -> Iterator[Session]:
    session = session_factory(settings)()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(session_dep)]


def store_dep(settings: SettingsDep) -> ArtifactStore:
    return get_artifact_store(settings)


StoreDep = Annotated[ArtifactStore, Depends(store_dep)]


def team_dep(request: Request, session: SessionDep) -> Team:
    """The caller's team from ``Authorization: Bearer <key>``; 401 otherwise."""
    team = team_from_header(session, request.headers.get("authorization", ""))
    _release(session)
    return team


def team_from_header(session: Session, header: str) -> Team:
    """The team of the ``Authorization`` header's key; raises a 401 problem for none, unknown or revoked."""
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Problem(401, "unauthorized", "missing API key", "send Authorization: Bearer <key>",
                      headers={"WWW-Authenticate": "Bearer"})
    team = authenticate(session, key.strip())
    if team is None:
        raise Problem(401, "unauthorized", "invalid API key", "the key is unknown or revoked",
                      headers={"WWW-Authenticate": "Bearer"})
    return team


TeamDep = Annotated[Team, Depends(team_dep)]


def _release(session: Session) -> None:
    """End the read transaction so the connection goes back to the pool between dependencies.

    FastAPI runs each sync dependency and the endpoint as separate thread-pool calls. A request that
    kept its connection while waiting for the next thread could hold all of the pool while every thread
    waited for a connection: under 50 concurrent clients the API stalled for the pool timeout (30 s per
    request, measured). Loaded objects stay usable (``expire_on_commit=False``).
    """
    session.commit()


def owned_model(model_id: str, team: TeamDep, session: SessionDep) -> ModelRecord:
    m = session.get(ModelRecord, model_id)
    _release(session)
    if m is None or m.team_id != team.id:
        raise not_found("model")  # another team's model is a 404, never a 403
    return m


def owned_dataset(dataset_id: str, team: TeamDep, session: SessionDep) -> DatasetRecord:
    d = session.get(DatasetRecord, dataset_id)
    _release(session)
    if d is None or d.team_id != team.id:
        raise not_found("dataset")
    return d


def load_owned_job(session: Session, team: Team, job_id: str) -> Job:
    """The team's job with its artifacts (one query); another team's job is a 404, like a missing one."""
    j = session.get(Job, job_id, options=[joinedload(Job.artifacts)])
    if j is None or j.team_id != team.id:
        raise not_found("job")
    return j


def owned_job(job_id: str, team: TeamDep, session: SessionDep) -> Job:
    j = load_owned_job(session, team, job_id)
    _release(session)
    return j


ModelDep = Annotated[ModelRecord, Depends(owned_model)]
DatasetDep = Annotated[DatasetRecord, Depends(owned_dataset)]
JobDep = Annotated[Job, Depends(owned_job)]
