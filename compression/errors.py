"""Errors the engine raises; the service maps them to HTTP problems or failed jobs."""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any


class CompressionError(Exception):
    """Base class. ``code`` is a stable machine-readable reason, stored on failed jobs; ``details`` (JSON-safe,
    often empty) says the same for a program: a failed job carries it as ``error.details``."""

    code = "compression_error"

    def __init__(self, *args: Any, details: dict[str, Any] | None = None) -> None:
        super().__init__(*args)
        self.details: dict[str, Any] = dict(details or {})


class InvalidModel(CompressionError):
    """The upload is not a model we can read (bad bytes, unsafe external data, unsupported format)."""

    code = "invalid_model"


class UnsupportedModelFormat(InvalidModel):
    """A format we refuse on principle (pickled checkpoints)."""

    code = "unsupported_format"


class InvalidDataset(CompressionError):
    code = "invalid_dataset"


class InvalidSpec(CompressionError):
    """A spec that does not validate. ``errors`` holds ``{"loc": [...], "msg": ...}`` entries."""

    code = "invalid_spec"

    def __init__(self, message: str, errors: list[dict] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


class NotApplicable(InvalidSpec):
    """The step cannot act on this model at all (no prunable layer, no classifier for exit heads): a
    deterministic refusal that preflight predicts, with the reason in the message."""

    code = "not_applicable"


class NotTrainable(CompressionError):
    """A step needs training but the model cannot be turned into a trainable torch module."""

    code = "not_trainable"


class UnsupportedOp(CompressionError):
    """A technique's engine (ONNX Runtime's quantizer, its float16 converter) cannot handle an op of the graph.

    ``op_types`` names them; the message says what failed, without server paths.
    """

    code = "unsupported_op"

    def __init__(self, message: str, op_types: list[str] | None = None) -> None:
        super().__init__(message, details={"op_types": list(op_types or [])})
        self.op_types = op_types or []


class QuantizerFailed(CompressionError):
    """ONNX Runtime's quantizer failed on the model, or what it wrote does not load and run; the message says
    why in one line, without server paths."""

    code = "quantizer_failed"


class QualityGateFailed(CompressionError):
    """A step's model fell past the job's fidelity budget (``eval.max_drop``, ``eval.min_cosine``, or its output
    changed shape): a deterministic failure, never retried. ``details`` holds the step and the numbers
    (:func:`compression.gate.check_gate`)."""

    code = "quality_gate"


class Cancelled(CompressionError):
    """Raised from a progress callback when the job was cancelled; techniques let it propagate."""

    code = "cancelled"


class TimeLimitExceeded(Cancelled):
    """The job ran past its wall-clock limit (raised from the progress callback like a cancel)."""

    code = "time_limit"


# One path segment: anything but separators, whitespace, quotes and the punctuation that ends a path in prose.
_SEGMENT = r"[^\s/\\'\"`,;:()\[\]{}<>|]+"
# Not glued to what comes before: "and/or", "1/2", "a/b", "steps[0]/x" and "http://host/x" are not paths.
_START = r"(?<![\w./~:)\]}-])"
# An absolute path (or a file: URL); the last segment, the file name, is group 1.
_ABSOLUTE = re.compile(rf"(?:{_START}|{_START}file:)/+(?:{_SEGMENT}/+)*({_SEGMENT})")
# What a file the service keeps ends in; an ONNX node name (``/features/features.3/Conv``) does not.
_FILE_SUFFIXES = (".onnx", ".data", ".zip", ".npz", ".npy", ".pt2", ".pt", ".pth", ".bin", ".json", ".txt", ".log",
                  ".db", ".py", ".so", ".xz", ".pb", ".tmp", ".part", ".svg", ".yaml", ".yml")


def scrub_paths(message: str, roots: Sequence[str] = ()) -> str:
    """The message with every server path replaced by its file name: absolute paths, and relative paths
    under one of ``roots`` (the service's working folders relative to its current directory, as a library
    may print them: ``var/tmp/…``).

    ONNX Runtime, onnx and torch name the file they failed on; on a shared service that tells a caller
    where the service keeps everyone's uploads. The file name alone keeps the message useful.

    Example:
        >>> scrub_paths("Load model from /srv/nc/tmp/upload-1/unzipped/model.onnx failed: bad op")
        'Load model from model.onnx failed: bad op'
        >>> scrub_paths("cannot open var/tmp/u1/w.bin", roots=["var"])
        'cannot open w.bin'
    """
    for root in sorted({r.rstrip("/") for r in roots if r.rstrip("/") not in ("", ".")}, key=len, reverse=True):
        under = re.compile(rf"{_START}{re.escape(root)}(?:/+{_SEGMENT})*/+({_SEGMENT})")
        message = under.sub(lambda m: m.group(1), message)
    return _ABSOLUTE.sub(_file_name_if_on_disk, message)


def _file_name_if_on_disk(m: re.Match[str]) -> str:
    """A server path becomes its file name: one whose first folder exists here (``/tmp/…``, ``/var/…``) or
    that names a file. Anything else that merely looks like a path is left alone — ONNX node names
    (``/features/features.3/MaxPool``) above all, so error messages still name the layer."""
    path = m.group(0)
    first = path.split("file:")[-1].lstrip("/").split("/", 1)[0]
    if os.path.isdir("/" + first) or m.group(1).lower().endswith(_FILE_SUFFIXES):
        return m.group(1)
    return path
