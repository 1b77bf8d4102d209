"""Zip archives from users (model zips, dataset ``.npz``): checks on the central directory, before it is
parsed (its size) and before anything is inflated (the sizes and ratios it declares).

A zip declares every member's compressed and uncompressed size in its central directory, so a bomb can
be refused from the directory alone, before a byte is inflated. The declared sizes may lie; whoever
inflates still counts real bytes (``zipfile`` itself stops a member at its declared size and then fails
its CRC check).
"""
from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path

from compression.errors import CompressionError

# What reading a corrupt or hostile zip raises: a bad header or CRC, broken deflate data, a truncated
# member, an encrypted (RuntimeError) or unknown-method member, a negative offset (ValueError). Not
# OSError: a full disk while extracting is the service's trouble, not a bad upload.
ZIP_ERRORS: tuple[type[Exception], ...] = (
    zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError, RuntimeError, struct.error,
)

# How a zip starts: a local file header, or an empty archive's end record (what ``np.load`` looks for too).
_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")

# A member (or archive) this much over the ratio bound is still fine: a small, highly compressible file
# (an all-zero bias, a labels array of one class) is no bomb; a bomb needs size.
RATIO_SLACK_BYTES = 1024 * 1024


def check_zip_sizes(zf: zipfile.ZipFile, *, archive_bytes: int, max_total: int | None, max_ratio: float | None,
                    error: type[CompressionError]) -> None:
    """Refuse a zip whose central directory declares too much, before anything is inflated.

    Args:
        zf: the open archive (only its directory is read).
        archive_bytes: the archive's size on disk (the whole-archive ratio is measured against it).
        max_total: cap on the declared uncompressed total; None: no cap here (the caller checks another way).
        max_ratio: cap on uncompressed / compressed, per member and for the whole archive (each with
            RATIO_SLACK_BYTES of slack); None: not checked (an archive this service stored itself).
        error: the exception to raise (``InvalidModel`` for model zips, ``InvalidDataset`` for ``.npz``).

    Raises:
        error: with a message naming the member and the bound.

    Example:
        >>> with zipfile.ZipFile(path) as zf:                                       # doctest: +SKIP
        ...     check_zip_sizes(zf, archive_bytes=path.stat().st_size, max_total=1 << 30, max_ratio=100,
        ...                     error=InvalidModel)
    """
    infos = [i for i in zf.infolist() if not i.is_dir()]
    total = sum(i.file_size for i in infos)  # Python ints: a lying 2**64 size cannot wrap
    if max_total is not None and total > max_total:
        raise error(f"zip unpacks to more than {max_total} bytes ({total} declared)")
    if max_ratio is None:
        return
    for info in infos:
        if info.file_size > max_ratio * info.compress_size + RATIO_SLACK_BYTES:
            raise error(f"zip member {info.filename!r} inflates {info.compress_size} bytes to {info.file_size} "
                        f"(more than {max_ratio:g}×): refused as a zip bomb")
    if total > max_ratio * archive_bytes + RATIO_SLACK_BYTES:
        raise error(f"the zip inflates {archive_bytes} bytes to {total} (more than {max_ratio:g}×): "
                    "refused as a zip bomb")


def is_zip(path: Path) -> bool:
    """Whether the file starts like a zip (as ``np.load`` decides; a zip behind a prefix does not count)."""
    with open(path, "rb") as f:
        return f.read(4) in _SIGNATURES


def check_zip_directory(path: Path, *, max_bytes: int, error: type[CompressionError]) -> None:
    """Refuse a zip whose central directory is over ``max_bytes``, before ``ZipFile`` parses it.

    ``ZipFile`` turns every directory entry into a ``ZipInfo`` (about 600 bytes of memory for a 46-byte
    entry): an 18 MiB upload of 200,000 empty members cost the API 117 MiB and a second just to open.
    A file that does not start like a zip is left alone (the caller does not read it as one).

    Raises:
        error: a directory over the cap, or an end record ``ZipFile`` would refuse.
    """
    if not is_zip(path):
        return
    with open(path, "rb") as f:
        try:
            end = zipfile._EndRecData(f)  # the very record ZipFile will trust (zip64 included)
        except ZIP_ERRORS as e:
            raise error(f"corrupt zip: {type(e).__name__}: {e}") from None
    if end is not None and end[zipfile._ECD_SIZE] > max_bytes:
        raise error(f"the zip's central directory is {end[zipfile._ECD_SIZE]} bytes (at most {max_bytes}): "
                    "too many members")
