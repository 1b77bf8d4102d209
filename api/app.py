"""The FastAPI application."""
from __future__ import annotations

from fastapi import Depends, FastAPI

from api import errors
from api.limits import BodySizeLimit, json_shape_limits
from api.prometheus import Metrics, MetricsMiddleware
from api.prometheus import router as metrics_router
from api.routers import dashboard, datasets, events, health, jobs, models, preflight
from api.security import SecurityHeaders, declare_bearer
from store.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; settings are injected (tests pass their own)."""
    app = FastAPI(title="netcompress", version="1.0", description="Neural network compression as a job queue.",
                  dependencies=[Depends(json_shape_limits)])  # before any body is validated
    app.state.settings = settings or get_settings()
    errors.install(app)
    for r in (health.router, metrics_router, models.router, datasets.router, preflight.router, jobs.router,
              events.router, dashboard.router):
        app.include_router(r)
    app.mount("/static", dashboard.static_files(), name="static")
    declare_bearer(app)
    app.add_middleware(BodySizeLimit, max_bytes=app.state.settings.max_json_bytes)
    app.add_middleware(SecurityHeaders)  # outside the body cap: its 413 gets the headers too
    app.state.metrics = Metrics(app.state.settings)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # outermost: times everything
    return app
