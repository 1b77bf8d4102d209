"""The worker's Celery app: the shared app from ``store.queue`` with our tasks and maintenance loop.

The worker's boot point: its settings are read here, once, and handed down (``worker.tasks``, the maintenance loop).
"""
from __future__ import annotations

from store.queue import get_celery
from store.settings import get_settings

settings = get_settings()
app = get_celery(settings)
app.conf.update(
    include=["worker.tasks"],
    # Hard kill a little after the cooperative limit checked between steps/epochs.
    task_time_limit=settings.job_time_limit_s + 120,
    worker_max_tasks_per_child=50,
)

import worker.tasks  # register the tasks
import worker.maintenance  # noqa: F401 - start the reaper/sweeper with the worker
