"""Reaper and sweeper, run in a thread of every worker's main process.

- Reaper: a ``running`` job whose heartbeat stopped (its worker was SIGKILLed, its machine died) goes
  back to ``queued`` (attempts are counted at the next claim) and is re-sent; past the attempt limit it fails.
- Sweeper: a ``queued`` job that never reached the broker (it was down at submit) is sent again.
Several workers may run this at once: every move goes through the guarded ``transition()``.
"""
from __future__ import annotations

import logging
import threading

from celery.signals import worker_ready, worker_shutdown

from store.db import session_scope
from store.jobs import mark_enqueued, reap_lost_jobs, unsent_jobs
from store.queue import send_job
from store.settings import get_settings

log = logging.getLogger(__name__)
_stop = threading.Event()


def sweep_once() -> list[str]:
    """One pass of reaper + sweeper; returns the job ids sent to the broker."""
    settings = get_settings()
    with session_scope() as s:
        requeued = reap_lost_jobs(s, stale_after_s=settings.heartbeat_s * 6, max_attempts=settings.max_attempts)
    with session_scope() as s:
        unsent = unsent_jobs(s, older_than_s=settings.heartbeat_s * 3)
    sent = []
    for job_id in dict.fromkeys(requeued + unsent):
        try:
            send_job(job_id, settings)
        except Exception as e:  # broker still down: try again next pass
            log.warning("could not send job %s: %s", job_id, e)
            continue
        with session_scope() as s:
            mark_enqueued(s, job_id)
        sent.append(job_id)
    return sent


def _loop() -> None:
    interval = max(1.0, get_settings().heartbeat_s)
    while not _stop.wait(interval):
        try:
            sweep_once()
        except Exception as e:  # the database may be restarting; keep the loop alive
            log.warning("maintenance pass failed: %s", e)


@worker_ready.connect
def _start(**_kwargs) -> None:  # noqa: ANN003
    threading.Thread(target=_loop, name="netcompress-maintenance", daemon=True).start()


@worker_shutdown.connect
def _stop_loop(**_kwargs) -> None:  # noqa: ANN003
    _stop.set()
