"""Python SDK for netcompress (HTTP only): ``Client``, ``Job``, typed errors. The CLI is :mod:`client.cli`."""
from client.errors import (
    BadRequest, Conflict, JobCancelled, JobFailed, NetcompressError, NotFound, ServerError, TooLarge,
    Unauthorized, Unavailable, UnsupportedFormat, ValidationFailed, WaitTimeout,
)
from client.sdk import Client, Dataset, Job, Model, load_spec

__all__ = [
    "BadRequest", "Client", "Conflict", "Dataset", "Job", "JobCancelled", "JobFailed", "Model", "NetcompressError",
    "NotFound", "ServerError", "TooLarge", "Unauthorized", "Unavailable", "UnsupportedFormat", "ValidationFailed",
    "WaitTimeout", "load_spec",
]
