"""Element-wise ops: arithmetic, math functions, activations, comparisons, logic and casts.

ONNX broadcasting is numpy broadcasting, which torch implements natively, so these are thin
wrappers. Integer division follows ONNX/C semantics (truncation), not Python floor division.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .nodes import torch_dtype
from .ops import register_op


def _unary(op_type: str, fn) -> None:
    register_op(op_type)(lambda m, node, xs: fn(xs[0]))


# Lambdas are fine here: the registry is looked up by op type at run time, modules never store them.
for _op, _fn in {
    "Abs": torch.abs,
    "Neg": torch.neg,
    "Sqrt": torch.sqrt,
    "Exp": torch.exp,
    "Log": torch.log,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # half to even, as ONNX requires
    "Sign": torch.sign,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Tan": torch.tan,
    "Asin": torch.asin,
    "Acos": torch.acos,
    "Atan": torch.atan,
    "Sinh": torch.sinh,
    "Cosh": torch.cosh,
    "Asinh": torch.asinh,
    "Acosh": torch.acosh,
    "Atanh": torch.atanh,
    "Erf": torch.erf,
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Softsign": F.softsign,
    "Mish": F.mish,
    "HardSwish": F.hardswish,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
    "Identity": lambda x: x,
}.items():
    _unary(_op, _fn)


@register_op("IsInf")
def _is_inf(m, node, xs):
    x = xs[0]
    pos, neg = node.attr("detect_positive", 1), node.attr("detect_negative", 1)
    return (torch.isposinf(x) if pos else torch.zeros_like(x, dtype=torch.bool)) | (
        torch.isneginf(x) if neg else torch.zeros_like(x, dtype=torch.bool)
    )


# ------------------------------------------------------------------------------- activations
@register_op("LeakyRelu")
def _leaky_relu(m, node, xs):
    return F.leaky_relu(xs[0], node.attr("alpha", 0.01))


@register_op("Elu")
def _elu(m, node, xs):
    return F.elu(xs[0], node.attr("alpha", 1.0))


@register_op("Celu")
def _celu(m, node, xs):
    return F.celu(xs[0], node.attr("alpha", 1.0))


@register_op("Selu")
def _selu(m, node, xs):
    x = xs[0]
    alpha = node.attr("alpha", 1.67326319217681884765625)
    gamma = node.attr("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@register_op("ThresholdedRelu")
def _thresholded_relu(m, node, xs):
    x = xs[0]
    return torch.where(x > node.attr("alpha", 1.0), x, torch.zeros_like(x))


@register_op("HardSigmoid")
def _hard_sigmoid(m, node, xs):
    return torch.clamp(node.attr("alpha", 0.2) * xs[0] + node.attr("beta", 0.5), 0.0, 1.0)


@register_op("Softplus")
def _softplus(m, node, xs):
    return F.softplus(xs[0])


@register_op("Gelu")
def _gelu(m, node, xs):
    return F.gelu(xs[0], approximate=node.attr("approximate", "none"))


@register_op("PRelu")
def _prelu(m, node, xs):
    x, slope = xs
    return torch.where(x < 0, x * slope, x)


@register_op("Shrink")
def _shrink(m, node, xs):
    x = xs[0]
    lambd, bias = node.attr("lambd", 0.5), node.attr("bias", 0.0)
    return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))


@register_op("Clip")
def _clip(m, node, xs):
    x = xs[0]
    if node.opset < 11:
        lo, hi = node.attr("min", -math.inf), node.attr("max", math.inf)
        return torch.clamp(x, lo, hi)
    lo = xs[1] if len(xs) > 1 else None
    hi = xs[2] if len(xs) > 2 else None
    if lo is None and hi is None:
        return x
    return torch.clamp(
        x,
        None if lo is None else lo.to(x.dtype),
        None if hi is None else hi.to(x.dtype),
    )


# ------------------------------------------------------------------------------- arithmetic
@register_op("Add")
def _add(m, node, xs):
    return xs[0] + xs[1]


@register_op("Sub")
def _sub(m, node, xs):
    return xs[0] - xs[1]


@register_op("Mul")
def _mul(m, node, xs):
    return xs[0] * xs[1]


@register_op("Div")
def _div(m, node, xs):
    a, b = xs
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


@register_op("Mod")
def _mod(m, node, xs):
    a, b = xs
    return torch.fmod(a, b) if node.attr("fmod", 0) else torch.remainder(a, b)


@register_op("Pow")
def _pow(m, node, xs):
    base, exponent = xs
    out = torch.pow(base, exponent)
    return out if out.dtype == base.dtype else out.to(base.dtype)


@register_op("Max")
def _max(m, node, xs):
    return functools.reduce(torch.maximum, xs)


@register_op("Min")
def _min(m, node, xs):
    return functools.reduce(torch.minimum, xs)


@register_op("Sum")
def _sum(m, node, xs):
    return functools.reduce(torch.add, xs)


@register_op("Mean")
def _mean(m, node, xs):
    return functools.reduce(torch.add, xs) / len(xs)


# ------------------------------------------------------------------------------ comparisons
for _op, _fn in {
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
    "BitwiseAnd": torch.bitwise_and,
    "BitwiseOr": torch.bitwise_or,
    "BitwiseXor": torch.bitwise_xor,
}.items():
    register_op(_op)(lambda m, node, xs, _fn=_fn: _fn(xs[0], xs[1]))


@register_op("BitwiseNot")
def _bitwise_not(m, node, xs):
    return torch.bitwise_not(xs[0])


@register_op("Where")
def _where(m, node, xs):
    cond, a, b = xs
    return torch.where(cond.to(torch.bool), a, b)


# ------------------------------------------------------------------------------------ casts
@register_op("Cast")
def _cast(m, node, xs):
    return xs[0].to(torch_dtype(node.attr("to")))


@register_op("CastLike")
def _cast_like(m, node, xs):
    return xs[0].to(xs[1].dtype)


@register_op("Dropout")
def _dropout(m, node, xs):
    """Inference semantics (ONNX ``training_mode`` defaults to false): identity plus an all-true mask."""
    x = xs[0]
    if len(node.outputs) > 1 and node.outputs[1]:
        return x, torch.ones_like(x, dtype=torch.bool)
    return x
