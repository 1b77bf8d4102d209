"""Service functions behind the routes: plain, keyword-only; they flush, the route commits."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import Problem, validation_errors
from api.schemas import JobCreate
from api.uploads import Upload
from compression.archives import check_zip_directory
from compression.data import check_against_model, check_npz_data, inspect_npz
from compression.errors import InvalidDataset, InvalidModel, InvalidSpec
from compression.modelio import describe, read_upload, save, uses_external_data
from compression.spec import ParsedSpec, parse_spec
from store.artifacts import LocalArtifactStore
from store.jobs import mark_enqueued
from store.models import DatasetRecord, Job, JobStatus, ModelRecord, Team, new_id
from store.queue import send_job
from store.settings import Settings

log = logging.getLogger(__name__)


def ingest_model(*, upload: Upload, settings: Settings, store: LocalArtifactStore) -> dict[str, Any]:
    """Validate an uploaded model and put its ONNX into the store; returns the row's fields.

    Runs in a worker thread (ONNX parsing and an ORT load are CPU work).
    """
    check_zip_directory(upload.path, max_bytes=settings.max_zip_directory_bytes, error=InvalidModel)
    loaded = read_upload(upload.path, upload.filename, upload.folder, max_unpacked_bytes=settings.max_upload_bytes * 4,
                         lazy_above=settings.model_inline_max_bytes, max_ratio=settings.max_unzipped_ratio)
    info = describe(loaded.model)
    if info["params"] > settings.max_model_params:
        raise Problem(413, "too_large", "model too large", f"{info['params']} params; limit {settings.max_model_params}")
    model_id = new_id()
    key = f"models/{model_id}/model.onnx"
    if loaded.format == "onnx":
        store.put_file(key, upload.path)  # keep the user's bytes exactly
    elif loaded.format == "onnx_zip" and uses_external_data(loaded.model):
        # weights never loaded here: the validated zip itself is stored, and opened by load_stored
        key = f"models/{model_id}/model.zip"
        store.put_file(key, upload.path)
    else:
        files = save(loaded.model, upload.folder / "model.onnx")
        if len(files) > 1:
            raise Problem(413, "too_large", "model too large", "models over 2 GB are not supported yet")
        store.put_file(key, files[0])
    return {"id": model_id, "format": loaded.format, "storage_key": key, "params": info["params"],
            "inputs": info["inputs"], "outputs": info["outputs"]}


def ingest_dataset(*, upload: Upload, settings: Settings, store: LocalArtifactStore) -> dict[str, Any]:
    """Check an ``.npz`` (headers first, then every array loads without pickle) and store it."""
    check_zip_directory(upload.path, max_bytes=settings.max_zip_directory_bytes, error=InvalidDataset)
    arrays = inspect_npz(upload.path, max_uncompressed_bytes=settings.max_npz_uncompressed_bytes,
                         max_ratio=settings.max_unzipped_ratio)
    check_npz_data(upload.path)
    ds_id = new_id()
    key = f"datasets/{ds_id}/data.npz"
    store.put_file(key, upload.path)
    samples = next(iter(arrays.values()))["shape"][0]
    return {"id": ds_id, "storage_key": key, "arrays": arrays, "samples": samples}


def _search_needs(spec: ParsedSpec, dataset: DatasetRecord | None) -> list[dict]:
    """A search's own data needs: an accuracy target needs labels; a searched value may add training."""
    from compression.data import LABELS
    from compression.search_space import TargetSpec

    errors = []
    target = spec.target or TargetSpec()
    has_labels = dataset is not None and LABELS in (dataset.arrays or {})
    if target.metric == "accuracy" and not has_labels:
        errors.append({"loc": ["target", "metric"],
                       "msg": "accuracy needs a dataset with labels: upload one, or use agreement or output_cosine"})
    if dataset is None:
        cand = next((c for c in spec.candidates() if c.data_steps), None)
        if cand is not None:
            i = cand.data_steps[0]
            errors.append({"loc": ["search"], "msg": f"candidate {cand.values} makes step {i} "
                                                     f"({cand.steps[i]['method']}) train: it needs a dataset"})
    return errors


def validate_job(*, session: Session, team: Team, body: JobCreate) -> tuple[ModelRecord, DatasetRecord | None, dict]:
    """Everything that can be checked before queueing: ownership, spec, dataset vs model inputs."""
    model = session.get(ModelRecord, body.model_id)
    if model is None or model.team_id != team.id:
        raise Problem(404, "not_found", "model not found", "no model with this id in your team",
                      [{"path": "$.model_id", "loc": ["model_id"], "message": "not found"}])
    dataset = None
    if body.dataset_id:
        dataset = session.get(DatasetRecord, body.dataset_id)
        if dataset is None or dataset.team_id != team.id:
            raise Problem(404, "not_found", "dataset not found", "no dataset with this id in your team",
                          [{"path": "$.dataset_id", "loc": ["dataset_id"], "message": "not found"}])
    try:
        spec = parse_spec(body.spec)
    except InvalidSpec as e:
        raise Problem(422, "invalid_spec", "invalid spec", str(e), validation_errors(["spec"], e.errors)) from None
    if dataset is not None:
        problems = check_against_model(dataset.arrays, model.inputs)
        if problems:
            raise Problem(422, "dataset_mismatch", "dataset does not fit the model", "; ".join(problems),
                          [{"path": "$.dataset_id", "loc": ["dataset_id"], "message": p} for p in problems])
    errors = []
    for i, step in enumerate(spec.steps):
        if getattr(step, "needs_data", False) and dataset is None:
            errors.append({"loc": ["steps", i], "msg": f"{step.method} with these settings needs a dataset"})
    if spec.is_search and not errors:
        errors.extend(_search_needs(spec, dataset))
    if errors:
        raise Problem(422, "invalid_spec", "invalid spec", "a step needs a dataset", validation_errors(["spec"], errors))
    missing = []  # model ids named inside steps (teachers, students, rewind inits): this team's only
    for i, step in enumerate(spec.steps):
        for loc, ref in getattr(step, "model_refs", []):
            rec = session.get(ModelRecord, ref)
            if rec is None or rec.team_id != team.id:
                missing.append({"loc": ["steps", i, *loc], "msg": f"no model {ref!r} in your team"})
    if missing:
        raise Problem(404, "not_found", "model not found", "a model id in the spec is not a model of your team",
                      validation_errors(["spec"], missing))
    return model, dataset, spec.to_json()


def create_job(*, session: Session, team: Team, body: JobCreate, idempotency_key: str | None) -> tuple[Job, bool]:
    """Insert a queued job (or return the one made with the same Idempotency-Key). Returns (job, created)."""
    if idempotency_key:
        existing = session.execute(
            select(Job).where(Job.team_id == team.id, Job.idempotency_key == idempotency_key)
        ).scalar_one_or_none()
        if existing is not None:
            return existing, False
    model, dataset, spec = validate_job(session=session, team=team, body=body)
    job = Job(team_id=team.id, model_id=model.id, dataset_id=dataset.id if dataset else None, name=body.name,
              spec=spec, status=JobStatus.queued.value, progress={"phase": "queued", "fraction": 0.0},
              idempotency_key=idempotency_key)
    session.add(job)
    try:
        session.flush()
    except IntegrityError:  # a concurrent request with the same Idempotency-Key won
        session.rollback()
        existing = session.execute(
            select(Job).where(Job.team_id == team.id, Job.idempotency_key == idempotency_key)
        ).scalar_one()
        return existing, False
    return job, True


def enqueue(*, session: Session, job_id: str, settings: Settings) -> bool:
    """Send the committed job to the broker; on broker trouble the sweeper sends it later."""
    try:
        send_job(job_id, settings)
    except Exception as e:
        log.warning("broker unavailable, job %s stays queued for the sweeper: %s", job_id, e)
        return False
    mark_enqueued(session, job_id)
    session.commit()
    return True


def remove_files(store: LocalArtifactStore, keys: list[str]) -> None:
    for k in keys:
        store.delete(k)
        parent = str(Path(k).parent)
        if parent not in ("", "."):
            store.delete_prefix(parent)
