"""Request and response schemas, by role (separate from the ORM classes)."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class TensorInfo(BaseModel):
    name: str
    shape: list[int | str | None]
    dtype: str


class ModelPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    format: str
    sha256: str
    size_bytes: int
    params: int
    weight_bytes: int | None = None
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    created_at: datetime


class ModelList(BaseModel):
    items: list[ModelPublic]
    next_cursor: str | None = None


class ArrayInfo(BaseModel):
    shape: list[int]
    dtype: str


class DatasetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    sha256: str
    size_bytes: int
    arrays: dict[str, ArrayInfo]
    samples: int
    created_at: datetime


class DatasetList(BaseModel):
    items: list[DatasetPublic]
    next_cursor: str | None = None


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: str = Field(min_length=1, max_length=64)
    dataset_id: str | None = Field(None, max_length=64)
    spec: dict[str, Any]
    name: str | None = Field(None, max_length=200)


class ArtifactPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    name: str
    size_bytes: int
    sha256: str
    kind: str


class JobError(BaseModel):
    code: str
    message: str
    details: dict[str, Any] | None = None  # machine-readable facts of the failure (quality_gate: the numbers)


class Progress(BaseModel):
    phase: str | None = None
    step: int | None = None
    steps: int | None = None
    fraction: float | None = None
    message: str | None = None


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str | None
    model_id: str
    dataset_id: str | None
    status: str
    spec: dict[str, Any]
    progress: Progress
    attempts: int
    cancel_requested: bool
    error: JobError | None
    metrics: dict[str, Any] | None
    artifacts: list[ArtifactPublic]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class JobList(BaseModel):
    items: list[JobPublic]
    next_cursor: str | None = None
