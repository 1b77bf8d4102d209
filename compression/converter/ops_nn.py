"""Layer ops: MatMul/Gemm/Conv/ConvTranspose/normalizations/pooling/softmax.

The ``prepare`` hooks here are the reason this converter exists: when a weight is a graph
constant, the op claims it as a real ``nn.Linear``/``nn.Conv*d``/``nn.BatchNorm*d`` (weights stored in
torch layout, e.g. MatMul ``B [K, N]`` becomes ``Linear.weight [N, K]``), so torch-pruning sees normal
layers and optimizers see normal parameters. When a weight is computed at run time the same op
falls back to the functional form.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .nodes import NodeSpec
from .ops import register_op
from .ops_shape import norm_axis

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_CONV_F = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_F = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAXPOOL_F = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL_F = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _param(arr: np.ndarray) -> nn.Parameter:
    return nn.Parameter(torch.from_numpy(np.ascontiguousarray(arr)))


def _is_float(arr: np.ndarray | None) -> bool:
    return arr is not None and np.issubdtype(arr.dtype, np.floating)


def _module(m, node: NodeSpec) -> nn.Module | None:
    ref = node.extra.get("module")
    return None if ref is None else getattr(m, ref[0])[ref[1]]


def _opt(xs: list, i: int) -> torch.Tensor | None:
    return xs[i] if len(xs) > i else None


# --------------------------------------------------------------------------------- MatMul/Gemm
def _make_linear(weight: np.ndarray, bias: np.ndarray | None) -> nn.Linear:
    """``nn.Linear`` holding ``weight [out, in]`` without paying for a random init first."""
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    lin.weight = _param(weight)
    if bias is not None:
        lin.bias = _param(bias)
    return lin


def _prepare_matmul(b, node: NodeSpec) -> None:
    """MatMul(x, W[K,N]) -> nn.Linear(K, N); a following ``Add(+, bias[N])`` is fused as its bias."""
    if len(node.inputs) != 2:
        return
    x_name, w_name = node.inputs
    w = b.const(w_name)
    if not _is_float(w) or w.ndim != 2 or x_name == w_name:
        return
    bias = None
    bindings = {w_name: ("weight", True)}
    add = b.sole_consumer(node.outputs[0])
    if add is not None and add.impl == "Add" and len(add.inputs) == 2:
        other = add.inputs[1] if add.inputs[0] == node.outputs[0] else add.inputs[0]
        c = b.const(other)
        if (
            other != w_name
            and _is_float(c)
            and c.ndim == 1
            and c.shape[0] == w.shape[1]
            and c.dtype == w.dtype
        ):
            bias = c
            bindings[other] = ("bias", False)
            b.rewrite(add, "Identity", [node.outputs[0]])
            node.extra["fused_add"] = add.name
    b.claim(node, _make_linear(w.T, bias), bindings, inputs=[x_name])


@register_op("MatMul", prepare=_prepare_matmul)
def _matmul(m, node, xs):
    layer = _module(m, node)
    if layer is not None:
        return layer(xs[0])
    return torch.matmul(xs[0], xs[1])


def _prepare_gemm(b, node: NodeSpec) -> None:
    """Gemm(A, B, C) with constant B -> nn.Linear; C becomes its bias when alpha = beta = 1."""
    a_name, w_name = node.inputs[0], node.inputs[1]
    c_name = node.inputs[2] if len(node.inputs) > 2 else ""
    w = b.const(w_name)
    if not _is_float(w) or w.ndim != 2 or a_name == w_name:
        return
    trans_b = bool(node.attr("transB", 0))
    weight = w if trans_b else w.T  # torch layout [N, K]
    n_out = weight.shape[0]
    bindings = {w_name: ("weight", not trans_b)}
    bias = None
    if c_name and c_name != w_name and node.attr("alpha", 1.0) == 1.0 and node.attr("beta", 1.0) == 1.0:
        c = b.const(c_name)
        if _is_float(c) and c.size == n_out and c.shape in ((n_out,), (1, n_out)) and c.dtype == w.dtype:
            bias = c.reshape(n_out)
            bindings[c_name] = ("bias", False)
            c_name = ""
    b.claim(node, _make_linear(weight, bias), bindings, inputs=[a_name, c_name])


@register_op("Gemm", prepare=_prepare_gemm)
def _gemm(m, node, xs):
    a, c = xs[0], _opt(xs, 2)
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    if node.attr("transA", 0):
        a = a.t()
    layer = _module(m, node)
    if layer is not None:
        y = layer(a)
        c = _opt(xs, 1)
    else:
        b = xs[1].t() if node.attr("transB", 0) else xs[1]
        y = a @ b
    if alpha != 1.0:
        y = alpha * y
    if c is not None:
        y = y + (beta * c if beta != 1.0 else c)
    return y


@register_op("Einsum")
def _einsum(m, node, xs):
    return torch.einsum(node.attr("equation").replace(" ", ""), *xs)


# ---------------------------------------------------------------------------------- padding
def _pad_pairs(node: NodeSpec, x: torch.Tensor, kernel: list[int], strides: list[int],
               dilations: list[int]) -> list[tuple[int, int]]:
    """Per spatial dim (begin, end) padding from ``pads`` or ``auto_pad`` (SAME_* computed from x)."""
    dims = len(kernel)
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pairs = []
        for i in range(dims):
            size = x.shape[2 + i]
            out = math.ceil(size / strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
            small, big = total // 2, total - total // 2
            pairs.append((small, big) if auto_pad == "SAME_UPPER" else (big, small))
        return pairs
    if auto_pad == "VALID":
        return [(0, 0)] * dims
    pads = node.attr("pads") or [0] * (2 * dims)
    return list(zip(pads[:dims], pads[dims:], strict=True))


def _torch_pads(pairs: list[tuple[int, int]]) -> list[int]:
    out: list[int] = []
    for begin, end in reversed(pairs):
        out += [begin, end]
    return out


def _spatial_attrs(node: NodeSpec, dims: int) -> tuple[list[int], list[int]]:
    return node.attr("strides") or [1] * dims, node.attr("dilations") or [1] * dims


def _static_symmetric(node: NodeSpec, dims: int) -> list[int] | None:
    """Padding usable directly by the torch layer, or None if it must be applied with F.pad."""
    if node.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID", ""):
        return None
    if node.attr("auto_pad", "NOTSET") == "VALID":
        return [0] * dims
    pads = node.attr("pads") or [0] * (2 * dims)
    return list(pads[:dims]) if pads[:dims] == pads[dims:] else None


# ------------------------------------------------------------------------------------- Conv
def _prepare_conv(b, node: NodeSpec) -> None:
    x_name, w_name = node.inputs[0], node.inputs[1]
    b_name = node.inputs[2] if len(node.inputs) > 2 else ""
    w = b.const(w_name)
    if not _is_float(w) or w.ndim - 2 not in _CONV:
        return
    dims = w.ndim - 2
    bias = b.const(b_name) if b_name else None
    if bias is not None and (not _is_float(bias) or bias.shape != (w.shape[0],) or b_name == w_name):
        bias = None
    strides, dilations = _spatial_attrs(node, dims)
    groups = node.attr("group", 1)
    padding = _static_symmetric(node, dims)
    conv = _CONV[dims](
        w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=tuple(strides),
        padding=tuple(padding or [0] * dims), dilation=tuple(dilations), groups=groups,
        bias=bias is not None, device="meta",
    )
    conv.weight = _param(w)
    bindings = {w_name: ("weight", False)}
    if bias is not None:
        conv.bias = _param(bias)
        bindings[b_name] = ("bias", False)
    node.extra["native_padding"] = padding is not None
    b.claim(node, conv, bindings, inputs=[x_name, "" if bias is not None else b_name])


@register_op("Conv", prepare=_prepare_conv)
def _conv(m, node, xs):
    x = xs[0]
    layer = _module(m, node)
    if layer is not None:
        if not node.extra["native_padding"]:
            dims = x.dim() - 2
            strides, dilations = _spatial_attrs(node, dims)
            pairs = _pad_pairs(node, x, list(layer.kernel_size), strides, dilations)
            x = F.pad(x, _torch_pads(pairs))
        y = layer(x)
        extra_bias = _opt(xs, 1)
    else:
        w, bias = xs[1], _opt(xs, 2)
        dims = w.dim() - 2
        strides, dilations = _spatial_attrs(node, dims)
        pairs = _pad_pairs(node, x, list(w.shape[2:]), strides, dilations)
        x = F.pad(x, _torch_pads(pairs))
        y = _CONV_F[dims](x, w, bias, strides, 0, dilations, node.attr("group", 1))
        extra_bias = None
    if extra_bias is not None:  # bias computed at run time on a claimed conv
        y = y + extra_bias.reshape(1, -1, *([1] * (y.dim() - 2)))
    return y


def _convt_static(node: NodeSpec, dims: int) -> tuple[list[int], list[int], list[int]] | None:
    """(module padding, crop_begin, crop_end) when ConvTranspose pads are known statically."""
    if node.attr("output_shape") or node.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID", ""):
        return None
    pads = node.attr("pads") or [0] * (2 * dims)
    if node.attr("auto_pad", "NOTSET") == "VALID":
        pads = [0] * (2 * dims)
    begin, end = pads[:dims], pads[dims:]
    common = [min(p, q) for p, q in zip(begin, end, strict=True)]
    return common, [p - c for p, c in zip(begin, common)], [q - c for q, c in zip(end, common)]


def _prepare_conv_transpose(b, node: NodeSpec) -> None:
    x_name, w_name = node.inputs[0], node.inputs[1]
    b_name = node.inputs[2] if len(node.inputs) > 2 else ""
    w = b.const(w_name)
    if not _is_float(w) or w.ndim - 2 not in _CONV_T:
        return
    dims = w.ndim - 2
    groups = node.attr("group", 1)
    bias = b.const(b_name) if b_name else None
    if bias is not None and (not _is_float(bias) or bias.shape != (w.shape[1] * groups,)):
        bias = None
    strides, dilations = _spatial_attrs(node, dims)
    static = _convt_static(node, dims)
    padding = static[0] if static else [0] * dims
    output_padding = (node.attr("output_padding") or [0] * dims) if static else [0] * dims
    conv = _CONV_T[dims](
        w.shape[0], w.shape[1] * groups, tuple(w.shape[2:]), stride=tuple(strides),
        padding=tuple(padding), output_padding=tuple(output_padding), groups=groups,
        bias=bias is not None, dilation=tuple(dilations), device="meta",
    )
    conv.weight = _param(w)
    bindings = {w_name: ("weight", False)}
    if bias is not None:
        conv.bias = _param(bias)
        bindings[b_name] = ("bias", False)
    b.claim(node, conv, bindings, inputs=[x_name, "" if bias is not None else b_name])


def _convt_crops(node: NodeSpec, x: torch.Tensor, kernel: list[int]) -> tuple[list[int], list[int]]:
    """Crops (begin, end) applied to a padding-0 transposed conv for auto_pad/output_shape."""
    dims = len(kernel)
    strides, dilations = _spatial_attrs(node, dims)
    out_pad = node.attr("output_padding") or [0] * dims
    out_shape = node.attr("output_shape")
    begins, ends = [], []
    for i in range(dims):
        size = x.shape[2 + i]
        full = strides[i] * (size - 1) + out_pad[i] + (kernel[i] - 1) * dilations[i] + 1
        target = out_shape[-dims + i] if out_shape else size * strides[i]
        total = full - target
        # Follows ONNX Runtime: SAME_UPPER puts the odd extra padding at the end, otherwise at the start.
        if node.attr("auto_pad", "NOTSET") == "SAME_UPPER":
            begin, end = total // 2, total - total // 2
        else:
            begin, end = total - total // 2, total // 2
        end -= out_pad[i]  # output_padding rows are not produced by the padding-0 conv
        if end < 0:
            raise NotImplementedError("ConvTranspose output larger than the full transposed conv")
        begins.append(begin)
        ends.append(end)
    return begins, ends


def _crop(y: torch.Tensor, begins: list[int], ends: list[int]) -> torch.Tensor:
    index = [slice(None), slice(None)]
    for i, (begin, end) in enumerate(zip(begins, ends, strict=True)):
        index.append(slice(begin, y.shape[2 + i] - end))
    return y[tuple(index)]


@register_op("ConvTranspose", prepare=_prepare_conv_transpose)
def _conv_transpose(m, node, xs):
    x = xs[0]
    layer = _module(m, node)
    if layer is not None:
        kernel, bias_extra = list(layer.kernel_size), _opt(xs, 1)
        y = layer(x)
    else:
        w, bias = xs[1], _opt(xs, 2)
        kernel, bias_extra = list(w.shape[2:]), None
        dims = len(kernel)
        strides, dilations = _spatial_attrs(node, dims)
        static = _convt_static(node, dims)
        padding = static[0] if static else [0] * dims
        out_pad = (node.attr("output_padding") or [0] * dims) if static else [0] * dims
        y = _CONV_T_F[dims](x, w, bias, strides, padding, out_pad, node.attr("group", 1), dilations)
    static = _convt_static(node, len(kernel))
    begins, ends = (static[1], static[2]) if static else _convt_crops(node, x, kernel)
    if any(begins) or any(ends):
        y = _crop(y, begins, ends)
    if bias_extra is not None:
        y = y + bias_extra.reshape(1, -1, *([1] * (y.dim() - 2)))
    return y


# ---------------------------------------------------------------------------- normalization
class BatchNormNd(nn.modules.batchnorm._BatchNorm):
    """BatchNorm for inputs of unknown rank (when shape inference cannot tell 1d/2d/3d)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")


_BN_BY_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _prepare_batch_norm(b, node: NodeSpec) -> None:
    if len(node.inputs) < 5 or node.attr("training_mode", 0) or len([o for o in node.outputs if o]) > 1:
        return
    x_name, names = node.inputs[0], node.inputs[1:5]
    if len(set(names)) != 4:
        return
    scale, bias, mean, var = (b.const(n) for n in names)
    if not all(_is_float(a) and a.ndim == 1 for a in (scale, bias, mean, var)):
        return
    channels = scale.shape[0]
    if any(a.shape[0] != channels for a in (bias, mean, var)):
        return
    cls = _BN_BY_RANK.get(b.rank(x_name) or 0, BatchNormNd)
    bn = cls(channels, eps=node.attr("epsilon", 1e-5), momentum=1.0 - node.attr("momentum", 0.9))
    with torch.no_grad():
        bn.weight = _param(scale)
        bn.bias = _param(bias)
        bn.running_mean = torch.from_numpy(np.ascontiguousarray(mean))
        bn.running_var = torch.from_numpy(np.ascontiguousarray(var))
    bindings = {
        names[0]: ("weight", False),
        names[1]: ("bias", False),
        names[2]: ("running_mean", False),
        names[3]: ("running_var", False),
    }
    b.claim(node, bn, bindings, container="norms", inputs=[x_name])


@register_op("BatchNormalization", prepare=_prepare_batch_norm)
def _batch_norm(m, node, xs):
    layer = _module(m, node)
    if layer is not None:
        return layer(xs[0])
    x, scale, bias, mean, var = xs[:5]
    eps = node.attr("epsilon", 1e-5)
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=eps)


@register_op("LayerNormalization")
def _layer_norm(m, node, xs):
    x, scale, bias = xs[0], xs[1], _opt(xs, 2)
    axis = norm_axis(node.attr("axis", -1), x.dim())
    eps = node.attr("epsilon", 1e-5)
    shape = tuple(x.shape[axis:])
    if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        y = F.layer_norm(x, shape, scale, bias, eps)
    else:
        y = F.layer_norm(x, shape, None, None, eps) * scale
        y = y if bias is None else y + bias
    wanted = [o for o in node.outputs[1:] if o]
    if not wanted:
        return y
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(x.var(dim=dims, keepdim=True, unbiased=False) + eps)
    return y, mean, inv_std


@register_op("InstanceNormalization")
def _instance_norm(m, node, xs):
    x, scale, bias = xs
    return F.instance_norm(x, weight=scale, bias=bias, eps=node.attr("epsilon", 1e-5))


@register_op("GroupNormalization")
def _group_norm(m, node, xs):
    x, scale, bias = xs
    groups = node.attr("num_groups")
    channels = x.shape[1]
    if scale.numel() == groups and groups != channels:  # opset 18: per-group affine
        scale = scale.repeat_interleave(channels // groups)
        bias = bias.repeat_interleave(channels // groups)
    return F.group_norm(x, groups, scale, bias, node.attr("epsilon", 1e-5))


@register_op("LpNormalization")
def _lp_norm(m, node, xs):
    x = xs[0]
    norm = torch.linalg.vector_norm(x, ord=node.attr("p", 2), dim=node.attr("axis", -1), keepdim=True)
    return x / norm


# ---------------------------------------------------------------------------------- pooling
@register_op("MaxPool")
def _max_pool(m, node, xs):
    x = xs[0]
    if len(node.outputs) > 1 and node.outputs[1]:
        raise NotImplementedError("MaxPool Indices output is not supported")
    kernel = list(node.attr("kernel_shape"))
    dims = len(kernel)
    strides, dilations = _spatial_attrs(node, dims)
    pairs = _pad_pairs(node, x, kernel, strides, dilations)
    ceil_mode = bool(node.attr("ceil_mode", 0))
    if all(p == q and p <= k // 2 for (p, q), k in zip(pairs, kernel, strict=True)):
        padding = [p for p, _ in pairs]
    else:
        x = F.pad(x, _torch_pads(pairs), value=-math.inf)
        padding = [0] * dims
    return _MAXPOOL_F[dims](x, kernel, strides, padding, dilations, ceil_mode=ceil_mode)


@register_op("AveragePool")
def _avg_pool(m, node, xs):
    x = xs[0]
    kernel = list(node.attr("kernel_shape"))
    dims = len(kernel)
    strides, dilations = _spatial_attrs(node, dims)
    if any(d != 1 for d in dilations):
        raise NotImplementedError("AveragePool with dilations")
    pairs = _pad_pairs(node, x, kernel, strides, dilations)
    ceil_mode = bool(node.attr("ceil_mode", 0))
    include_pad = bool(node.attr("count_include_pad", 0))
    pool = _AVGPOOL_F[dims]
    if all(p == q and p <= k // 2 for (p, q), k in zip(pairs, kernel, strict=True)):
        return pool(x, kernel, strides, [p for p, _ in pairs], ceil_mode, include_pad)
    pads = _torch_pads(pairs)
    y = pool(F.pad(x, pads), kernel, strides, 0, ceil_mode, True)
    if include_pad:
        return y
    ones = F.pad(torch.ones_like(x[:1, :1]), pads)
    return y / pool(ones, kernel, strides, 0, ceil_mode, True)


@register_op("GlobalAveragePool")
def _global_avg_pool(m, node, xs):
    x = xs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@register_op("GlobalMaxPool")
def _global_max_pool(m, node, xs):
    x = xs[0]
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


# ---------------------------------------------------------------------------------- softmax
def _softmax_like(node: NodeSpec, x: torch.Tensor, fn) -> torch.Tensor:
    """Opset >= 13 normalizes along ``axis``; older opsets flatten to 2-D at ``axis`` first."""
    if node.opset >= 13:
        return fn(x, norm_axis(node.attr("axis", -1), x.dim()))
    axis = norm_axis(node.attr("axis", 1), x.dim())
    flat = x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
    return fn(flat, 1).reshape(x.shape)


def _hardmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    return F.one_hot(x.argmax(dim), x.shape[dim]).movedim(-1, dim).to(x.dtype)


@register_op("Softmax")
def _softmax(m, node, xs):
    return _softmax_like(node, xs[0], lambda t, d: torch.softmax(t, d))


@register_op("LogSoftmax")
def _log_softmax(m, node, xs):
    return _softmax_like(node, xs[0], lambda t, d: torch.log_softmax(t, d))


@register_op("Hardmax")
def _hardmax_op(m, node, xs):
    return _softmax_like(node, xs[0], _hardmax)
