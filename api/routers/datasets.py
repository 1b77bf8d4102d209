"""/v1/datasets: .npz upload (streamed, no pickles), list, detail, delete."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from sqlalchemy import select, update

from api.deps import DatasetDep, SessionDep, SettingsDep, StoreDep, TeamDep
from api.errors import COMMON_PROBLEMS, Problem, multipart_upload_body, problem_responses
from api.pagination import paginate
from api.schemas import DatasetList, DatasetPublic
from api.services import ingest_dataset
from api.uploads import receive_upload
from store.models import DatasetRecord, Job, JobStatus

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=COMMON_PROBLEMS)


@router.post("", status_code=201, openapi_extra=multipart_upload_body(".npz: arrays named after the model inputs, optional labels"),
             responses=problem_responses(400, 413, 415), response_model=DatasetPublic)
async def upload_dataset(request: Request, team: TeamDep, session: SessionDep, settings: SettingsDep,
                         store: StoreDep) -> DatasetRecord:
    """Upload an ``.npz``: arrays named after the model's inputs (first axis = samples), optional ``labels``."""
    up = await receive_upload(request, settings=settings)
    try:
        fields = await run_in_threadpool(ingest_dataset, upload=up, settings=settings, store=store)
    finally:
        up.cleanup()
    name = (up.fields.get("name") or up.filename or "dataset")[:200]
    rec = DatasetRecord(team_id=team.id, name=name, sha256=up.sha256, size_bytes=up.size, **fields)
    session.add(rec)
    try:
        session.commit()
    except Exception:
        store.delete_prefix(f"datasets/{fields['id']}")
        raise
    return rec


@router.get("", response_model=DatasetList)
def list_datasets(team: TeamDep, session: SessionDep, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                  cursor: str | None = None) -> dict:
    """List the team's datasets, newest first."""
    items, nxt = paginate(session, select(DatasetRecord).where(DatasetRecord.team_id == team.id), DatasetRecord,
                          limit, cursor)
    return {"items": items, "next_cursor": nxt}


@router.get("/{dataset_id}", response_model=DatasetPublic)
def get_dataset(dataset: DatasetDep) -> DatasetRecord:
    """One dataset."""
    return dataset


@router.delete("/{dataset_id}", status_code=204, responses=problem_responses(409))
def delete_dataset(dataset: DatasetDep, session: SessionDep, store: StoreDep) -> Response:
    """Delete a dataset; refused while a queued/running job uses it."""
    active = session.execute(select(Job.id).where(
        Job.dataset_id == dataset.id, Job.status.in_([JobStatus.queued.value, JobStatus.running.value]))).first()
    if active:
        raise Problem(409, "conflict", "dataset in use", "cancel or wait for its queued/running jobs first")
    session.execute(update(Job).where(Job.dataset_id == dataset.id).values(dataset_id=None))
    session.delete(dataset)
    session.commit()
    store.delete_prefix(f"datasets/{dataset.id}")
    return Response(status_code=204)
