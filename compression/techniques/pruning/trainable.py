"""The torch module pruning trains (the ONNX graph converted) and its held-out accuracy between rounds.

Weight pruning with fine-tuning, lottery tickets and channel pruning all convert the graph the same way
and report the same accuracy per round; this is that once.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import onnx

from compression.context import StepContext
from compression.errors import NotTrainable
from compression.training import predict

if TYPE_CHECKING:
    from compression.converter import OnnxModule


def to_module(model: onnx.ModelProto, needs: str = "this step") -> OnnxModule:
    """``model`` as a trainable :class:`~compression.converter.OnnxModule`.

    Args:
        needs: what needs it, for the error (``"fine-tuning"``).

    Raises:
        NotTrainable: the graph has ops the converter cannot turn into torch.

    Example:
        >>> module = to_module(model, "fine-tuning")  # doctest: +SKIP
    """
    from compression.converter import UnsupportedOp, to_torch

    try:
        return to_torch(model)
    except UnsupportedOp as e:
        raise NotTrainable(f"{needs} needs a trainable model; unsupported ops: {e.op_types}") from None


def holdout_accuracy(module: OnnxModule, ctx: StepContext) -> float | None:
    """Top-1 accuracy of the torch module on the held-out split (None without labels or class scores)."""
    data = ctx.data
    if data is None or data.holdout.labels is None:
        return None
    out = predict(module, list(module.input_names), data.holdout, device=ctx.device)
    if out.ndim != 2:
        return None
    return round(float((out.argmax(1) == data.holdout.labels).mean()), 6)
