"""What every artifact store (the local folder, S3) shares about its objects: the key check, the size
cap's error, the chunk size. Its own module so that the stores import it and not each other."""
from __future__ import annotations

from pathlib import PurePosixPath

CHUNK = 1024 * 1024


class UploadTooLarge(Exception):
    """The stream passed the size cap; nothing was kept."""


class InvalidKey(ValueError):
    """A storage key that is not a relative POSIX path inside the store (absolute, empty, ``.`` or ``..``)."""


def check_key(key: str) -> PurePosixPath:
    """``key`` as a relative POSIX path; raises InvalidKey for one that could leave the store's root.

    >>> check_key("jobs/a/model.onnx").parts
    ('jobs', 'a', 'model.onnx')
    """
    p = PurePosixPath(key)
    if p.is_absolute() or any(part in ("", ".", "..") for part in p.parts) or not p.parts:
        raise InvalidKey(f"invalid storage key {key!r}")
    return p
