"""Caps on non-upload request bodies: their bytes (a 50 MB JSON body must not be read into memory) and the
number of values in them (a small body must not cost seconds of validation)."""
from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import Problem, validation_errors


class BodySizeLimit:
    """Pure ASGI middleware: bodies other than multipart uploads over ``max_bytes`` get a 413 problem.

    Checks Content-Length up front, and counts bytes as they arrive (chunked bodies have no length).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if headers.get(b"content-type", b"").startswith(b"multipart/form-data"):
            return await self.app(scope, receive, send)  # uploads have their own streamed cap
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send)
        # Read the (small, capped) body here and replay it: the app never sees more than max_bytes.
        chunks: list[bytes] = []
        seen = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # client went away
            chunk = msg.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                return await self._reject(send)
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Send) -> None:
        body = json.dumps({"type": "/problems/too_large", "title": "request body too large", "status": 413,
                           "detail": f"JSON bodies are limited to {self.max_bytes} bytes", "code": "too_large"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/problem+json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


async def json_shape_limits(request: Request) -> None:
    """App-wide dependency: a JSON body's element count and ``layers`` maps are capped before validation.

    A 33 KiB spec can hold thousands of nodes; pydantic validating (and a search expanding) them is where
    a small request would cost the API seconds and hundreds of MiB. FastAPI has parsed (and cached) the
    body before dependencies run and validates it after them, so this walk is the only cost a refused
    body has. Settings come from ``app.state``, not ``SettingsDep``: a sync dependency would cost every
    request (the job-polling fast path too) a thread hop.
    """
    if request.method in ("GET", "HEAD", "OPTIONS") or \
            request.headers.get("content-type", "").startswith("multipart/"):
        return  # no body, or a streamed upload that reads (and caps) its own body
    if not await request.body():
        return
    try:
        doc = await request.json()
    except (ValueError, RecursionError):
        return  # not JSON: the route refuses it (or never reads it)
    settings = request.app.state.settings
    check_json_shape(doc, max_elements=settings.max_json_elements, max_layers=settings.max_layers_entries)


def check_json_shape(doc: Any, *, max_elements: int, max_layers: int) -> None:
    """Refuse a parsed JSON document with more than ``max_elements`` nodes (413) or a ``layers`` object with
    more than ``max_layers`` entries (422), with the JSON path of the offending container.

    The walk is iterative and bounded: a container's children are counted before they are queued, so
    refusing a body never holds more than ``max_elements`` entries, whatever its shape or depth.
    """
    parents: list[tuple[int, Any]] = [(-1, None)]  # node id -> (parent id, key): paths built only on refusal
    stack: list[tuple[Any, int]] = [(doc, 0)]
    seen = 1
    while stack:
        node, nid = stack.pop()
        if isinstance(node, dict):
            children = node.items()
            layers = node.get("layers")
            if isinstance(layers, dict) and len(layers) > max_layers:
                loc = _loc(parents, nid) + ["layers"]
                raise Problem(422, "invalid_spec", "too many layers",
                              f"a layers map names at most {max_layers} layers; this one names {len(layers)}",
                              validation_errors([], [{"loc": loc, "msg": f"at most {max_layers} entries"}]))
        elif isinstance(node, list):
            children = enumerate(node)
        else:
            continue
        seen += len(node)
        if seen > max_elements:
            raise Problem(413, "too_large", "request body has too many elements",
                          f"JSON bodies are limited to {max_elements} values (objects, arrays, strings, numbers)",
                          validation_errors([], [{"loc": _loc(parents, nid),
                                                  "msg": f"more than {max_elements} values in the body"}]))
        for key, child in children:
            parents.append((nid, key))
            stack.append((child, len(parents) - 1))


def _loc(parents: list[tuple[int, Any]], nid: int) -> list[Any]:
    """The path of node ``nid`` from the root, as a ``loc`` list (``["spec", "steps", 0]``)."""
    loc: list[Any] = []
    while nid > 0:
        nid, key = parents[nid]
        loc.append(key)
    return loc[::-1]
