"""Datasets: safe ``.npz`` loading, validation against a model's inputs, the held-out split."""
from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compression.archives import ZIP_ERRORS, check_zip_sizes, is_zip
from compression.errors import InvalidDataset

LABELS = "labels"


@dataclass
class Arrays:
    """Named input arrays (first axis = samples) and optional integer labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    @property
    def samples(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, idx: np.ndarray) -> "Arrays":
        return Arrays({k: v[idx] for k, v in self.inputs.items()},
                      None if self.labels is None else self.labels[idx])

    def batches(self, batch_size: int, *, shuffle: bool = False, rng: np.random.Generator | None = None):
        n = self.samples
        order = (rng or np.random.default_rng(0)).permutation(n) if shuffle else np.arange(n)
        for start in range(0, n, batch_size):
            yield self.take(order[start:start + batch_size])


@dataclass
class DataSplit:
    train: Arrays
    holdout: Arrays
    meta: dict[str, Any] = field(default_factory=dict)


def inspect_npz(path: Path, *, max_uncompressed_bytes: int,
                max_ratio: float | None = None) -> dict[str, dict[str, Any]]:
    """Read only the array headers of an ``.npz``: names, shapes, dtypes. Refuses pickles, bombs, nonsense.

    The uncompressed size is computed from the headers (shape × itemsize, in Python ints so that no
    product wraps), so a zip bomb is caught before a byte of it is inflated; the zip's compression ratios
    are checked before any header is read.

    Args:
        path: the ``.npz`` on disk.
        max_uncompressed_bytes: cap on the arrays' total size.
        max_ratio: cap on a member's uncompressed / compressed size (see
            :func:`compression.archives.check_zip_sizes`); None: not checked.

    Returns:
        ``{name: {"shape": [...], "dtype": "float32"}}``, every array with the same number (≥ 1) of samples.

    Raises:
        InvalidDataset: not a zip, a corrupt one, a bomb, a bad or hostile ``.npy`` header.

    Example:
        >>> inspect_npz(Path("mnist.npz"), max_uncompressed_bytes=1 << 30)        # doctest: +SKIP
        {'input': {'shape': [1000, 1, 28, 28], 'dtype': 'float32'}, 'labels': {'shape': [1000], 'dtype': 'int64'}}
    """
    if not is_zip(path):  # ZipFile would find a zip behind a prefix; np.load would not
        raise InvalidDataset("not an .npz archive (a zip of .npy arrays)")
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, *ZIP_ERRORS) as e:
        raise InvalidDataset(f"not an .npz archive: {e}") from None
    out: dict[str, dict[str, Any]] = {}
    total = 0
    with zf:
        check_zip_sizes(zf, archive_bytes=path.stat().st_size, max_total=None, max_ratio=max_ratio,
                        error=InvalidDataset)
        for info in zf.infolist():
            if not info.filename.endswith(".npy") or "/" in info.filename or info.filename.startswith("."):
                raise InvalidDataset(f"unexpected member {info.filename!r} in .npz")
            name = info.filename[:-4]
            if name in out:
                raise InvalidDataset(f"array {name!r} appears twice in the .npz")
            shape, dtype, nbytes, header_bytes = _npy_header(zf, info, name)
            total += nbytes
            if total > max_uncompressed_bytes:
                raise InvalidDataset(f"uncompressed size exceeds {max_uncompressed_bytes} bytes")
            if info.file_size != header_bytes + nbytes:  # truncated, padded, or a lying zip header
                raise InvalidDataset(f"array {name!r}: the zip holds {info.file_size} bytes but its header "
                                     f"describes {header_bytes + nbytes}")
            out[name] = {"shape": list(shape), "dtype": str(dtype)}
    if not out:
        raise InvalidDataset("the .npz holds no arrays")
    counts = {v["shape"][0] for v in out.values()}
    if len(counts) != 1:
        raise InvalidDataset(f"arrays disagree on the number of samples: {sorted(counts)}")
    if counts == {0}:
        raise InvalidDataset("the arrays hold no samples (first axis 0); a dataset needs at least one")
    if LABELS in out and len(out[LABELS]["shape"]) != 1:
        raise InvalidDataset("labels must be a 1-D array of class indices")
    return out


# Any one axis longer than this is nonsense for a dataset (and past what int32 indexing can reach).
MAX_DIM = 2**31


def _npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo,
                name: str) -> tuple[tuple[int, ...], np.dtype, int, int]:
    """One member's ``.npy`` header, checked: (shape, dtype, data bytes, header bytes). Reads the header only."""
    try:
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, _fortran, dtype = reader(f)  # the header only, never the data
            header_bytes = f.tell()
    except ZIP_ERRORS as e:  # numpy's header errors are ValueErrors; a broken member raises zip/zlib errors
        raise InvalidDataset(f"array {name!r}: bad header ({type(e).__name__}: {e})") from None
    if dtype.hasobject:
        raise InvalidDataset(f"array {name!r} holds Python objects (pickles are refused)")
    if dtype.kind not in "biuf":
        raise InvalidDataset(f"array {name!r} has unsupported dtype {dtype}")
    if len(shape) == 0:
        raise InvalidDataset(f"array {name!r} is a scalar; the first axis must be samples")
    if any(type(d) is not int for d in shape):  # numpy lets True through as a dimension
        raise InvalidDataset(f"array {name!r}: shape {shape} is not a list of integers")
    if any(d < 0 for d in shape):
        raise InvalidDataset(f"array {name!r}: negative dimension in shape {shape}")
    if any(d > MAX_DIM for d in shape):
        raise InvalidDataset(f"array {name!r}: dimension over {MAX_DIM} in shape {shape}")
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints (numpy's int64 product wraps to 0 for 2**32 × 2**32)
    return shape, dtype, nbytes, header_bytes


def check_npz_data(path: Path) -> None:
    """Stream every member through zipfile's CRC check: proves the data intact in O(chunk) memory.

    Call after :func:`inspect_npz`, which refused bombs from the directory and the headers (so what is
    inflated here is at most the checked total).

    Raises:
        InvalidDataset: a bad CRC, broken compressed data, a member shorter than the zip declares.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                with zf.open(info) as f:
                    while f.read(1 << 20):
                        pass
    except ZIP_ERRORS as e:
        raise InvalidDataset(f"the .npz data is unreadable: {type(e).__name__}: {e}") from None


def check_against_model(arrays: dict[str, dict[str, Any]], inputs: list[dict[str, Any]]) -> list[str]:
    """Problems that stop a dataset from feeding a model (names, ranks, fixed dims); [] when it fits."""
    problems = []
    names = {i["name"] for i in inputs}
    for spec in inputs:
        arr = arrays.get(spec["name"])
        if arr is None:
            problems.append(f"dataset has no array named {spec['name']!r} (model input)")
            continue
        shape = spec["shape"]
        if len(arr["shape"]) != len(shape):
            problems.append(f"{spec['name']}: rank {len(arr['shape'])} but the model expects {len(shape)}")
            continue
        for axis, (want, got) in enumerate(zip(shape, arr["shape"])):
            if axis > 0 and isinstance(want, int) and want > 0 and want != got:
                problems.append(f"{spec['name']}: axis {axis} is {got} but the model expects {want}")
    extra = set(arrays) - names - {LABELS}
    if extra:
        problems.append(f"arrays not used by the model: {sorted(extra)}")
    return problems


def load_npz(path: Path, input_dtypes: dict[str, np.dtype]) -> Arrays:
    """Load arrays (``allow_pickle=False``), casting each to the model input's dtype."""
    with np.load(path, allow_pickle=False) as z:
        inputs = {k: np.ascontiguousarray(z[k].astype(input_dtypes[k], copy=False)) for k in input_dtypes}
        labels = z[LABELS].astype(np.int64) if LABELS in z.files else None
    return Arrays(inputs, labels)


def split(arrays: Arrays, *, holdout: float, seed: int, max_eval: int) -> DataSplit:
    """Deterministic shuffle and split; the held-out part is never trained on."""
    n = arrays.samples
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_hold = max(1, min(int(round(n * holdout)), max_eval, n - 1)) if n > 1 else 1
    hold, train = order[:n_hold], order[n_hold:] if n > 1 else order
    return DataSplit(arrays.take(train), arrays.take(hold), {"train": len(train), "holdout": len(hold), "seed": seed})


def synthetic_inputs(inputs: list[dict[str, Any]], batch: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for latency and fidelity checks when no dataset was uploaded.

    Symbolic dims other than the batch become 16 (a sequence length); integer inputs get small
    non-negative ids so that embedding lookups stay in range.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for spec in inputs:
        shape = [batch] + [d if isinstance(d, int) and d > 0 else 16 for d in spec["shape"][1:]]
        dtype = np.dtype(spec["dtype"])
        if dtype.kind in "iu":
            out[spec["name"]] = rng.integers(0, 2 if "mask" in spec["name"] else 100, size=shape).astype(dtype)
        elif dtype.kind == "b":
            out[spec["name"]] = np.ones(shape, dtype=dtype)
        else:
            out[spec["name"]] = rng.standard_normal(shape).astype(dtype)
    return out
