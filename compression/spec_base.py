"""The base of every spec model (kept apart from ``spec.py`` so the search-space models can share it)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for spec models: unknown keys and NaN/inf numbers are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
