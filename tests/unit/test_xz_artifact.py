"""The entropy-coded download ``model.onnx.xz``: round trip, the size cap, and a loader that refuses bombs."""
from __future__ import annotations

import lzma

import numpy as np
import pytest

from compression.xz_artifact import MAX_COMPRESS_BYTES, compress, compressed_size, load_compressed, write_compressed


def test_compressed_artifact_round_trip(tmp_path):
    blob = np.repeat(np.arange(50, dtype=np.uint8), 2000).tobytes() + np.random.default_rng(0).bytes(3000)
    src = tmp_path / "model.onnx"
    src.write_bytes(blob)
    xz = write_compressed(src)
    assert xz.name == "model.onnx.xz" and xz.stat().st_size == len(compress(blob)) < len(blob) / 10
    assert load_compressed(xz) == blob


def test_compressed_size_is_not_measured_above_the_cap():
    assert compressed_size(bytes(1000)) == len(compress(bytes(1000)))
    assert compressed_size(bytes(MAX_COMPRESS_BYTES + 1)) is None


def test_loader_refuses_bombs_and_garbage(tmp_path):
    bomb = tmp_path / "bomb.xz"
    bomb.write_bytes(lzma.compress(bytes(10_000_000)))
    with pytest.raises(ValueError, match="inflates"):
        load_compressed(bomb, max_bytes=1_000_000)
    bad = tmp_path / "bad.xz"
    bad.write_bytes(b"not xz at all")
    with pytest.raises(ValueError, match="xz"):
        load_compressed(bad)
    cut = tmp_path / "cut.xz"
    cut.write_bytes(lzma.compress(np.random.default_rng(0).bytes(100_000))[:5000])
    with pytest.raises(ValueError, match="truncated"):
        load_compressed(cut)


def test_memoryless_codes_get_the_context_free_literal_coder():
    """A pruned layer's nonzero bitmap is near-memoryless bytes: lc=0 stores it smaller than pb=0 alone."""
    mask = np.random.default_rng(1).random(200_000) < 0.07
    blob = np.packbits(mask, bitorder="little").tobytes()
    pb0 = lzma.compress(blob, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                        filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "pb": 0}])
    assert len(compress(blob)) < len(pb0)
    assert lzma.decompress(compress(blob)) == blob
