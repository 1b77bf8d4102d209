"""The op registry: ONNX op type -> converter.

A converter is a ``run(module, node, inputs)`` function executed on every forward pass, plus an
optional ``prepare(builder, node)`` hook executed once at conversion time. ``prepare`` is where an op
claims its weight initializers as real ``nn.Module`` parameters (Conv -> ``nn.Conv2d``, Gemm/MatMul ->
``nn.Linear``, BatchNormalization -> ``nn.BatchNorm2d``); ops without one simply see every input,
initializers included, as tensors.

Keeping the registry a flat dict (instead of an if/elif chain) makes coverage queryable
(:func:`supported_ops`, :func:`unsupported_ops`) and lets other modules add ops with one decorator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .nodes import NodeSpec, op_key

if TYPE_CHECKING:  # pragma: no cover
    from .module import GraphBuilder, OnnxModule

Inputs = list[torch.Tensor | None]
Outputs = torch.Tensor | Sequence[torch.Tensor | None]
RunFn = Callable[["OnnxModule", NodeSpec, Inputs], Outputs]
PrepareFn = Callable[["GraphBuilder", NodeSpec], None]


class UnsupportedOp(ValueError):
    """Raised when a graph contains op types without a registered converter."""

    def __init__(self, op_types: Sequence[str]) -> None:
        self.op_types: list[str] = sorted(set(op_types))
        super().__init__(
            "ONNX graph uses op types the converter does not support: " + ", ".join(self.op_types)
        )


@dataclass(frozen=True)
class OpConverter:
    op_type: str
    run: RunFn
    prepare: PrepareFn | None = None


_REGISTRY: dict[str, OpConverter] = {}


def register_op(
    *op_types: str, domain: str = "", prepare: PrepareFn | None = None
) -> Callable[[RunFn], RunFn]:
    """Decorator registering ``run`` as the converter of ``op_types`` (in ``domain``)."""
    if not op_types:
        raise TypeError("register_op needs at least one op type")

    def decorator(run: RunFn) -> RunFn:
        for op_type in op_types:
            key = op_key(op_type, domain)
            _REGISTRY[key] = OpConverter(key, run, prepare)
        return run

    return decorator


def get_op(op_type: str, domain: str = "") -> OpConverter:
    key = op_key(op_type, domain)
    try:
        return _REGISTRY[key]
    except KeyError:
        raise UnsupportedOp([key]) from None


def get_op_by_key(key: str) -> OpConverter:
    try:
        return _REGISTRY[key]
    except KeyError:
        raise UnsupportedOp([key]) from None


def is_supported(op_type: str, domain: str = "") -> bool:
    return op_key(op_type, domain) in _REGISTRY


def supported_ops() -> list[str]:
    return sorted(_REGISTRY)


def as_outputs(result: Any) -> list[torch.Tensor | None]:
    """Normalize a converter's return value to a list of outputs."""
    if isinstance(result, torch.Tensor):
        return [result]
    return list(result)
