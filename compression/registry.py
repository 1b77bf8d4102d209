"""The one registry of techniques (timm-style): name -> (spec model, apply function).

Example:
    >>> from compression.registry import get_technique, list_techniques
    >>> "prune" in list_techniques()
    True
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from compression.step_spec import StepSpec

_REGISTRY: dict[str, "Technique"] = {}


@dataclass(frozen=True)
class Technique:
    name: str
    spec_model: type[StepSpec]
    apply: Callable[..., Any]  # (model: onnx.ModelProto, spec, ctx: StepContext) -> StepResult
    phase: str  # progress phase while it runs: pruning, quantizing, ...
    summary: str


def register_technique(name: str, spec_model: type[StepSpec], *, phase: str) -> Callable:
    """Decorator registering ``apply`` under ``name``; duplicates and missing spec types fail at import.

    The spec model is a :class:`~compression.step_spec.StepSpec`: it says whether the step trains, needs
    data or torch, what preflight checks and what ``search: auto`` tries.
    """
    if not (isinstance(spec_model, type) and issubclass(spec_model, StepSpec)):
        raise TypeError(f"technique {name!r}: spec_model must be a StepSpec (compression.step_spec)")
    if "method" not in spec_model.model_fields:
        raise TypeError(f"technique {name!r}: spec model needs a 'method' field")

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"technique {name!r} registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else name
        _REGISTRY[name] = Technique(name, spec_model, fn, phase, summary)
        return fn

    return deco


def _load_all() -> None:
    """Import every module of ``compression.techniques``: each registers what it defines."""
    import importlib
    import pkgutil

    import compression.techniques as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")


def list_techniques() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_technique(name: str) -> Technique:
    """The technique called ``name``; an unknown name raises KeyError listing the known ones."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
