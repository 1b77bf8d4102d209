"""/healthz (process alive) and /readyz (database and broker reachable)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import SettingsDep
from store.db import session_factory
from store.queue import get_celery

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    """Liveness."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready", "content": {"application/problem+json": {}}}})
def readyz(settings: SettingsDep) -> JSONResponse:
    """Readiness: a SELECT 1 and a broker connection, each with a short timeout."""
    checks: dict[str, str] = {}
    try:
        with session_factory(settings)() as s:
            s.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as e:
        checks["database"] = f"error: {type(e).__name__}"
    try:
        with get_celery(settings).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as e:
        checks["broker"] = f"error: {type(e).__name__}"
    ok = all(v == "ok" for v in checks.values())
    if ok:
        return JSONResponse({"status": "ready", "checks": checks})
    return JSONResponse({"type": "/problems/unavailable", "title": "not ready", "status": 503,
                         "detail": ", ".join(f"{k}: {v}" for k, v in checks.items()), "code": "unavailable",
                         "checks": checks}, status_code=503, media_type="application/problem+json")
