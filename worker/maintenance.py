"""Reaper and sweeper, run in a thread of every worker's main process.

- Reaper: a ``running`` job whose heartbeat stopped (its worker was SIGKILLed, its machine died) goes
  back to ``queued`` (attempts are counted at the next claim) and is dispatched again; past the attempt limit it fails.
- Sweeper: deferred ``queued`` jobs (never sent: broker down at submit, a quota, a reaped job) are sent as
  their team's slots allow, fairly across teams (``store.dispatch``); a message probably lost in a broker
  restart is sent again.
Several workers may run this at once: every move goes through the guarded ``transition()``.
Every pass uses the settings the worker booted with (:mod:`worker.celery_app`), handed down.
"""
from __future__ import annotations

import logging
import threading
import time

from celery.signals import worker_ready, worker_shutdown

from store.db import session_scope
from store.dispatch import dispatch
from store.jobs import lost_messages, mark_enqueued, reap_lost_jobs
from store.queue import send_job
from store.settings import Settings

log = logging.getLogger(__name__)
_stop = threading.Event()


def resend(lost: list[tuple[str, str]], settings: Settings) -> list[str]:
    """Send again ``(job id, queue)`` whose message was probably lost; each keeps the in-flight slot it had."""
    sent = []
    for job_id, queue in dict.fromkeys(lost):
        try:
            send_job(job_id, queue, settings)
        except Exception as e:  # broker still down: the next pass tries again
            log.warning("could not send job %s: %s", job_id, e)
            break
        with session_scope(settings) as s:
            mark_enqueued(s, job_id)
        sent.append(job_id)
    return sent


def sweep_once(settings: Settings, *, reap: bool = True) -> list[str]:
    """One pass of reaper + sweeper; returns the job ids sent to the broker."""
    if reap:
        with session_scope(settings) as s:
            reap_lost_jobs(s, stale_after_s=settings.heartbeat_s * 6, max_attempts=settings.max_attempts)
    with session_scope(settings) as s:
        lost = lost_messages(s, resend_after_s=settings.resend_after_s)
    sent = resend(lost, settings)
    with session_scope(settings) as s:
        return sent + dispatch(s, settings)


def _loop(settings: Settings) -> None:
    interval = max(0.5, settings.heartbeat_s)
    db_ok_since: float | None = None
    while not _stop.wait(interval):
        try:
            now = time.monotonic()
            db_ok_since = db_ok_since or now
            # Guard: db_outage_reap — after a database outage every heartbeat looks stale; reap only once
            # the database has been reachable for a whole staleness window, so live jobs have beaten again.
            sweep_once(settings, reap=now - db_ok_since >= settings.heartbeat_s * 6)
        except Exception as e:  # the database or broker may be restarting; keep the loop alive
            db_ok_since = None
            log.warning("maintenance pass failed: %s", e)


@worker_ready.connect
def _start(**_kwargs) -> None:
    # The worker's settings, read once at boot; imported here, not at the top: worker.celery_app imports us.
    from worker.celery_app import settings

    threading.Thread(target=_loop, args=(settings,), name="netcompress-maintenance", daemon=True).start()


@worker_shutdown.connect
def _stop_loop(**_kwargs) -> None:
    _stop.set()
