"""Domain errors -> RFC 9457 problem+json, in one place."""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.security import BASE_HEADERS
from compression.errors import (
    CompressionError, InvalidDataset, InvalidModel, InvalidSpec, UnsupportedModelFormat, scrub_paths,
)
from compression.sandbox import LimitExceeded, SandboxCrashed
from store.objects import UploadTooLarge

log = logging.getLogger(__name__)
PROBLEM = "application/problem+json"


class ProblemBody(BaseModel):
    """RFC 9457 problem details, as every error response of this API carries them."""

    type: str
    title: str
    status: int
    detail: str = ""
    code: str
    errors: list[dict[str, Any]] | None = None


_DESCRIPTIONS = {400: "Malformed request", 401: "Missing, unknown or revoked API key", 404: "Not found (or another team's)",
                 409: "Conflict with the resource's state", 413: "Too large", 415: "Unsupported media type or format",
                 422: "Validation failed", 429: "Too many jobs queued: retry after Retry-After seconds", 503: "Database or broker unavailable"}


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for problem+json error responses (so clients and fuzzers know them)."""
    return {c: {"description": _DESCRIPTIONS[c], "model": ProblemBody,
                "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/ProblemBody"}}}} for c in codes}


COMMON_PROBLEMS = problem_responses(401, 404, 422, 503)


def multipart_upload_body(description: str) -> dict[str, Any]:
    """``openapi_extra`` for the streamed upload routes (they read the body themselves)."""
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {"file": {"type": "string", "format": "binary", "description": description},
                       "name": {"type": "string", "maxLength": 200}}}}}}}


class Problem(Exception):
    """An HTTP problem raised from a route or dependency."""

    def __init__(self, status: int, code: str, title: str, detail: str = "", errors: list[dict] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail or title)
        self.status, self.code, self.title, self.detail = status, code, title, detail
        self.errors = errors or []
        self.headers = headers


def not_found(kind: str) -> Problem:
    return Problem(404, "not_found", f"{kind} not found", f"no {kind} with this id in your team")


def problem_response(p: Problem, dirs: Sequence[str] = ()) -> JSONResponse:
    """The problem as RFC 9457 JSON, its texts scrubbed of server paths (a library's message may name the
    upload's folder: see :func:`scrub_paths`); ``dirs``: the working folders as relative paths may name them."""
    body: dict[str, Any] = {"type": f"/problems/{p.code}", "title": scrub_paths(p.title, dirs), "status": p.status,
                            "detail": scrub_paths(p.detail, dirs), "code": p.code}
    if p.errors:
        body["errors"] = [{**e, "message": scrub_paths(e["message"], dirs)} if isinstance(e.get("message"), str) else e
                          for e in p.errors]
    return JSONResponse(body, status_code=p.status, media_type=PROBLEM, headers=p.headers)


def _path(loc: list[Any]) -> str:
    """JSON path like ``$.spec.steps[0].sparsity``; a key that is not a plain name is quoted, so
    ``$.spec.search["distill.teachers"][0]`` cannot be read as nested keys."""
    out = "$"
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier():
            out += f".{part}"
        else:
            out += f"[{json.dumps(str(part))}]"
    return out


def validation_errors(loc_prefix: list[Any], errors: list[dict]) -> list[dict]:
    return [{"path": _path(loc_prefix + list(e.get("loc", []))), "loc": loc_prefix + list(e.get("loc", [])),
             "message": e.get("msg", "")} for e in errors]


def from_compression_error(e: CompressionError) -> Problem:
    if isinstance(e, LimitExceeded):
        return Problem(422, e.code, "model too costly", str(e),
                       [{"path": "$.file", "loc": ["file"], "message": f"limit: {e.limit}"}])
    if isinstance(e, SandboxCrashed):  # the child died on the model (a crash in a library, say): the model's fault
        return Problem(422, "invalid_model", "invalid model", f"the model could not be processed: {e}")
    if isinstance(e, UnsupportedModelFormat):
        return Problem(415, e.code, "unsupported model format", str(e))
    if isinstance(e, InvalidModel):
        return Problem(422, e.code, "invalid model", str(e))
    if isinstance(e, InvalidDataset):
        return Problem(422, e.code, "invalid dataset", str(e))
    if isinstance(e, InvalidSpec):
        return Problem(422, e.code, "invalid spec", str(e), validation_errors(["spec"], e.errors))
    return Problem(422, e.code, "cannot process", str(e))


def install(app: FastAPI) -> None:
    """Map every exception to its problem; the one place problems are rendered (and scrubbed)."""
    dirs = app.state.settings.relative_dirs

    def render(p: Problem) -> JSONResponse:
        return problem_response(p, dirs)

    @app.exception_handler(Problem)
    async def _problem(_: Request, e: Problem) -> JSONResponse:
        return render(e)

    @app.exception_handler(CompressionError)
    async def _compression(_: Request, e: CompressionError) -> JSONResponse:
        return render(from_compression_error(e))

    @app.exception_handler(UploadTooLarge)
    async def _too_large(_: Request, e: UploadTooLarge) -> JSONResponse:
        return render(Problem(413, "too_large", "upload too large", str(e)))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = [{"loc": [p for p in x["loc"] if p != "body"], "msg": x["msg"]} for x in e.errors()]
        return render(Problem(422, "validation_error", "invalid request", "the request did not validate",
                              validation_errors([], errs)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return render(Problem(e.status_code, code, str(e.detail), str(e.detail),
                              headers=getattr(e, "headers", None)))

    @app.exception_handler(DataError)
    async def _bad_value(_: Request, e: DataError) -> JSONResponse:
        # a value PostgreSQL refuses (a NUL byte in an id, say) is the request's fault, not an outage
        return render(Problem(422, "validation_error", "invalid value",
                              "a value in the request cannot be stored or looked up (e.g. a NUL character)"))

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    async def _db_down(_: Request, e: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", e)
        return render(Problem(503, "unavailable", "database unavailable", "try again shortly",
                              headers={"Retry-After": "2"}))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        # Starlette answers this one outside every middleware: the security headers come with it here
        return render(Problem(500, "internal_error", "internal error", type(e).__name__, headers=dict(BASE_HEADERS)))
