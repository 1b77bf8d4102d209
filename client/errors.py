"""Typed errors of the SDK; each carries the server's problem+json body (RFC 9457)."""
from __future__ import annotations

from typing import Any


class NetcompressError(Exception):
    """An error answer from the API.

    Attributes:
        status: HTTP status code.
        code: the problem's machine-readable ``code`` (``invalid_spec``, ``not_found`` …).
        title, detail: human-readable text from the server.
        errors: validation errors, each with a JSON ``path`` such as ``$.spec.steps[0].sparsity``.
        problem: the whole problem+json body.
    """

    def __init__(self, status: int, problem: dict[str, Any] | None = None, message: str | None = None) -> None:
        self.status = status
        self.problem = problem or {}
        self.code: str = self.problem.get("code", "error")
        self.title: str = self.problem.get("title", "")
        self.detail: str = self.problem.get("detail", "")
        self.errors: list[dict[str, Any]] = self.problem.get("errors") or []
        text = message or " — ".join(x for x in (self.title, self.detail) if x) or f"HTTP {status}"
        if self.errors:
            text += "; " + "; ".join(f"{e.get('path', '$')}: {e.get('message', '')}" for e in self.errors[:5])
        super().__init__(f"{status} {self.code}: {text}")


class BadRequest(NetcompressError):
    """400: a malformed request."""


class Unauthorized(NetcompressError):
    """401: missing, unknown or revoked API key."""


class NotFound(NetcompressError):
    """404: no such resource in your team."""


class Conflict(NetcompressError):
    """409: the resource's state forbids it (cancel a finished job, delete a model in use)."""


class TooLarge(NetcompressError):
    """413: upload or model over the server's limits."""


class UnsupportedFormat(NetcompressError):
    """415: not an ONNX/.zip/.pt2 model, a pickle, or not multipart."""


class ValidationFailed(NetcompressError):
    """422: the spec, dataset or request did not validate (see ``errors`` for JSON paths)."""


class Unavailable(NetcompressError):
    """503: database or broker unavailable (raised after the retries are spent)."""


class ServerError(NetcompressError):
    """5xx other than 503."""


class JobFailed(NetcompressError):
    """``wait()`` saw the job end in ``failed``; ``job`` is the final state, ``code`` the job's error code."""

    def __init__(self, job: Any) -> None:
        self.job = job
        err = job.error or {}
        super().__init__(0, {"code": err.get("code", job.status), "title": f"job {job.id} {job.status}",
                             "detail": err.get("message", "")})


class JobCancelled(JobFailed):
    """``wait()`` saw the job end in ``cancelled``."""


class WaitTimeout(TimeoutError):
    """``wait(timeout=…)`` ran out before the job finished."""


_BY_STATUS = {400: BadRequest, 401: Unauthorized, 404: NotFound, 409: Conflict, 413: TooLarge,
              415: UnsupportedFormat, 422: ValidationFailed, 503: Unavailable}


def error_for(status: int, problem: dict[str, Any] | None, message: str | None = None) -> NetcompressError:
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else NetcompressError)
    return cls(status, problem, message)
