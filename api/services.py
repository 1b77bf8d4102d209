"""Service functions behind the routes: plain, keyword-only; they flush, the route commits."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import Problem, validation_errors
from api.schemas import JobCreate
from api.uploads import Upload
from compression import sandbox
from compression.archives import check_zip_directory
from compression.data import check_against_model, check_npz_data, inspect_npz
from compression.errors import InvalidDataset, InvalidModel, InvalidSpec
from compression.search_space import search_model_refs
from compression.spec import ParsedSpec, parse_spec
from store.artifacts import ArtifactStore
from store.models import DatasetRecord, Job, JobStatus, ModelRecord, Team, new_id
from store.queue import queue_for
from store.settings import Settings

log = logging.getLogger(__name__)
# A queued place frees when one of the team's jobs starts: minutes for real jobs, so a client polling
# faster only adds load.
QUEUE_FULL_RETRY_AFTER_S = 30


def ingest_model(*, upload: Upload, settings: Settings, store: ArtifactStore) -> dict[str, Any]:
    """Validate an uploaded model in the sandbox and put its ONNX into the store; returns the row's fields.

    Parsing, the ``.pt2`` conversion and the ONNX Runtime load all happen in a sandboxed child
    (:mod:`compression.sandbox`): this process only moves bytes. Runs in a worker thread.
    """
    check_zip_directory(upload.path, max_bytes=settings.max_zip_directory_bytes, error=InvalidModel)  # its size only
    out = upload.folder / "model.onnx"
    info = sandbox.run("read_upload", {
        "path": str(upload.path), "filename": upload.filename, "workdir": str(upload.folder), "out": str(out),
        "max_unpacked_bytes": settings.max_upload_bytes * 4, "lazy_above": settings.model_inline_max_bytes,
        "max_ratio": settings.max_unzipped_ratio,
    }, limits=sandbox.Limits(**settings.sandbox_limits("check")), workdir=upload.folder)
    if info["params"] > settings.max_model_params:
        raise Problem(413, "too_large", "model too large", f"{info['params']} params; limit {settings.max_model_params}")
    if info["files"] > 1:  # a converted .pt2 whose ONNX needs external data: torch's export cannot write it here
        raise Problem(413, "too_large", "model too large", "a .pt2 program over 2 GB: export it to ONNX with "
                      "external data (torch.onnx.export(..., external_data=True)) and upload the .onnx and its data "
                      "as one .zip")
    model_id = new_id()
    key = f"models/{model_id}/model.onnx"
    if info["store"] == "out":
        store.put_file(key, out)
    elif info["format"] == "onnx_zip":  # weights never loaded here: the validated zip itself is stored
        key = f"models/{model_id}/model.zip"
        store.put_file(key, upload.path)
    else:
        store.put_file(key, upload.path)  # keep the user's bytes exactly
    return {"id": model_id, "format": info["format"], "storage_key": key, "params": info["params"],
            "weight_bytes": info["weight_bytes"], "inputs": info["inputs"], "outputs": info["outputs"]}


def ingest_dataset(*, upload: Upload, settings: Settings, store: ArtifactStore) -> dict[str, Any]:
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


def _search_needs(spec: ParsedSpec, dataset: DatasetRecord | None, model: ModelRecord) -> list[dict]:
    """A search's own data needs: an accuracy target needs labels, a perplexity target a language model's
    ``[N, T, vocab]`` first output; a searched value may add training."""
    from compression.data import LABELS
    from compression.search_space import TargetSpec

    errors = []
    target = spec.target or TargetSpec()
    has_labels = dataset is not None and LABELS in (dataset.arrays or {})
    if target.metric == "accuracy" and not has_labels:
        errors.append({"loc": ["target", "metric"],
                       "msg": "accuracy needs a dataset with labels: upload one, or use agreement or output_cosine "
                              "(perplexity for a language model)"})
    first = (model.outputs or [{}])[0]
    if target.metric == "perplexity" and len(first.get("shape") or []) != 3:
        errors.append({"loc": ["target", "metric"],
                       "msg": f"perplexity needs a language model (first output [N, T, vocab]); this model's first "
                              f"output has shape {first.get('shape')}"})
    if dataset is None:
        cand = next((c for c in spec.candidates() if c.data_steps), None)
        if cand is not None:
            i = cand.data_steps[0]
            errors.append({"loc": ["search"], "msg": f"candidate {cand.values} makes step {i} "
                                                     f"({cand.steps[i]['method']}) train: it needs a dataset"})
    return errors


def validate_job(*, session: Session, team: Team, body: JobCreate,
                 settings: Settings) -> tuple[ModelRecord, DatasetRecord | None, dict]:
    """Everything that can be checked before queueing: ownership, spec, steps that cannot run on a large model,
    dataset vs model inputs."""
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
    _check_model_refs(session=session, team=team, spec=spec)  # a 404 before any 422 (preflight relies on it)
    _check_large_model(model, spec, settings)
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
        errors.extend(_search_needs(spec, dataset, model))
    if errors:
        raise Problem(422, "invalid_spec", "invalid spec", "a step needs a dataset", validation_errors(["spec"], errors))
    return model, dataset, spec.to_json()


def _check_large_model(model: ModelRecord, spec: ParsedSpec, settings: Settings) -> None:
    """A 422 ``too_large`` naming each step that cannot run on ``model`` when its weights exceed
    ``external_data_above_bytes`` (the step's own ``handles_large`` says; a search's candidates are its steps)."""
    size = model.weight_bytes or 0
    if size <= settings.external_data_above_bytes:
        return
    errors = [{"loc": ["steps", i], "msg": f"{step.method} with these settings does not run on a model of "
                                           f"{size / 1024**3:.2f} GiB (weights in external data): it holds the "
                                           "model as one protobuf or in torch"}
              for i, step in enumerate(spec.steps) if not step.handles_large]
    if errors:
        raise Problem(422, "too_large", "model too large for these steps",
                      f"the model's weights are {size} bytes, over {settings.external_data_above_bytes}: only steps "
                      "that act on its tensors without training or a torch conversion run on it",
                      validation_errors(["spec"], errors))


def _check_model_refs(*, session: Session, team: Team, spec: ParsedSpec) -> None:
    """Every model id named in the spec (teachers, students, rewind inits), in a step or a searched value,
    is a model of this team; a 404 with the path of each that is not (one query for all of them)."""
    refs = [(["steps", i, *loc], ref) for i, step in enumerate(spec.steps) for loc, ref in step.model_refs]
    if isinstance(spec.search, dict):
        refs += search_model_refs(spec.search, spec.raw_steps())
    if not refs:
        return
    owned = set(session.scalars(select(ModelRecord.id).where(ModelRecord.team_id == team.id,
                                                              ModelRecord.id.in_({ref for _, ref in refs}))))
    missing = [{"loc": loc, "msg": f"no model {ref!r} in your team"} for loc, ref in refs if ref not in owned]
    if missing:
        raise Problem(404, "not_found", "model not found", "a model id in the spec is not a model of your team",
                      validation_errors(["spec"], missing))


def check_queue_cap(*, session: Session, team: Team, settings: Settings) -> None:
    """429 once the team has ``max_queued_per_team`` jobs queued, so one team cannot pile up work for free.

    Locks the team row until the route commits: two concurrent submits cannot both take the last place
    (SQLite ignores the lock; the embedded default has one API process).
    """
    session.execute(select(Team.id).where(Team.id == team.id).with_for_update())
    queued = session.execute(select(func.count()).select_from(Job).where(
        Job.team_id == team.id, Job.status == JobStatus.queued.value)).scalar_one()
    if queued >= settings.max_queued_per_team:
        raise Problem(429, "too_many_queued", "too many queued jobs",
                      f"your team has {queued} jobs queued, the limit is {settings.max_queued_per_team}: "
                      "submit more once some have started", headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)})


def create_job(*, session: Session, team: Team, body: JobCreate, idempotency_key: str | None,
               settings: Settings) -> tuple[Job, bool]:
    """Insert a queued job (or return the one made with the same Idempotency-Key and body). Returns (job, created).

    The job's queue is routed here, once (:func:`store.queue.queue_for`): every sender reads it from the row."""
    digest = request_sha256(body)
    if idempotency_key:
        existing = _job_with_key(session, team, idempotency_key)
        if existing is not None:
            return _replayed(existing, digest), False
    check_queue_cap(session=session, team=team, settings=settings)  # cheap, before the spec is expanded
    model, dataset, spec = validate_job(session=session, team=team, body=body, settings=settings)
    job = Job(team_id=team.id, model_id=model.id, dataset_id=dataset.id if dataset else None, name=body.name,
              spec=spec, status=JobStatus.queued.value, progress={"phase": "queued", "fraction": 0.0},
              idempotency_key=idempotency_key, request_sha256=digest, queue=queue_for(spec, settings))
    session.add(job)
    try:
        session.flush()
    except IntegrityError:  # a concurrent request with the same Idempotency-Key won
        session.rollback()
        existing = _job_with_key(session, team, idempotency_key)
        assert existing is not None  # the unique constraint that refused ours holds it
        return _replayed(existing, digest), False
    return job, True


def request_sha256(body: JobCreate) -> str:
    """sha256 of the body as canonical JSON (sorted keys, no spaces): key order and spacing do not count."""
    blob = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _job_with_key(session: Session, team: Team, idempotency_key: str | None) -> Job | None:
    return session.execute(
        select(Job).where(Job.team_id == team.id, Job.idempotency_key == idempotency_key)
    ).scalar_one_or_none()


def _replayed(existing: Job, digest: str) -> Job:
    """The job a replayed key made; a 422 when the key came with another body (as Stripe answers): the
    client has a bug, and answering with the first job would hide that its second request was never run."""
    if existing.request_sha256 is not None and existing.request_sha256 != digest:
        raise Problem(422, "idempotency_key_reused", "Idempotency-Key reused",
                      "this Idempotency-Key was already used with a different request body; use a new key")
    return existing


def remove_files(store: ArtifactStore, keys: list[str]) -> None:
    for k in keys:
        store.delete(k)
        parent = str(Path(k).parent)
        if parent not in ("", "."):
            store.delete_prefix(parent)
