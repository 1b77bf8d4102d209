"""The FastAPI application."""
from __future__ import annotations

from fastapi import FastAPI

from api import errors
from api.limits import BodySizeLimit
from api.routers import datasets, health, jobs, models
from store.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; settings are injected (tests pass their own)."""
    app = FastAPI(title="netcompress", version="1.0", description="Neural network compression as a job queue.")
    app.state.settings = settings or get_settings()
    errors.install(app)
    for r in (health.router, models.router, datasets.router, jobs.router):
        app.include_router(r)
    app.add_middleware(BodySizeLimit, max_bytes=app.state.settings.max_json_bytes)
    return app
