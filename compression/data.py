"""Datasets: safe ``.npz`` loading, validation against a model's inputs, the held-out split."""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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


def inspect_npz(path: Path, *, max_uncompressed_bytes: int) -> dict[str, dict[str, Any]]:
    """Read only the array headers of an ``.npz``: names, shapes, dtypes. Refuses pickles and bombs.

    The uncompressed size is computed from the headers (shape × itemsize), so a zip bomb is caught
    before a byte of it is inflated.
    """
    out: dict[str, dict[str, Any]] = {}
    total = 0
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise InvalidDataset(f"not an .npz archive: {e}") from None
    with zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy") or "/" in info.filename or info.filename.startswith("."):
                raise InvalidDataset(f"unexpected member {info.filename!r} in .npz")
            name = info.filename[:-4]
            with zf.open(info) as f:
                try:
                    version = np.lib.format.read_magic(f)
                    reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                              else np.lib.format.read_array_header_2_0)
                    shape, _fortran, dtype = reader(f)  # the header only, never the data
                except (ValueError, OSError) as e:
                    raise InvalidDataset(f"array {name!r}: bad header ({e})") from None
            if dtype.hasobject:
                raise InvalidDataset(f"array {name!r} holds Python objects (pickles are refused)")
            if dtype.kind not in "biuf":
                raise InvalidDataset(f"array {name!r} has unsupported dtype {dtype}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            total += nbytes
            if total > max_uncompressed_bytes:
                raise InvalidDataset(f"uncompressed size exceeds {max_uncompressed_bytes} bytes")
            if len(shape) == 0:
                raise InvalidDataset(f"array {name!r} is a scalar; the first axis must be samples")
            out[name] = {"shape": list(shape), "dtype": str(dtype)}
    if not out:
        raise InvalidDataset("the .npz holds no arrays")
    counts = {v["shape"][0] for v in out.values()}
    if len(counts) != 1:
        raise InvalidDataset(f"arrays disagree on the number of samples: {sorted(counts)}")
    if LABELS in out and len(out[LABELS]["shape"]) != 1:
        raise InvalidDataset("labels must be a 1-D array of class indices")
    return out


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
