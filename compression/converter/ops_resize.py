"""Resize / Upsample as separable per-axis interpolation.

Rather than mapping ONNX's coordinate-transformation modes onto ``F.interpolate`` flags (which only
covers some of them), each resized axis is computed exactly as the ONNX spec defines it: map every
output coordinate to an input coordinate, then gather (nearest) or blend neighbours (linear, cubic).
This is exact for every mode, any rank, and differentiable with respect to the input.
"""

from __future__ import annotations

import math

import torch

from .nodes import NodeSpec
from .ops import register_op
from .ops_shape import ints, norm_axis


def _source_coords(mode: str, out_len: int, in_len: int, scale: float, device) -> torch.Tensor:
    x = torch.arange(out_len, dtype=torch.float32, device=device)
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out_len > 1 else torch.zeros_like(x)
    if mode == "align_corners":
        return x * ((in_len - 1) / (out_len - 1)) if out_len > 1 else torch.zeros_like(x)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    if mode == "half_pixel_symmetric":
        adjustment = out_len / (scale * in_len)
        offset = (in_len / 2) * (1 - adjustment)
        return offset + (x + 0.5) / scale - 0.5
    raise NotImplementedError(f"Resize coordinate_transformation_mode={mode!r}")


def _nearest_index(coords: torch.Tensor, rounding: str, in_len: int) -> torch.Tensor:
    if rounding == "round_prefer_floor":
        idx = torch.where(coords - coords.floor() == 0.5, coords.floor(), coords.round())
    elif rounding == "round_prefer_ceil":
        idx = torch.where(coords - coords.floor() == 0.5, coords.ceil(), coords.round())
    elif rounding == "floor":
        idx = coords.floor()
    elif rounding == "ceil":
        idx = coords.ceil()
    else:
        raise NotImplementedError(f"Resize nearest_mode={rounding!r}")
    return idx.clamp(0, in_len - 1).to(torch.int64)


def _cubic_weights(t: torch.Tensor, a: float) -> list[torch.Tensor]:
    """Keys cubic convolution weights for taps at offsets -1, 0, 1, 2 from floor(x)."""

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _resize_axis(x: torch.Tensor, axis: int, out_len: int, scale: float, node: NodeSpec,
                 mode: str) -> torch.Tensor:
    in_len = x.shape[axis]
    ctm = node.attr("coordinate_transformation_mode", "half_pixel")
    coords = _source_coords(ctm, out_len, in_len, scale, x.device)
    if mode == "nearest":
        idx = _nearest_index(coords, node.attr("nearest_mode", "round_prefer_floor"), in_len)
        return x.index_select(axis, idx)
    shape = [1] * x.dim()
    shape[axis] = out_len
    if mode == "linear":
        coords = coords.clamp(0, in_len - 1)
        lo = coords.floor().to(torch.int64)
        hi = (lo + 1).clamp(max=in_len - 1)
        w = (coords - lo.to(coords.dtype)).to(x.dtype).reshape(shape)
        return x.index_select(axis, lo) * (1 - w) + x.index_select(axis, hi) * w
    if mode == "cubic":
        base = coords.floor()
        t = coords - base
        weights = _cubic_weights(t, node.attr("cubic_coeff_a", -0.75))
        taps = [base.to(torch.int64) + k for k in (-1, 0, 1, 2)]
        if node.attr("exclude_outside", 0):
            weights = [torch.where((i >= 0) & (i < in_len), w, 0.0) for w, i in zip(weights, taps)]
            total = sum(weights)
            weights = [w / total for w in weights]
        out = 0
        for w, i in zip(weights, taps, strict=True):
            out = out + x.index_select(axis, i.clamp(0, in_len - 1)) * w.to(x.dtype).reshape(shape)
        return out
    raise NotImplementedError(f"Resize mode={mode!r}")


def _resize(node: NodeSpec, x: torch.Tensor, scales: list[float] | None, sizes: list[int] | None,
            mode: str) -> torch.Tensor:
    if node.attr("coordinate_transformation_mode") == "tf_crop_and_resize":
        raise NotImplementedError("Resize tf_crop_and_resize")
    if node.attr("keep_aspect_ratio_policy", "stretch") != "stretch" and sizes:
        raise NotImplementedError("Resize keep_aspect_ratio_policy other than 'stretch'")
    axes = [norm_axis(a, x.dim()) for a in (node.attr("axes") or range(x.dim()))]
    for i, axis in enumerate(axes):
        in_len = x.shape[axis]
        if sizes:
            out_len = sizes[i]
            scale = out_len / in_len
        else:
            scale = scales[i]
            out_len = int(math.floor(in_len * scale))
        if out_len == in_len and scale == 1.0:
            continue
        x = _resize_axis(x, axis, out_len, scale, node, mode)
    return x


def _freeze_parameters(b, node: NodeSpec) -> None:
    """roi/scales/sizes are read with ``.tolist()``: they must not become trainable parameters."""
    for name in node.inputs[1:]:
        if name:
            b.freeze(name)


@register_op("Resize", prepare=_freeze_parameters)
def _resize_op(m, node, xs):
    x = xs[0]
    if node.opset < 11:
        scales, sizes = xs[1].tolist(), None
    else:
        scales_t = xs[2] if len(xs) > 2 else None
        sizes_t = xs[3] if len(xs) > 3 else None
        scales = scales_t.tolist() if scales_t is not None and scales_t.numel() else None
        sizes = ints(sizes_t) if sizes_t is not None and sizes_t.numel() else None
    return _resize(node, x, scales, sizes, node.attr("mode", "nearest"))


@register_op("Upsample", prepare=_freeze_parameters)
def _upsample(m, node, xs):
    """Deprecated predecessor of Resize (opset 7-9): asymmetric coordinates, floor rounding."""
    scales = xs[1].tolist() if len(xs) > 1 else node.attr("scales")
    spec = NodeSpec(
        op_type="Resize", domain="", name=node.name, key=node.key, inputs=node.inputs,
        outputs=node.outputs, opset=node.opset,
        attrs={"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
    )
    mode = node.attr("mode", "nearest")
    return _resize(spec, xs[0], scales, None, "linear" if mode in ("linear", "bilinear") else mode)
