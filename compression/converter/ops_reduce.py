"""Reductions (Reduce*, ArgMax/ArgMin, TopK, CumSum).

The axes of Reduce* moved from an attribute to an optional input: at opset 13 for ReduceSum and at
opset 18 for the others. ``noop_with_empty_axes`` decides whether missing axes mean "all" or "none".
"""

from __future__ import annotations

import torch

from .nodes import NodeSpec
from .ops import register_op
from .ops_shape import axes_arg, norm_axis


def _prod(x: torch.Tensor, dims: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keepdim)
    return x


_REDUCERS = {
    "ReduceSum": (13, lambda x, d, k: torch.sum(x, dim=d, keepdim=k)),
    "ReduceMean": (18, lambda x, d, k: torch.mean(x, dim=d, keepdim=k)),
    "ReduceMax": (18, lambda x, d, k: torch.amax(x, dim=d, keepdim=k)),
    "ReduceMin": (18, lambda x, d, k: torch.amin(x, dim=d, keepdim=k)),
    "ReduceProd": (18, _prod),
    "ReduceL1": (18, lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k)),
    "ReduceL2": (18, lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k))),
    "ReduceSumSquare": (18, lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k)),
    "ReduceLogSum": (18, lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k))),
    "ReduceLogSumExp": (18, lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k)),
}


def _reduce(m, node: NodeSpec, xs):
    x = xs[0]
    attr_until, fn = _REDUCERS[node.op_type]
    axes = axes_arg(node, xs, 1, attr_until)
    if not axes:
        if node.attr("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    if x.dim() == 0:
        return x
    dims = tuple(sorted({norm_axis(a, x.dim()) for a in axes}))
    return fn(x, dims, bool(node.attr("keepdims", 1)))


for _op in _REDUCERS:
    register_op(_op)(_reduce)


def _arg(node: NodeSpec, x: torch.Tensor, largest: bool) -> torch.Tensor:
    axis = norm_axis(node.attr("axis", 0), x.dim())
    keepdim = bool(node.attr("keepdims", 1))
    if node.attr("select_last_index", 0):
        flipped = x.flip(axis)
        idx = (flipped.argmax if largest else flipped.argmin)(dim=axis, keepdim=keepdim)
        return x.shape[axis] - 1 - idx
    return (x.argmax if largest else x.argmin)(dim=axis, keepdim=keepdim)


@register_op("ArgMax")
def _argmax(m, node, xs):
    return _arg(node, xs[0], True)


@register_op("ArgMin")
def _argmin(m, node, xs):
    return _arg(node, xs[0], False)


@register_op("TopK")
def _topk(m, node, xs):
    x = xs[0]
    k = int(xs[1].reshape(-1)[0].item()) if node.opset >= 10 else node.attr("k")
    axis = norm_axis(node.attr("axis", -1), x.dim())
    values, indices = torch.topk(
        x, k, dim=axis, largest=bool(node.attr("largest", 1)), sorted=bool(node.attr("sorted", 1))
    )
    return values, indices


@register_op("CumSum")
def _cumsum(m, node, xs):
    x, axis_t = xs
    axis = norm_axis(int(axis_t.reshape(-1)[0].item()), x.dim())
    reverse, exclusive = node.attr("reverse", 0), node.attr("exclusive", 0)
    if reverse:
        x = x.flip(axis)
    y = torch.cumsum(x, dim=axis)
    if exclusive:
        y = y - x
    return y.flip(axis) if reverse else y
