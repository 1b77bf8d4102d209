"""The local artifact store: atomic writes with sha256, size caps, no path escapes."""
from __future__ import annotations

import hashlib

import pytest

from store.artifacts import LocalArtifactStore
from store.objects import InvalidKey, UploadTooLarge


def test_put_stream_is_atomic_and_hashed(tmp_path):
    store = LocalArtifactStore(tmp_path)
    size, sha = store.put_stream("jobs/a/model.onnx", iter([b"abc", b"def"]))
    assert size == 6 and sha == hashlib.sha256(b"abcdef").hexdigest()
    assert store.path("jobs/a/model.onnx").read_bytes() == b"abcdef"
    assert [p.name for p in (tmp_path / "jobs/a").iterdir()] == ["model.onnx"]


def test_cap_leaves_nothing(tmp_path):
    store = LocalArtifactStore(tmp_path)
    with pytest.raises(UploadTooLarge):
        store.put_stream("x/big", iter([b"a" * 10, b"b" * 10]), max_bytes=15)
    assert not store.exists("x/big")
    assert list((tmp_path / "x").iterdir()) == []


def test_failed_write_keeps_old_object(tmp_path):
    store = LocalArtifactStore(tmp_path)
    store.put_stream("k/v", iter([b"old"]))

    def broken():
        yield b"new"
        raise OSError("disk gone")

    with pytest.raises(OSError):
        store.put_stream("k/v", broken())
    assert store.path("k/v").read_bytes() == b"old"


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a/../../b", "", "."])
def test_keys_cannot_escape(tmp_path, key):
    with pytest.raises(InvalidKey):
        LocalArtifactStore(tmp_path).path(key)
