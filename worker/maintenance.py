"""Reaper and sweeper, run in a thread of every worker's main process.

- Reaper: a ``running`` job whose heartbeat stopped (its worker was SIGKILLed, its machine died) goes
  back to ``queued`` (attempts are counted at the next claim) and is re-sent; past the attempt limit it fails.
- Sweeper: a ``queued`` job with no message in flight (broker down at submit, deferred by a quota, or a
  message lost in a broker restart) is sent again.
Several workers may run this at once: every move goes through the guarded ``transition()``.
"""
from __future__ import annotations

import logging
import threading
import time

from celery.signals import worker_ready, worker_shutdown

from store.db import session_scope
from store.jobs import mark_enqueued, reap_lost_jobs, unsent_jobs
from store.queue import send_job
from store.settings import get_settings

log = logging.getLogger(__name__)
_stop = threading.Event()


def send_and_mark(job_ids: list[str]) -> list[str]:
    settings = get_settings()
    sent = []
    for job_id in dict.fromkeys(job_ids):
        try:
            send_job(job_id, settings)
        except Exception as e:  # broker still down: the next pass tries again
            log.warning("could not send job %s: %s", job_id, e)
            break
        with session_scope() as s:
            mark_enqueued(s, job_id)
        sent.append(job_id)
    return sent


def sweep_once(*, reap: bool = True) -> list[str]:
    """One pass of reaper + sweeper; returns the job ids sent to the broker."""
    settings = get_settings()
    requeued: list[str] = []
    if reap:
        with session_scope() as s:
            requeued = reap_lost_jobs(s, stale_after_s=settings.heartbeat_s * 6, max_attempts=settings.max_attempts)
    with session_scope() as s:
        unsent = unsent_jobs(s, older_than_s=settings.heartbeat_s * 3, resend_after_s=settings.resend_after_s)
    return send_and_mark(requeued + unsent)


def _loop() -> None:
    settings = get_settings()
    interval = max(0.5, settings.heartbeat_s)
    db_ok_since: float | None = None
    while not _stop.wait(interval):
        try:
            now = time.monotonic()
            db_ok_since = db_ok_since or now
            # Guard: db_outage_reap — after a database outage every heartbeat looks stale; reap only once
            # the database has been reachable for a whole staleness window, so live jobs have beaten again.
            sweep_once(reap=now - db_ok_since >= settings.heartbeat_s * 6)
        except Exception as e:  # the database or broker may be restarting; keep the loop alive
            db_ok_since = None
            log.warning("maintenance pass failed: %s", e)


@worker_ready.connect
def _start(**_kwargs) -> None:  # noqa: ANN003
    threading.Thread(target=_loop, name="netcompress-maintenance", daemon=True).start()


@worker_shutdown.connect
def _stop_loop(**_kwargs) -> None:  # noqa: ANN003
    _stop.set()
