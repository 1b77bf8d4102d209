"""The artifact store: its protocol, the local folder store (written atomically, with sha256), and the
factory that picks the local or the S3 store from the settings."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from store.objects import CHUNK, UploadTooLarge, check_key
from store.settings import Settings


class ArtifactStore(Protocol):
    """What the API and the worker need of a store; keys are relative POSIX paths (``jobs/<id>/model.onnx``).

    :class:`LocalArtifactStore` and :class:`store.s3.S3ArtifactStore` implement it; callers type their store
    as this, never as one of them (``path()`` exists only on the local store).
    """

    def put_file(self, key: str, src: Path) -> tuple[int, str]: ...
    def put_stream(self, key: str, chunks: Iterator[bytes], max_bytes: int | None = None) -> tuple[int, str]: ...
    def open(self, key: str) -> BinaryIO: ...
    def iter_bytes(self, key: str) -> Iterator[bytes]: ...
    def local_file(self, key: str, dest: Path) -> Path: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...


def private_copy(store: ArtifactStore, key: str, dest: Path) -> Path:
    """The object's bytes at ``dest``, a file of its own: what a sandboxed child may be handed (and own).

    The local store's ``local_file`` is the stored file itself, which a sandbox must never own or write; S3
    downloads to ``dest`` anyway.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    src = store.local_file(key, dest)
    if Path(src) != dest:
        shutil.copyfile(src, dest)
    return dest


class LocalArtifactStore:
    """Objects are files under ``root``; a write goes to a temp file in the same folder, then a rename.

    A crash mid-write therefore leaves at most a ``.tmp-*`` file, never a half-written object.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)  # every team's models: no other uid (a sandbox's above all) may read them

    def path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).parts)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def _tmp_for(self, key: str) -> tuple[Path, int]:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dest.parent)
        return Path(tmp), fd

    def put_file(self, key: str, src: Path) -> tuple[int, str]:
        """Copy ``src`` in atomically; returns ``(size_bytes, sha256)``."""
        with open(src, "rb") as f:
            return self.put_stream(key, iter(lambda: f.read(CHUNK), b""))

    def put_stream(self, key: str, chunks: Iterator[bytes], max_bytes: int | None = None) -> tuple[int, str]:
        """Write chunks atomically, hashing on the way; over ``max_bytes`` raises UploadTooLarge."""
        tmp, fd = self._tmp_for(key)
        h, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise UploadTooLarge(f"upload exceeds {max_bytes} bytes")
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path(key))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size, h.hexdigest()

    def open(self, key: str) -> BinaryIO:
        return open(self.path(key), "rb")

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        with self.open(key) as f:
            yield from iter(lambda: f.read(CHUNK), b"")

    def local_file(self, key: str, dest: Path) -> Path:
        """A local file with the object's bytes, to read only: here the stored file itself (``dest`` unused;
        the S3 store downloads to it)."""
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        return path

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        target = self.path(prefix)
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def get_artifact_store(settings: Settings) -> ArtifactStore:
    """The store ``NETCOMPRESS_ARTIFACT_URL`` names: a local folder, or S3 for ``s3://bucket/prefix``."""
    if settings.artifact_is_s3:
        from store.s3 import s3_store

        return s3_store(settings)
    return LocalArtifactStore(settings.artifact_root)
