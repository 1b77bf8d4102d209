"""Prometheus metrics at ``/metrics``.

- ``netcompress_jobs{status}`` and ``netcompress_queue_depth``: read from the database at scrape time, so
  every API process reports the same truth whatever worker ran what.
- ``netcompress_job_duration_seconds{status}``: a histogram of finished jobs (started → finished), also
  computed in SQL at scrape time — the workers need no metrics endpoint of their own.
- ``netcompress_http_request_duration_seconds{method,route,status}``: per API process (several uvicorn
  workers each answer for themselves; scrape each, or run one).
"""
from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import case, func, select

from api.errors import Problem, problem_responses
from store.db import session_factory
from store.models import Job, JobStatus
from store.settings import Settings

log = logging.getLogger(__name__)

JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 24 * 3600)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class JobCollector:
    """Job gauges and the duration histogram, from the database at each scrape."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def describe(self) -> list:
        return []  # collected lazily: no database query at registration

    def collect(self):  # prometheus_client's collector protocol
        try:
            counts, durations = self._query()
        except Exception as e:  # the database is down: say so rather than fail the scrape
            log.warning("metrics: database unavailable: %s", e)
            up = GaugeMetricFamily("netcompress_database_up", "Whether the last scrape could read the database")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily("netcompress_database_up", "Whether the last scrape could read the database")
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("netcompress_jobs", "Jobs by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], counts.get(status.value, 0))
        yield jobs
        depth = GaugeMetricFamily("netcompress_queue_depth", "Jobs waiting for a worker (status queued)")
        depth.add_metric([], counts.get(JobStatus.queued.value, 0))
        yield depth
        hist = HistogramMetricFamily("netcompress_job_duration_seconds",
                                     "Run time of finished jobs (started → finished)", labels=["status"])
        for status, (buckets, total, count) in durations.items():
            cumulative = [(str(float(b)), n) for b, n in zip(JOB_BUCKETS, buckets)] + [("+Inf", count)]
            hist.add_metric([status], cumulative, sum_value=total)
        yield hist

    def _query(self) -> tuple[dict[str, int], dict[str, tuple[list[int], float, int]]]:
        with session_factory(self.settings)() as s:
            counts = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            if self.settings.is_sqlite:
                dur = (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0
            else:
                dur = func.extract("epoch", Job.finished_at - Job.started_at)
            cols = [func.sum(case((dur <= b, 1), else_=0)) for b in JOB_BUCKETS]
            rows = s.execute(
                select(Job.status, func.coalesce(func.sum(dur), 0.0), func.count(), *cols)
                .where(Job.started_at.is_not(None), Job.finished_at.is_not(None))
                .group_by(Job.status)
            ).all()
        durations = {r[0]: ([int(x or 0) for x in r[3:]], float(r[1] or 0.0), int(r[2])) for r in rows}
        return {k: int(v) for k, v in counts.items()}, durations


class Metrics:
    """The app's registry, the HTTP histogram, and the ASGI middleware that feeds it."""

    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(JobCollector(settings))
        self.http = Histogram("netcompress_http_request_duration_seconds", "HTTP request latency",
                              ["method", "route", "status"], buckets=HTTP_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Times every request (pure ASGI: streamed responses pass through untouched). The route *template*
    is the label (``/v1/jobs/{job_id}``), so label cardinality stays bounded; unmatched paths are ``other``."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or ("/static" if scope["path"].startswith("/static/") else "other")
            self.metrics.http.labels(scope["method"], template, str(status[0])).observe(time.perf_counter() - start)


router = APIRouter(tags=["health"])


def authorize_scrape(settings: Settings, authorization: str) -> None:
    """``/metrics`` sums every team's jobs: a scraper needs ``NETCOMPRESS_METRICS_TOKEN`` as its bearer
    token; without a token configured the endpoint is off (404) unless ``NETCOMPRESS_METRICS_PUBLIC``."""
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else ""
    if not token:
        if settings.metrics_public:
            return
        raise Problem(404, "not_found", "metrics are off", "set NETCOMPRESS_METRICS_TOKEN to scrape /metrics")
    scheme, _, given = authorization.partition(" ")
    # compare_digest: the time a comparison takes tells nothing about how much of the token was right
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Problem(401, "unauthorized", "metrics token required", "send Authorization: Bearer <metrics token>",
                      headers={"WWW-Authenticate": "Bearer"})


@router.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus text exposition format",
                             "content": {"text/plain": {"schema": {"type": "string"}}}},
                       **problem_responses(401, 404)})
def metrics(request: Request) -> Response:
    """Prometheus metrics: jobs by status, queue depth, job duration and HTTP latency histograms.

    Needs ``Authorization: Bearer <NETCOMPRESS_METRICS_TOKEN>`` (not an API key); off when no token is set."""
    authorize_scrape(request.app.state.settings, request.headers.get("authorization", ""))
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
