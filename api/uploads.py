"""Streaming multipart uploads: the file part goes straight to disk, hashed, under a size cap.

Starlette's form parser spools the whole body before the route runs; a 10 GB upload would fill the
disk before we could refuse it. This parser writes chunk by chunk and stops at the cap (413), deleting
what it wrote.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from api.errors import Problem

MAX_FIELD_BYTES = 64 * 1024


@dataclass
class Upload:
    """The uploaded file on disk (in a private temp folder) plus the small text fields."""

    folder: Path
    path: Path | None = None
    filename: str = ""
    size: int = 0
    sha256: str = ""
    fields: dict[str, str] = field(default_factory=dict)

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


async def receive_upload(request: Request, *, tmp_root: Path, max_bytes: int, file_field: str = "file") -> Upload:
    """Parse ``multipart/form-data`` from the request stream; only ``file_field`` may be a file."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise Problem(415, "unsupported_media_type", "multipart/form-data expected",
                      f"send the file as multipart field {file_field!r}")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
        raise Problem(413, "too_large", "upload too large", f"the limit is {max_bytes} bytes")
    tmp_root.mkdir(parents=True, exist_ok=True)
    up = Upload(folder=Path(tempfile.mkdtemp(prefix="upload-", dir=tmp_root)))
    state: dict = {"headers": {}, "field": None, "value": b"", "out": None, "name": "", "hval": b"", "hfield": b""}
    h = hashlib.sha256()
    error: list[Problem] = []

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["hfield"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["hval"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["hfield"].lower()] = state["hval"]
        state["hfield"], state["hval"] = b"", b""

    def on_headers_finished() -> None:
        _, opts = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        state["name"] = name
        if b"filename" in opts:
            if name != file_field or up.path is not None:
                error.append(Problem(422, "validation_error", "unexpected file field",
                                     f"only one file, in field {file_field!r}"))
                return
            up.filename = os.path.basename(opts[b"filename"].decode("utf-8", "replace"))
            up.path = up.folder / "upload"
            state["out"] = open(up.path, "wb")
        else:
            state["value"] = b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if error:
            return
        chunk = data[start:end]
        if state["out"] is not None:
            up.size += len(chunk)
            if up.size > max_bytes:
                error.append(Problem(413, "too_large", "upload too large", f"the limit is {max_bytes} bytes"))
                return
            h.update(chunk)
            state["out"].write(chunk)
        else:
            state["value"] += chunk
            if len(state["value"]) > MAX_FIELD_BYTES:
                error.append(Problem(413, "too_large", "form field too large", state["name"]))

    def on_part_end() -> None:
        if state["out"] is not None:
            state["out"].close()
            state["out"] = None
        elif state["name"]:
            up.fields[state["name"]] = state["value"].decode("utf-8", "replace")
        state["headers"] = {}

    parser = MultipartParser(params[b"boundary"], {
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data, "on_part_end": on_part_end,
    })
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if error:
                break
        parser.finalize()
    except Problem:
        up.cleanup()
        raise
    except Exception as e:
        up.cleanup()
        raise Problem(400, "bad_request", "malformed multipart body", type(e).__name__) from None
    finally:
        if state["out"] is not None:
            state["out"].close()
    if error:
        up.cleanup()  # the partial file goes with the folder
        raise error[0]
    if up.path is None:
        up.cleanup()
        raise Problem(422, "validation_error", "file missing", f"multipart field {file_field!r} is required",
                      [{"path": f"$.{file_field}", "loc": [file_field], "message": "field required"}])
    up.sha256 = h.hexdigest()
    return up
