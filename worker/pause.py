"""Test-only pause hook: hold a job at a chosen progress message, so a test acts on it mid-way.

A test that must catch a job running (to cancel it, kill its worker, read its progress) cannot win a
race against a job that may finish first on a fast — or a slow, loaded — machine. With
``NETCOMPRESS_TEST_PAUSE_FILE`` set (None, the default, turns this off), the worker's progress callback
calls :func:`pause_if_asked` first. While that file exists and its text matches the progress message —
a substring of ``message``, or ``phase:<name>`` for the phase; empty text matches any — the job writes
``<file>.reached`` (the progress as JSON, with the job id and the pid of the process running it) and
waits. Removing the file, or replacing it with another match, lets it go on; the progress is then
reported as usual, so a cancel asked for meanwhile is seen at once. ``testkit/stack.py`` (``Pause``) has the helpers that drive it.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from store.settings import Settings

POLL_S = 0.05


def _armed(path: Path) -> str | None:
    """The pause file's match text, or None when there is no pause file."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


def _matches(match: str, progress: dict[str, Any]) -> bool:
    if match.startswith("phase:"):
        return progress.get("phase") == match[len("phase:"):]
    return match in (progress.get("message") or "")


def reached_file(pause_file: Path) -> Path:
    """Where a paused job says so: ``<pause file>.reached``."""
    return pause_file.with_name(pause_file.name + ".reached")


def pause_if_asked(settings: Settings, job_id: str, progress: dict[str, Any]) -> bool:
    """Hold here while the test pause file matches ``progress``; returns whether it held."""
    path = settings.test_pause_file
    if path is None:
        return False
    match = _armed(path)
    if match is None or not _matches(match, progress):
        return False
    reached = reached_file(path)
    tmp = reached.with_name(f"{reached.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"job_id": job_id, "pid": os.getpid(), "progress": progress}))
    os.replace(tmp, reached)  # atomic: the test never reads half a file
    while _armed(path) == match:
        time.sleep(POLL_S)
    return True
