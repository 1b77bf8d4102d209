"""Running one job: claim it, run the pipeline, publish artifacts, finish — every status via transition()."""
from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError, OperationalError

from compression import sandbox
from compression.errors import Cancelled, CompressionError, TimeLimitExceeded, scrub_paths
from compression.pipeline import OutputFile
from compression.sandbox_tasks import checked_name, inside
from compression.spec import parse_spec
from store.artifacts import ArtifactStore, get_artifact_store, private_copy
from store.db import session_scope
from store.dispatch import dispatch, running_quota
from store.jobs import add_artifact, defer, report_progress, running_count
from store.models import DatasetRecord, Job, JobStatus, ModelRecord, Team, utcnow
from store.settings import Settings
from store.transitions import TERMINAL, transition
from worker.pause import pause_if_asked

log = logging.getLogger(__name__)


class StoreCheckpoint:
    """A search's finished candidates, kept in the artifact store under ``jobs/<id>/checkpoint/``.

    Not under an attempt's prefix: the next attempt (after a worker was lost) reads them and resumes.
    The prefix is removed when the job ends for good.
    """

    def __init__(self, store: ArtifactStore, job_id: str) -> None:
        self.store, self.prefix = store, f"jobs/{job_id}/checkpoint"

    def get(self, name: str) -> bytes | None:
        key = f"{self.prefix}/{name}"
        if not self.store.exists(key):
            return None
        return b"".join(self.store.iter_bytes(key))

    def put(self, name: str, data: bytes) -> None:
        self.store.put_stream(f"{self.prefix}/{name}", iter([data]))

    def clear(self) -> None:
        self.store.delete_prefix(self.prefix)


DB_ERRORS = (OperationalError, DBAPIError)


def with_db_retry(fn, *, budget_s: float):
    """Run ``fn`` (one transaction) until the database answers, for up to ``budget_s`` seconds.

    The final writes of a finished job must survive a database restart: the work is done, losing it
    would mean running the job twice.
    """
    deadline = time.monotonic() + budget_s
    delay = 0.5
    while True:
        try:
            return fn()
        except DB_ERRORS as e:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("database unavailable (%s); retrying in %.1fs", type(e).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


class _Heartbeat(threading.Thread):
    """Touches ``heartbeat_at`` while a long call (calibration, an epoch) gives no progress."""

    def __init__(self, job_id: str, attempt_id: str, settings: Settings) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.job_id, self.attempt_id, self.settings = job_id, attempt_id, settings
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.settings.heartbeat_s):
            try:
                with session_scope(self.settings) as s:
                    s.execute(update(Job).where(Job.id == self.job_id, Job.attempt_id == self.attempt_id)
                              .values(heartbeat_at=utcnow()).execution_options(synchronize_session=False))
            except Exception as e:  # database restarting: the next beat will do
                log.warning("heartbeat failed: %s", e)


class _Relay:
    """Answers the sandboxed pipeline's asks: progress (a cancel or time limit goes back as an exception to
    raise there), models named in the spec (this job's team only), and the search's checkpoint."""

    def __init__(self, *, store: ArtifactStore, checkpoint: StoreCheckpoint, workdir: Path, team_id: str,
                 progress: Any, settings: Settings) -> None:
        self.store, self.checkpoint, self.workdir, self.team_id, self.progress, self.settings = (
            store, checkpoint, workdir, team_id, progress, settings)

    def answer(self, msg: dict[str, Any]) -> dict[str, Any]:
        kind = msg.get("type")
        if kind == "progress":
            try:
                self.progress(msg["progress"])
            except Cancelled as e:
                return {"raise": {"class": type(e).__name__, "message": str(e)}}
            return {}
        if kind == "load_model":
            return self._model(str(msg.get("model_id")))
        if kind == "checkpoint_get":
            blob = self.checkpoint.get(checked_name(msg["name"]))
            if blob is None:
                return {}
            path = self.workdir / "checkpoint" / msg["name"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
            return {"path": str(path)}
        if kind == "checkpoint_put":
            self.checkpoint.put(checked_name(msg["name"]), inside(self.workdir, msg["path"]).read_bytes())
            return {}
        return {}

    def _model(self, model_id: str) -> dict[str, Any]:
        """A model named inside the spec (teacher, student, rewind init): this job's team only."""
        with session_scope(self.settings) as s:
            rec = s.get(ModelRecord, model_id)
            key = rec.storage_key if rec is not None and rec.team_id == self.team_id else None
        if key is None:
            return {}
        path = private_copy(self.store, key, self.workdir / "inputs" / "named" / f"{checked_name(model_id)}{Path(key).suffix}")
        return {"path": str(path)}


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_job(job_id: str, settings: Settings) -> str:
    """Run ``job_id`` to a terminal state (or hand it back). Returns the final status, for logs.

    Every session, the heartbeat, the finish and the hand-on of the quota slot use ``settings``.
    """
    with session_scope(settings) as s:
        job = s.get(Job, job_id)
        if job is None:
            return "missing"
        if job.status == JobStatus.queued.value and job.attempts >= settings.max_attempts:
            transition(s, job_id, JobStatus.failed, reason="attempts exhausted",
                       error={"code": "attempts_exhausted", "message": f"gave up after {job.attempts} attempts"})
            return "failed"
        if job.status != JobStatus.queued.value:
            return f"skipped ({job.status})"  # Guard: redelivered_task (cheap path; the claim re-checks)
        # Guard: quota_race — lock the team row so two workers cannot both take the team's last slot.
        team = s.execute(select(Team).where(Team.id == job.team_id).with_for_update()).scalar_one()
        if running_count(s, team.id) >= running_quota(team, settings):
            defer(s, job_id)
            return "deferred (team quota)"
        # Guard: redelivered_task — acks_late redelivers; only a queued job can be claimed.
        claim = transition(s, job_id, JobStatus.running, reason=f"claimed by {socket.gethostname()}:{os.getpid()}")
        if not claim.accepted:
            return f"skipped ({claim.reason})"
        attempt_id = claim.attempt_id
        assert attempt_id is not None
        model_rec = s.get(ModelRecord, job.model_id)
        dataset_rec = s.get(DatasetRecord, job.dataset_id) if job.dataset_id else None
        spec_raw, model_key, model_sha = job.spec, model_rec.storage_key, model_rec.sha256
        ds_key = dataset_rec.storage_key if dataset_rec else None
        ds_sha = dataset_rec.sha256 if dataset_rec else None
        team_id = job.team_id

    store = get_artifact_store(settings)
    checkpoint = StoreCheckpoint(store, job_id)
    workdir = settings.home / "work" / job_id / attempt_id
    workdir.mkdir(parents=True, exist_ok=True)
    heartbeat = _Heartbeat(job_id, attempt_id, settings)
    heartbeat.start()
    started = time.monotonic()
    last_write = [0.0, ""]

    def progress(p: dict[str, Any]) -> None:
        held = pause_if_asked(settings, job_id, p)  # test-only; off unless NETCOMPRESS_TEST_PAUSE_FILE is set
        if time.monotonic() - started > settings.job_time_limit_s:
            raise TimeLimitExceeded(f"job exceeded its time limit of {settings.job_time_limit_s} s")
        now = time.monotonic()
        # Throttle DB writes, but always write a phase change (and the message a test held the job at,
        # so a cancel asked for meanwhile is seen right here).
        if not held and now - last_write[0] < 0.5 and p["phase"] == last_write[1] and p["fraction"] < 1.0:
            return
        last_write[0], last_write[1] = now, p["phase"]
        try:
            with session_scope(settings) as s:
                still_ours = report_progress(s, job_id, attempt_id, p)
        except DB_ERRORS as e:  # database restarting: keep computing, report next time
            log.warning("progress not saved: %s", type(e).__name__)
            return
        if not still_ours:
            raise Cancelled("cancelled by user")

    try:
        spec = parse_spec(spec_raw)
        progress({"phase": "loading", "step": 0, "steps": len(spec.steps), "fraction": 0.0, "message": "loading model"})
        inputs = workdir / "inputs"
        model_path = private_copy(store, model_key, inputs / Path(model_key).name)
        ds_path = private_copy(store, ds_key, inputs / "data.npz") if ds_key else None
        device = _device()
        relay = _Relay(store=store, checkpoint=checkpoint, workdir=workdir, team_id=team_id, progress=progress,
                       settings=settings)
        out = sandbox.run("pipeline", {
            "workdir": str(workdir), "model_path": str(model_path), "dataset_path": str(ds_path) if ds_path else None,
            "spec": spec_raw, "device": device, "threads": settings.worker_threads,
            "external_above": settings.external_data_above_bytes,
            "input_sha256": {"model": model_sha, **({"dataset": ds_sha} if ds_sha else {})},
        }, limits=sandbox.Limits(**settings.sandbox_limits("job"), gpu=device == "cuda"), workdir=workdir,
            on_ask=relay.answer)
        files = [OutputFile(f["name"], inside(workdir, f["path"]), f["kind"]) for f in out["files"]]
        # Publish: files first (atomic renames, under this attempt's prefix), then rows + status at once.
        prefix = f"jobs/{job_id}/{attempt_id}"
        stored = []
        for f in files:
            size, sha = store.put_file(f"{prefix}/{f.name}", f.path)
            stored.append((f, size, sha))

        def publish():  # one transaction: the status and the artifact rows together
            with session_scope(settings) as s:
                res = transition(s, job_id, JobStatus.succeeded, reason="pipeline finished",
                                 expect_attempt=attempt_id, metrics=out["metrics"])
                if res.accepted:
                    for f, size, sha in stored:
                        add_artifact(s, job_id, name=f.name, kind=f.kind, size_bytes=size, sha256=sha,
                                     storage_key=f"{prefix}/{f.name}")
                return res

        done = with_db_retry(publish, budget_s=settings.db_retry_s)
        if not done.accepted:
            store.delete_prefix(prefix)  # cancelled or reaped meanwhile: leave nothing behind
            return f"discarded ({done.reason})"
        return "succeeded"
    except Cancelled as e:
        _finish(job_id, attempt_id, JobStatus.cancelled if not isinstance(e, TimeLimitExceeded) else JobStatus.failed,
                e.code, str(e), settings)
        return e.code
    except CompressionError as e:  # deterministic (a bad spec, a model past the quality gate): failed, no retry
        _finish(job_id, attempt_id, JobStatus.failed, e.code, str(e), settings, details=e.details)
        return "failed"
    except MemoryError:
        _finish(job_id, attempt_id, JobStatus.failed, "out_of_memory", "the job ran out of memory", settings)
        return "failed"
    except Exception as e:
        log.error("job %s crashed:\n%s", job_id, traceback.format_exc())
        _finish(job_id, attempt_id, JobStatus.failed, "internal_error", f"{type(e).__name__}: {e}", settings)
        return "failed"
    finally:
        heartbeat.stop.set()
        _clean_up(job_id, workdir, checkpoint, settings)
        _release_slot(team_id, settings)


def _clean_up(job_id: str, workdir: Path, checkpoint: StoreCheckpoint, settings: Settings) -> None:
    """After an attempt: its scratch folder goes (and the job's folder once empty); once the job is terminal —
    by whichever road: succeeded, failed on any exception, cancelled — its search checkpoint goes too. A job
    handed back to the queue (reaped meanwhile) keeps its checkpoint for the next attempt to resume."""
    shutil.rmtree(workdir, ignore_errors=True)
    try:
        workdir.parent.rmdir()
    except OSError:  # another attempt's folder is still there
        pass
    try:
        with session_scope(settings) as s:
            status = s.execute(select(Job.status).where(Job.id == job_id)).scalar_one_or_none()
        if status is None or JobStatus(status) in TERMINAL:
            checkpoint.clear()
    except Exception as e:  # database or store away: the checkpoint is only wasted space
        log.warning("could not clear the checkpoint of job %s: %s", job_id, e)


def _release_slot(team_id: str, settings: Settings) -> None:
    """A slot of ``team_id``'s quota is free: dispatch deferred jobs now rather than at the next sweep.

    Every team's, round-robin: a job cancelled while queued also freed a slot that nobody handed on.
    """
    try:
        with session_scope(settings) as s:
            dispatch(s, settings)
    except Exception as e:  # the sweeper will do it
        log.warning("could not hand on the quota slot of team %s: %s", team_id, e)


def _finish(job_id: str, attempt_id: str, to: JobStatus, code: str, message: str, settings: Settings, *,
            details: dict[str, Any] | None = None) -> None:
    message = scrub_paths(message, settings.relative_dirs)  # the job's owner reads it: no server paths
    error: dict[str, Any] = {"code": code, "message": message[:4000]}
    if details:  # the error's numbers for programs (quality_gate: step, metric, value, budget)
        error["details"] = details

    def write():
        with session_scope(settings) as s:
            transition(s, job_id, to, reason=message[:500], expect_attempt=attempt_id, error=error)

    with_db_retry(write, budget_s=settings.db_retry_s)
