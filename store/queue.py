"""The Celery app as the API sees it: send tasks by name, never import the worker's code (or torch).

The worker registers its tasks on this same app (``worker.tasks``), so both ends share one config.
"""
from __future__ import annotations

from typing import Any

from celery import Celery

from store.settings import Settings

RUN_JOB = "netcompress.run_job"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings: late acks + reject on worker loss + prefetch 1, so a lost job is redelivered."""
    conf: dict[str, Any] = {
        "broker_url": settings.celery_broker_url,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": settings.queue,
        "task_ignore_result": True,  # job state lives in the database, not in a result backend
        "result_backend": None,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 3,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_serializer": "json",
        "accept_content": ["json"],
    }
    if settings.broker_url is None:
        folder = settings.broker_folder
        for sub in ("data", "control", "processed"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder / "data"),
            "data_folder_out": str(folder / "data"),
            "control_folder": str(folder / "control"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "polling_interval": 0.2,
        }
    else:
        # Jobs run for hours: the message must not come back while its worker is still busy with it.
        conf["broker_transport_options"] = {"visibility_timeout": settings.job_time_limit_s + 600}
    return conf


_apps: dict[tuple[str, str, str], Celery] = {}


def get_celery(settings: Settings) -> Celery:
    """One Celery app per (broker, home, queue) in this process, configured from ``settings``."""
    key = (settings.celery_broker_url, str(settings.home), settings.queue)
    if key not in _apps:
        app = Celery("netcompress")
        app.conf.update(celery_config(settings))
        _apps[key] = app
    return _apps[key]


def queue_for(spec: dict[str, Any] | None, settings: Settings) -> str:
    """The queue a job goes to: ``queue``, or with ``route_by_device`` the GPU queue when a step trains.

    Each technique's spec says whether it trains (``StepSpec.trains``). Computed once, at submit, and stored
    on the job row (``Job.queue``); every sender reads the row. Only the steps are parsed: a search's grid is
    not expanded again here.
    """
    if not settings.route_by_device or not spec or not spec.get("steps"):
        return settings.queue
    from compression.spec import parse_spec

    return settings.job_queue(parse_spec({"steps": spec["steps"]}).trains)


def send_job(job_id: str, queue: str, settings: Settings) -> None:
    """Publish ``run_job(job_id)`` to ``queue``: the one place a job message is made.

    ``queue`` is the job row's (routed at submit by :func:`queue_for`); senders never route again.
    Raises on broker trouble (the caller leaves the job for the sweeper).
    """
    get_celery(settings).send_task(RUN_JOB, args=[job_id], queue=queue, retry=False)
