"""Errors the engine raises; the service maps them to HTTP problems or failed jobs."""
from __future__ import annotations


class CompressionError(Exception):
    """Base class. ``code`` is a stable machine-readable reason, stored on failed jobs."""

    code = "compression_error"


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


class NotTrainable(CompressionError):
    """A step needs training but the model cannot be turned into a trainable torch module."""

    code = "not_trainable"


class Cancelled(CompressionError):
    """Raised from a progress callback when the job was cancelled; techniques let it propagate."""

    code = "cancelled"


class TimeLimitExceeded(Cancelled):
    """The job ran past its wall-clock limit (raised from the progress callback like a cancel)."""

    code = "time_limit"
