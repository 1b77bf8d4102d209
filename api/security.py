"""HTTP hardening that every response shares: security headers, relative redirects, the bearer scheme in OpenAPI."""
from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

BASE_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}
# The dashboard is one page, its script and its style sheet, all from /static, talking to this API with
# fetch: nothing inline, nothing from elsewhere (the script sets styles through the CSSOM, which CSP allows).
DASHBOARD_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
                 "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
_BASE = [(k.lower().encode(), v.encode()) for k, v in BASE_HEADERS.items()]


def _is_dashboard(path: str) -> bool:
    return path == "/dashboard" or path.startswith("/static/")


def relative_location(location: str) -> str:
    """``http://<any Host header>/v1/jobs?x=1`` -> ``/v1/jobs?x=1``.

    Starlette builds a trailing-slash redirect from the request's ``Host`` header, so a forged Host made
    the API answer with a link to another site. A path-only Location always stays on this origin; leading
    slashes are collapsed so that the path cannot read as a protocol-relative ``//other.site``.
    """
    parts = urlsplit(location)
    out = "/" + parts.path.lstrip("/")
    return out + (f"?{parts.query}" if parts.query else "") + (f"#{parts.fragment}" if parts.fragment else "")


class SecurityHeaders:
    """Pure ASGI middleware: the base headers on every response, the CSP on the dashboard's, and every
    redirect's Location made relative. Streamed responses (SSE, downloads) pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        extra = _BASE + ([(b"content-security-policy", DASHBOARD_CSP.encode())] if _is_dashboard(scope["path"]) else [])

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                present = {k.lower() for k, _ in headers}
                if 300 <= message["status"] < 400:
                    headers = [(k, relative_location(v.decode("latin-1")).encode("latin-1"))
                               if k.lower() == b"location" else (k, v) for k, v in headers]
                headers += [(k, v) for k, v in extra if k not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def declare_bearer(app: FastAPI) -> None:
    """OpenAPI: the ``bearer`` security scheme, required by every ``/v1`` operation (not health or metrics),
    so clients and fuzzers know how to authenticate. Auth itself stays in :func:`api.deps.team_from_header`."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()  # caches itself in app.openapi_schema, which is then amended once
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
                "type": "http", "scheme": "bearer", "description": "an API key: `netcompress keys create --team T`"}
            for path, item in schema.get("paths", {}).items():
                if path.startswith("/v1/"):
                    for op in item.values():
                        if isinstance(op, dict):
                            op["security"] = [{"bearer": []}]
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
