"""Layer weights of an ONNX graph: which initializers feed Conv/ConvTranspose/Gemm/MatMul, and along
which axis their output channels run (per-channel scales and α live on that axis)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from compression.errors import InvalidSpec

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


@dataclass(frozen=True)
class WeightLayer:
    """One layer weight: its initializer, the node that reads it, and its output-channel axis (ONNX layout)."""

    weight: str
    node: str
    op_type: str
    axis: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def weight_layers(model: onnx.ModelProto) -> list[WeightLayer]:
    """Float weights held as initializers by Conv/ConvTranspose/Gemm/MatMul nodes, in graph order.

    Example:
        >>> [w.axis for w in weight_layers(onnx.load("lenet.onnx"))]  # doctest: +SKIP
        [0, 0, 0]
    """
    inits = {t.name: t for t in model.graph.initializer}
    seen: set[str] = set()
    out = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        w = node.input[1]
        t = inits.get(w)
        if t is None or w in seen or t.data_type not in _FLOAT_TYPES or len(t.dims) < 2:
            continue
        if node.op_type == "Conv":
            axis = 0
        elif node.op_type == "ConvTranspose":
            axis = 1
        elif node.op_type == "Gemm":
            trans_b = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0)
            axis = 0 if trans_b else 1
        else:
            if len(t.dims) != 2:
                continue
            axis = 1
        seen.add(w)
        out.append(WeightLayer(w, node.name or w, node.op_type, axis, tuple(int(d) for d in t.dims)))
    return out


def select_layers(layers: list[WeightLayer], include: list[str] | None, exclude: list[str]) -> list[WeightLayer]:
    """Filter by weight or node name; unknown names are refused with the list of known layers."""
    known = {x.weight for x in layers} | {x.node for x in layers}
    unknown = sorted(set(include or []) - known) + sorted(set(exclude) - known)
    if unknown:
        field = "layers" if include and unknown[0] in set(include) else "exclude_layers"
        raise InvalidSpec(f"unknown layers {unknown}; quantizable layers: {[x.node for x in layers]}",
                          [{"loc": [field], "msg": f"unknown layer {u!r}"} for u in unknown])
    chosen = [x for x in layers if include is None or x.weight in include or x.node in include]
    return [x for x in chosen if x.weight not in exclude and x.node not in exclude]


def channel_view(w: np.ndarray, axis: int) -> np.ndarray:
    """``w`` as ``[channels, rest]`` along ``axis`` (a copy only when the axis is not first)."""
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def broadcast_shape(shape: tuple[int, ...], axis: int) -> list[int]:
    """Shape of a per-channel vector that broadcasts against a weight of ``shape`` along ``axis``."""
    out = [1] * len(shape)
    out[axis] = shape[axis]
    return out
