"""Streaming multipart uploads: the file part goes straight to disk, hashed, under a size cap.

Starlette's form parser spools the whole body before the route runs; a 10 GB upload would fill the
disk before we could refuse it. This parser writes chunk by chunk and stops at the cap (413), deleting
what it wrote. The text fields beside the file are held in memory, so their count and total size are
capped too, and so is the whole body as it streams (a chunked body declares no length).
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
from store.settings import Settings

MAX_FIELD_BYTES = 64 * 1024
FRAMING_BYTES = 64 * 1024  # boundaries, part headers and the like, beyond the file and the fields


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


async def receive_upload(request: Request, *, settings: Settings, file_field: str = "file") -> Upload:
    """Parse ``multipart/form-data`` from the request stream; only ``file_field`` may be a file.

    Caps (413): the file at ``max_upload_bytes``, each text field at MAX_FIELD_BYTES, the text fields at
    ``max_form_fields`` and ``max_form_field_bytes_total`` together, and the whole body at their sum.
    """
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise Problem(415, "unsupported_media_type", "multipart/form-data expected",
                      f"send the file as multipart field {file_field!r}")
    max_bytes, max_fields = settings.max_upload_bytes, settings.max_form_fields
    max_field_total = settings.max_form_field_bytes_total
    max_body = max_bytes + max_field_total + FRAMING_BYTES
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body:
        raise Problem(413, "too_large", "upload too large", f"the limit is {max_bytes} bytes")
    tmp_root = settings.home / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    up = Upload(folder=Path(tempfile.mkdtemp(prefix="upload-", dir=tmp_root)))
    state: dict = {"headers": {}, "field": None, "value": b"", "out": None, "name": "", "hval": b"", "hfield": b"",
                   "fields": 0, "field_bytes": 0}
    h = hashlib.sha256()
    error: list[Problem] = []

    def count_field_bytes(n: int) -> None:
        """Text fields and part headers live in memory until the route runs: one budget for all of them."""
        state["field_bytes"] += n
        if state["field_bytes"] > max_field_total and not error:
            error.append(Problem(413, "too_large", "form fields too large",
                                 f"the text fields and part headers of an upload are limited to {max_field_total} "
                                 "bytes together"))

    def on_header_field(data: bytes, start: int, end: int) -> None:
        count_field_bytes(end - start)
        state["hfield"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        count_field_bytes(end - start)
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
            state["fields"] += 1
            if state["fields"] > max_fields and not error:
                error.append(Problem(413, "too_large", "too many form fields",
                                     f"an upload takes at most {max_fields} text fields beside the file"))

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
            count_field_bytes(len(chunk))
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
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_body:  # also bounds what follows the closing boundary, which the parser skips
                error.append(Problem(413, "too_large", "upload too large", f"the limit is {max_bytes} bytes"))
            else:
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
