"""The web dashboard: one static page (HTML + JS, no build step) that talks to the public REST API."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(tags=["dashboard"])


@router.get("/dashboard", response_class=FileResponse,
            responses={200: {"description": "the dashboard page", "content": {"text/html": {"schema": {"type": "string"}}}}})
def dashboard() -> FileResponse:
    """The dashboard: sign in with a key, jobs, metrics and charts, uploads and submit."""
    return FileResponse(STATIC / "dashboard.html", media_type="text/html",
                        headers={"Cache-Control": "no-cache"})


@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/dashboard")


def static_files() -> StaticFiles:
    """``/static``: the dashboard's script and style sheet."""
    return StaticFiles(directory=STATIC)
