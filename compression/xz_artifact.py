"""The entropy-coded download of a model: ``model.onnx.xz`` (stdlib LZMA), and its loader.

Weight sharing and pruning leave long runs of the same few byte values in the ONNX file; an entropy
coder turns that into real bytes saved on disk and on the wire (Deep Compression's Huffman stage).
xz (LZMA2) is in the standard library, so users need nothing to read the artifact::

    xz -d model.onnx.xz        # or, in Python:
    onnx.load_from_string(compression.xz_artifact.load_compressed("model.onnx.xz"))

``compressed_bytes`` in the metrics is the size of exactly this artifact.
"""
from __future__ import annotations

import hashlib
import lzma
from pathlib import Path

SUFFIX = ".xz"
# LZMA spends ~0.5 s/MB on float weights; above this size the fast preset keeps jobs on big models
# (a 90 MB transformer) from spending minutes here, at a few percent in size.
FAST_ABOVE_BYTES = 16 * 1024 * 1024
# Above this the artifact and the metric are skipped: xz runs at ~0.6 s/MB on float weights here (a minute for
# a 100 MB model, per measured model) and float weights barely compress — the low-bit schemes that do shrink
# under entropy coding bring models far below it.
MAX_COMPRESS_BYTES = 64 * 1024 * 1024
MAX_DECOMPRESSED_BYTES = 4 * 1024**3
# Literal-coder settings tried (beside preset 6) on blobs that compress well. lc=0 codes each literal byte with
# no context from the previous one: the codes, gaps and masks of clustered weights are each close to a
# memoryless source, so the 8 contexts of the default lc=3 only split the statistics (LeNet-300-100 clustered
# at 92% sparsity, bitmap layout: 30,168 -> 29,152 bytes, -3.4%); other data keeps the default's (lc=3).
EXTREME_CANDIDATES = ({"pb": 0}, {"pb": 0, "lc": 0})
# Each extreme pass costs ~1.6 s/MB here (a 4 MB pruned float32 blob: preset 6 4 s, each 9e pass 6.4 s), so
# up to this size (the small artifacts that low-bit layouts make) the lc=0 pass runs too, and the extreme passes
# start from a 3/4 ratio instead of 1/2; bigger blobs keep the one 9e/pb=0 pass below half size.
SMALL_BYTES = 4 * 1024 * 1024

_cache: dict[str, bytes] = {}  # sha256 -> compressed, the last blob only (measure, then publish)


def compress(blob: bytes) -> bytes:
    """xz-compress ``blob`` (preset 6; 9e/pb=0 and, below ``SMALL_BYTES``, 9e/pb=0/lc=0 too when it compresses
    well, keeping the smallest; preset 0 above ``FAST_ABOVE_BYTES``).

    Deterministic: the same bytes always give the same artifact.

    Example:
        >>> len(compress(bytes(100_000))) < 200
        True
    """
    key = hashlib.sha256(blob).hexdigest()
    if key not in _cache:
        out = lzma.compress(blob, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                            preset=0 if len(blob) > FAST_ABOVE_BYTES else 6)
        small = len(blob) <= SMALL_BYTES
        if len(blob) <= FAST_ABOVE_BYTES and len(out) < len(blob) * (3 if small else 2) // 4:
            # Packed low-bit codes compress well and are bytes with no 4-byte structure: the extreme preset
            # with pb=0 (no position context) saves another ~5% on them. Float32 weights do not compress
            # much (to ~92%) and gain nothing from it, so they get the single fast pass. Small blobs pass at
            # 3/4: relative-index sparse layers are already near their entropy in the ONNX (LeNet-300-100 at
            # 92% sparsity: 56 KB -> 29 KB) and still gain here. xz records the settings.
            for extra in EXTREME_CANDIDATES if small else EXTREME_CANDIDATES[:1]:
                alt = lzma.compress(blob, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                                    filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, **extra}])
                out = min(out, alt, key=len)
        _cache.clear()
        _cache[key] = out
    return _cache[key]


def compressed_size(blob: bytes) -> int | None:
    """Size in bytes of ``compress(blob)``; None above ``MAX_COMPRESS_BYTES`` (not measured)."""
    return len(compress(blob)) if len(blob) <= MAX_COMPRESS_BYTES else None


def write_compressed(model_path: Path, dest: Path | None = None) -> Path:
    """Write ``<model_path>.xz`` beside the model (or at ``dest``); returns its path."""
    model_path = Path(model_path)
    dest = Path(dest) if dest is not None else model_path.with_name(model_path.name + SUFFIX)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(compress(model_path.read_bytes()))
    tmp.replace(dest)
    return dest


def load_compressed(path: str | Path, *, max_bytes: int = MAX_DECOMPRESSED_BYTES) -> bytes:
    """The ONNX bytes inside a ``.onnx.xz`` artifact.

    Args:
        path: the downloaded artifact.
        max_bytes: refuse to inflate beyond this (a hostile file could be a decompression bomb).

    Returns:
        The original ``model.onnx`` bytes, byte for byte.

    Raises:
        ValueError: not an xz file, truncated, or larger than ``max_bytes`` once inflated.

    Example:
        >>> onnx.load_from_string(load_compressed("model.onnx.xz"))  # doctest: +SKIP
    """
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    out = bytearray()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                out += dec.decompress(chunk, max_length=max_bytes + 1 - len(out))
                while dec.needs_input is False and not dec.eof:
                    out += dec.decompress(b"", max_length=max_bytes + 1 - len(out))
                    if len(out) > max_bytes:
                        break
            except lzma.LZMAError as e:
                raise ValueError(f"not a valid .xz artifact: {e}") from None
            if len(out) > max_bytes:
                raise ValueError(f"artifact inflates beyond {max_bytes} bytes")
            if dec.eof:
                break
    if not dec.eof:
        raise ValueError("truncated .xz artifact")
    return bytes(out)
