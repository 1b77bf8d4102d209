"""The artifact store on S3 (or any S3-compatible server): ``NETCOMPRESS_ARTIFACT_URL=s3://bucket/prefix``.

Implements :class:`store.artifacts.ArtifactStore`, as the local store does. Nothing is buffered whole: uploads go up as
multipart parts of ``s3_part_bytes`` (one part in memory at a time), downloads stream ``CHUNK`` by ``CHUNK``.
An object appears only when its upload completes (S3 semantics), so a failed write leaves nothing behind —
the multipart upload is aborted.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from store.objects import CHUNK, UploadTooLarge, check_key
from store.settings import Settings

_clients: dict[tuple[str | None, str | None], Any] = {}
_lock = threading.Lock()


def _client(endpoint_url: str | None, region: str | None):  # a botocore client
    """One boto3 client per endpoint per process (clients are thread-safe and costly to build)."""
    key = (endpoint_url, region)
    with _lock:
        if key not in _clients:
            import boto3
            from botocore.config import Config

            _clients[key] = boto3.client(
                "s3", endpoint_url=endpoint_url, region_name=region,
                config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                              s3={"addressing_style": "path"} if endpoint_url else None),
            )
        return _clients[key]


class S3ArtifactStore:
    """Objects are ``<prefix>/<key>`` in ``bucket``."""

    def __init__(self, bucket: str, prefix: str, client: Any, part_bytes: int = 8 * 1024**2) -> None:
        self.bucket, self.prefix, self.client, self.part_bytes = bucket, prefix.strip("/"), client, part_bytes

    def object_key(self, key: str) -> str:
        rel = "/".join(check_key(key).parts)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def put_file(self, key: str, src: Path) -> tuple[int, str]:
        """Upload ``src``; returns ``(size_bytes, sha256)``."""
        with open(src, "rb") as f:
            return self.put_stream(key, iter(lambda: f.read(CHUNK), b""))

    def put_stream(self, key: str, chunks: Iterator[bytes], max_bytes: int | None = None) -> tuple[int, str]:
        """Upload chunks, hashing on the way: one ``put_object`` when it fits in a part, else multipart."""
        okey = self.object_key(key)
        h, size = hashlib.sha256(), 0
        buf = bytearray()
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        try:
            for chunk in chunks:
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise UploadTooLarge(f"upload exceeds {max_bytes} bytes")
                h.update(chunk)
                buf += chunk
                while len(buf) >= self.part_bytes:
                    if upload_id is None:
                        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=okey)["UploadId"]
                    part, buf = bytes(buf[:self.part_bytes]), buf[self.part_bytes:]
                    n = len(parts) + 1
                    etag = self.client.upload_part(Bucket=self.bucket, Key=okey, UploadId=upload_id, PartNumber=n,
                                                   Body=part)["ETag"]
                    parts.append({"ETag": etag, "PartNumber": n})
            if upload_id is None:
                self.client.put_object(Bucket=self.bucket, Key=okey, Body=bytes(buf),
                                       Metadata={"sha256": h.hexdigest()})
            else:
                if buf or not parts:
                    n = len(parts) + 1
                    etag = self.client.upload_part(Bucket=self.bucket, Key=okey, UploadId=upload_id, PartNumber=n,
                                                   Body=bytes(buf))["ETag"]
                    parts.append({"ETag": etag, "PartNumber": n})
                self.client.complete_multipart_upload(Bucket=self.bucket, Key=okey, UploadId=upload_id,
                                                      MultipartUpload={"Parts": parts})
        except BaseException:
            if upload_id is not None:
                try:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=okey, UploadId=upload_id)
                except Exception:  # the bucket's lifecycle rule cleans up what this could not
                    pass
            raise
        return size, h.hexdigest()

    def open(self, key: str) -> BinaryIO:
        """A streaming, read-only file object over the object's body."""
        return self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))["Body"]

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        body = self.open(key)
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def local_file(self, key: str, dest: Path) -> Path:
        """Download the object to ``dest`` (streamed; written to a temp name, then renamed) and return ``dest``."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in self.iter_bytes(key):
                    out.write(chunk)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))

    def delete_prefix(self, prefix: str) -> None:
        """Delete the object ``prefix`` and everything under ``prefix/`` (not ``prefixX``: ids share prefixes)."""
        base = self.object_key(prefix)
        self.delete(prefix)
        keys: list[dict[str, str]] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + "/"):
            keys.extend({"Key": o["Key"]} for o in page.get("Contents", []))
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[i:i + 1000], "Quiet": True})


def s3_store(settings: Settings) -> S3ArtifactStore:
    """The store for ``settings.artifact_url`` (``s3://bucket/prefix``)."""
    bucket, prefix = settings.s3_bucket_prefix
    return S3ArtifactStore(bucket, prefix, _client(settings.s3_endpoint_url, settings.s3_region),
                           part_bytes=settings.s3_part_bytes)
