"""The base of every spec model (kept apart from ``spec.py`` so the search-space models can share it)."""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for spec models: unknown keys and NaN/inf numbers are refused.

    A step whose fields name uploaded models (teachers, a student, a rewind init) lists them in
    ``model_ref_fields``, each with the values that are not ids (``"original"``): the service checks every
    id in them, in the steps and in searched values alike, belongs to the caller's team.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model_ref_fields: ClassVar[dict[str, frozenset[str]]] = {}

    @classmethod
    def model_ids_in(cls, field: str, value: Any, loc: list[Any]) -> list[tuple[list[Any], str]]:
        """The model ids in a value of ``field`` (an id, or lists of them), each with its path from ``loc``.

        Example:
            >>> DistillSpec.model_ids_in("teachers", ["original", "m1"], ["teachers"])  # doctest: +SKIP
            [(['teachers', 1], 'm1')]
        """
        if field not in cls.model_ref_fields:
            return []
        if isinstance(value, str):
            return [] if value in cls.model_ref_fields[field] else [(loc, value)]
        if isinstance(value, list):
            return [ref for i, v in enumerate(value) for ref in cls.model_ids_in(field, v, [*loc, i])]
        return []  # None, or a value the field's validation refuses anyway

    @property
    def model_refs(self) -> list[tuple[list[Any], str]]:
        """Model ids this step reads, with their spec path (checked for ownership at submit)."""
        return [ref for name in self.model_ref_fields for ref in self.model_ids_in(name, getattr(self, name), [name])]
