"""/v1/models: upload (streamed), list, detail, download, delete."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from sqlalchemy import select

from api.deps import ModelDep, SessionDep, SettingsDep, StoreDep, TeamDep
from api.errors import COMMON_PROBLEMS, Problem, multipart_upload_body, problem_responses
from api.pagination import paginate
from api.schemas import ModelList, ModelPublic
from api.services import ingest_model
from api.uploads import receive_upload
from store.models import Job, JobStatus, ModelRecord

router = APIRouter(prefix="/v1/models", tags=["models"], responses=COMMON_PROBLEMS)


@router.post("", status_code=201, openapi_extra=multipart_upload_body("ONNX, a .zip of ONNX + external data, or a torch.export .pt2"),
             responses=problem_responses(400, 413, 415), response_model=ModelPublic)
async def upload_model(request: Request, team: TeamDep, session: SessionDep, settings: SettingsDep,
                       store: StoreDep) -> ModelRecord:
    """Upload ONNX, a .zip of ONNX + external data, or a torch.export .pt2 (multipart field ``file``)."""
    up = await receive_upload(request, settings=settings)
    try:
        fields = await run_in_threadpool(ingest_model, upload=up, settings=settings, store=store)
    finally:
        up.cleanup()
    name = (up.fields.get("name") or up.filename or "model")[:200]
    rec = ModelRecord(team_id=team.id, name=name, sha256=up.sha256, size_bytes=up.size, **fields)
    session.add(rec)
    try:
        session.commit()
    except Exception:
        store.delete_prefix(f"models/{fields['id']}")  # no row, no file
        raise
    return rec


@router.get("", response_model=ModelList)
def list_models(team: TeamDep, session: SessionDep, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                cursor: str | None = None) -> dict:
    """List the team's models, newest first."""
    items, nxt = paginate(session, select(ModelRecord).where(ModelRecord.team_id == team.id), ModelRecord, limit, cursor)
    return {"items": items, "next_cursor": nxt}


@router.get("/{model_id}", response_model=ModelPublic)
def get_model(model: ModelDep) -> ModelRecord:
    """One model."""
    return model


@router.get("/{model_id}/file")
def download_model(model: ModelDep, store: StoreDep) -> StreamingResponse:
    """The model as ONNX (a .pt2 upload as the ONNX it was converted to; a .zip with external data as the
    validated .zip it was uploaded as — its weights are never loaded into the API)."""
    ext = ".zip" if model.storage_key.endswith(".zip") else ".onnx"
    return StreamingResponse(store.iter_bytes(model.storage_key), media_type="application/octet-stream",
                             headers={"Content-Disposition": f'attachment; filename="{model.id}{ext}"',
                                      "ETag": f'"{model.sha256}"'})


@router.delete("/{model_id}", status_code=204, responses=problem_responses(409))
def delete_model(model: ModelDep, session: SessionDep, store: StoreDep) -> Response:
    """Delete a model, its finished jobs and their artifacts; refused while a job of it is active."""
    active = session.execute(select(Job.id).where(
        Job.model_id == model.id, Job.status.in_([JobStatus.queued.value, JobStatus.running.value]))).first()
    if active:
        raise Problem(409, "conflict", "model in use", "cancel or wait for its queued/running jobs first")
    job_ids = session.execute(select(Job.id).where(Job.model_id == model.id)).scalars().all()
    session.delete(model)
    session.commit()
    store.delete_prefix(f"models/{model.id}")
    for jid in job_ids:
        store.delete_prefix(f"jobs/{jid}")
    return Response(status_code=204)
