"""Celery tasks. They take ids, never objects; the job row is the source of truth."""
from __future__ import annotations

from sqlalchemy.exc import DBAPIError, OperationalError

from store.queue import RUN_JOB
from worker.celery_app import app, settings
from worker.runner import run_job as _run_job


# Only infrastructure errors are retried (the database is unreachable at claim time); a bad spec, an
# unsupported op or an OOM fails the job at once inside run_job.
@app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True,
          autoretry_for=(OperationalError, DBAPIError), retry_backoff=True, retry_backoff_max=30, max_retries=30)
def run_job(job_id: str) -> str:
    """Claim and run one job; a redelivered task for a job that is not ``queued`` returns at once.

    With the worker's settings, read once at boot (:mod:`worker.celery_app`)."""
    return _run_job(job_id, settings)
