"""Shape and indexing ops: Shape/Reshape/Slice/Gather/Concat/Expand/Pad and friends.

Shape-carrying values are int64 tensors (as in ONNX); ops that need them as Python ints
(Reshape targets, Slice bounds, ...) read them with ``.tolist()``. Data paths use differentiable
torch ops (``index_select``, ``gather``, ``index_put``) so gradients reach embeddings and weights.
Opset differences (attribute vs input for axes/splits/pads, Slice v1, Reshape ``allowzero``) are
resolved per node from ``node.opset``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .nodes import NodeSpec
from .ops import register_op


def ints(t: torch.Tensor | None) -> list[int]:
    """An int64 shape/axes tensor as a Python list (0-d tensors give a 1-element list)."""
    if t is None:
        return []
    return [int(v) for v in t.reshape(-1).tolist()]


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def axes_arg(node: NodeSpec, xs: list, input_index: int, attr_until: int) -> list[int] | None:
    """Axes given as an attribute (opset < ``attr_until``) or as an optional input (later opsets)."""
    if node.opset < attr_until:
        return node.attr("axes")
    if len(xs) > input_index and xs[input_index] is not None:
        return ints(xs[input_index])
    return None


def _i64(values: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=like.device)


# ------------------------------------------------------------------------------------- shapes
@register_op("Shape")
def _shape(m, node, xs):
    shape = list(xs[0].shape)
    start, end = node.attr("start", 0), node.attr("end", None)
    return _i64(shape[slice(start, end)], xs[0])


@register_op("Size")
def _size(m, node, xs):
    return torch.tensor(xs[0].numel(), dtype=torch.int64, device=xs[0].device)


def reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Align a reshape ``src -> dst`` into groups of dims whose products match (``[2,32,7,7] -> [2,1568]``
    gives ``([0],[0]), ([1,2,3],[1])``); None when the shapes hold zeros or do not align."""
    if math.prod(src) != math.prod(dst) or 0 in src or 0 in dst:
        return None
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        gi, gj = [i] if i < len(src) else [], [j] if j < len(dst) else []
        if not gi or not gj:  # trailing size-1 dims on one side
            if any((src[k] if gi else dst[k]) != 1 for k in (gi or gj)):
                return None
            groups.append((gi, gj))
            i, j = i + len(gi), j + len(gj)
            continue
        pi, pj = src[i], dst[j]
        while pi != pj:
            if pi < pj:
                gi.append(i + len(gi))
                pi *= src[gi[-1]]
            else:
                gj.append(j + len(gj))
                pj *= dst[gj[-1]]
        groups.append((gi, gj))
        i, j = gi[-1] + 1, gj[-1] + 1
    return groups


def follow_reshape(recorded: tuple[tuple[int, ...], tuple[int, ...]], live_in: tuple[int, ...], *,
                   pass_through: bool = False) -> list[int] | None:
    """Where a reshape recorded as ``src -> dst`` must go now that its input is ``live_in``.

    Channel pruning shrinks dims the graph baked into constants (``Reshape(x, [-1, 1568])``). Each
    aligned group keeps its meaning: a merge is the product of the live dims, a split keeps its inner
    dims (head size) and lets the outer one (head count) absorb the change. None when nothing
    structural changed (batch and sequence changes are the graph's own business) or it cannot tell —
    unless ``pass_through``: then a dim that maps to itself follows its live size too (running, not
    exporting: a fixed-batch graph bakes its batch of 1 into the target and fine-tuning feeds 64).
    """
    src, dst = recorded
    if tuple(live_in) == tuple(src) or len(live_in) != len(src):
        return None
    groups = reshape_groups(tuple(src), tuple(dst))
    if groups is None:
        return None
    out = list(dst)
    changed = False
    for gi, gj in groups:
        live = [live_in[k] for k in gi]
        if len(gi) == 1 and len(gj) == 1:
            changed = changed or (pass_through and live[0] != dst[gj[0]])  # the zoo's batch-1 YOLOv8 DFL
            out[gj[0]] = live[0]
            continue
        if live == [src[k] for k in gi]:
            continue
        changed = True
        total = math.prod(live)
        inner = math.prod(dst[k] for k in gj[1:])
        if total % max(inner, 1):
            return None
        out[gj[0]] = total // inner
    return out if changed else None


def _prepare_reshape(b, node: NodeSpec) -> None:
    # A target that is a graph constant cannot follow channel pruning by itself (see follow_reshape).
    node.extra["static_target"] = node.opset < 5 or b.const(node.inputs[1]) is not None


@register_op("Reshape", prepare=_prepare_reshape)
def _reshape(m, node, xs):
    x = xs[0]
    shape = ints(xs[1]) if node.opset >= 5 else list(node.attr("shape"))
    if not node.attr("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    mode = getattr(m, "_shape_probe", None)
    recorded = node.extra.get("reshape_shapes")
    followed = (follow_reshape(recorded, tuple(x.shape), pass_through=True)
                if recorded is not None and mode != "record" else None)
    if followed is not None and node.extra.get("static_target"):
        shape = followed  # a baked target may still "fit" by regrouping the batch: never trust it here
    try:
        y = x.reshape(shape)
    except RuntimeError:
        if followed is None:
            raise
        y = x.reshape(followed)  # a computed target with a stale constant piece
    if mode == "record":
        node.extra["reshape_shapes"] = (tuple(x.shape), tuple(y.shape))
    elif mode == "live":
        node.extra["reshape_live"] = (tuple(x.shape), tuple(y.shape))
    return y


@register_op("Flatten")
def _flatten(m, node, xs):
    x = xs[0]
    axis = norm_axis(node.attr("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@register_op("Transpose")
def _transpose(m, node, xs):
    x = xs[0]
    perm = node.attr("perm") or list(reversed(range(x.dim())))
    return x.permute(perm)


@register_op("Squeeze")
def _squeeze(m, node, xs):
    x = xs[0]
    axes = axes_arg(node, xs, 1, 13)
    if not axes:
        return x.squeeze()
    return x.squeeze(tuple(norm_axis(a, x.dim()) for a in axes))


@register_op("Unsqueeze")
def _unsqueeze(m, node, xs):
    x = xs[0]
    axes = axes_arg(node, xs, 1, 13) or []
    rank = x.dim() + len(axes)
    for axis in sorted(norm_axis(a, rank) for a in axes):
        x = x.unsqueeze(axis)
    return x


def _traced(m, node, y: torch.Tensor, **facts) -> None:
    """While the channel planner traces the graph (``m.channel_trace`` is a dict), remember which ONNX node
    made ``y``'s autograd node and what it did: torch-pruning's DepGraph sees only autograd nodes, and needs
    the exact sizes and output order of splits and concats (:mod:`compression.channels`)."""
    trace = getattr(m, "channel_trace", None)
    if trace is not None and y.grad_fn is not None:
        trace[y.grad_fn] = {"node": node.name, **facts}


@register_op("Concat")
def _concat(m, node, xs):
    tensors = [x for x in xs if x is not None]
    axis = norm_axis(node.attr("axis", 0), tensors[0].dim())  # torch-pruning misreads a negative dim
    y = torch.cat(tensors, dim=axis)
    _traced(m, node, y, axis=axis, sizes=[int(t.shape[axis]) for t in tensors])
    return y


@register_op("Split")
def _split(m, node, xs):
    x = xs[0]
    axis = norm_axis(node.attr("axis", 0), x.dim())
    dim = x.shape[axis]
    if node.opset < 13:
        sizes = node.attr("split")
    else:
        sizes = ints(xs[1]) if len(xs) > 1 and xs[1] is not None else None
    if not sizes:
        n = node.attr("num_outputs", len(node.outputs))
        chunk = math.ceil(dim / n)
        sizes = [chunk] * (n - 1) + [dim - chunk * (n - 1)]
    live = node.extra.get("split_live")  # sizes after channel pruning shrank the input
    if live is not None and sum(live) == dim:
        sizes = live
    ys = torch.split(x, list(sizes), dim=axis)
    _traced(m, node, ys[0], axis=axis, sizes=[int(s) for s in sizes])
    return ys


def _slice_axis(x: torch.Tensor, axis: int, start: int, end: int, step: int) -> torch.Tensor:
    dim = x.shape[axis]
    if step == 0:
        raise ValueError("Slice step cannot be 0")
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        index = [slice(None)] * axis + [slice(start, end, step)]
        return x[tuple(index)]
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    idx = torch.arange(start, end, step, device=x.device)
    return x.index_select(axis, idx)


@register_op("Slice")
def _slice(m, node, xs):
    x = xs[0]
    if node.opset < 10:
        starts, ends = node.attr("starts"), node.attr("ends")
        axes, steps = node.attr("axes"), None
    else:
        starts, ends = ints(xs[1]), ints(xs[2])
        axes = ints(xs[3]) if len(xs) > 3 and xs[3] is not None else None
        steps = ints(xs[4]) if len(xs) > 4 and xs[4] is not None else None
    axes = axes if axes else list(range(len(starts)))
    steps = steps if steps else [1] * len(starts)
    live = node.extra.get("slice_live", {})  # axis -> (start, end) after channel pruning
    node.extra["slice_rank"] = x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = norm_axis(axis, x.dim())
        start, end = live.get(axis, (start, end))
        x = _slice_axis(x, axis, start, end, step)
        _traced(m, node, x, axis=axis)
    return x


# ----------------------------------------------------------------------------------- indexing
def _wrap_negative(idx: torch.Tensor, dim: int) -> torch.Tensor:
    idx = idx.to(torch.int64)
    return torch.where(idx < 0, idx + dim, idx)


@register_op("Gather")
def _gather(m, node, xs):
    data, idx = xs
    axis = norm_axis(node.attr("axis", 0), data.dim())
    flat = _wrap_negative(idx, data.shape[axis]).reshape(-1)
    out = data.index_select(axis, flat)
    return out.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :]))


@register_op("GatherElements")
def _gather_elements(m, node, xs):
    data, idx = xs
    axis = norm_axis(node.attr("axis", 0), data.dim())
    return torch.gather(data, axis, _wrap_negative(idx, data.shape[axis]))


@register_op("GatherND")
def _gather_nd(m, node, xs):
    data, idx = xs
    b = node.attr("batch_dims", 0)
    k = idx.shape[-1]
    batch_shape = data.shape[:b]
    nb = math.prod(batch_shape)
    flat_data = data.reshape((nb, *data.shape[b:]))
    flat_idx = idx.reshape(nb, -1, k).to(torch.int64)
    batch = torch.arange(nb, device=data.device).reshape(nb, 1).expand(nb, flat_idx.shape[1])
    comps = [_wrap_negative(flat_idx[..., i], flat_data.shape[1 + i]) for i in range(k)]
    out = flat_data[(batch, *comps)]
    return out.reshape((*batch_shape, *idx.shape[b:-1], *data.shape[b + k :]))


@register_op("ScatterND")
def _scatter_nd(m, node, xs):
    data, idx, updates = xs
    k = idx.shape[-1]
    flat_idx = idx.reshape(-1, k).to(torch.int64)
    comps = tuple(_wrap_negative(flat_idx[:, i], data.shape[i]) for i in range(k))
    values = updates.reshape((-1, *data.shape[k:]))
    reduction = node.attr("reduction", "none")
    if reduction == "none":
        return data.index_put(comps, values)
    if reduction == "add":
        return data.index_put(comps, values, accumulate=True)
    raise NotImplementedError(f"ScatterND reduction={reduction!r}")


@register_op("ScatterElements", "Scatter")
def _scatter_elements(m, node, xs):
    data, idx, updates = xs
    axis = norm_axis(node.attr("axis", 0), data.dim())
    idx = _wrap_negative(idx, data.shape[axis])
    reduction = node.attr("reduction", "none")
    if reduction == "none":
        return torch.scatter(data, axis, idx, updates)
    op = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}[reduction]
    return torch.scatter_reduce(data, axis, idx, updates, reduce=op, include_self=True)


# ------------------------------------------------------------------------------ construction
@register_op("Expand")
def _expand(m, node, xs):
    x, shape = xs
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(ints(shape))))


@register_op("Tile")
def _tile(m, node, xs):
    return xs[0].repeat(ints(xs[1]))


@register_op("ConstantOfShape")
def _constant_of_shape(m, node, xs):
    value = node.attr("value")
    arr = np.zeros(1, dtype=np.float32) if value is None else np.asarray(value).reshape(-1)
    device = xs[0].device
    return torch.full(ints(xs[0]), arr[0].item(), dtype=torch.from_numpy(arr).dtype, device=device)


@register_op("Range")
def _range(m, node, xs):
    start, limit, delta = xs
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


@register_op("Constant")
def _constant(m, node, xs):
    """Only reached inside subgraphs or for exotic forms; top-level Constants become buffers."""
    dtypes = {"value": None, "value_float": np.float32, "value_floats": np.float32,
              "value_int": np.int64, "value_ints": np.int64}
    for name, dtype in dtypes.items():
        if name in node.attrs:
            return torch.as_tensor(np.asarray(node.attrs[name], dtype=dtype))
    raise NotImplementedError(f"Constant node {node.name!r}: unsupported attribute {list(node.attrs)}")


@register_op("Pad")
def _pad(m, node, xs):
    x = xs[0]
    rank = x.dim()
    if node.opset < 11:
        pads, value = list(node.attr("pads")), node.attr("value", 0.0)
        axes = list(range(rank))
    else:
        pads = ints(xs[1])
        value = xs[2].item() if len(xs) > 2 and xs[2] is not None and xs[2].numel() else 0
        axes = ints(xs[3]) if len(xs) > 3 and xs[3] is not None else list(range(rank))
    axes = [norm_axis(a, rank) for a in axes]
    n = len(axes)
    begin, end = dict(zip(axes, pads[:n], strict=True)), dict(zip(axes, pads[n:], strict=True))
    first = min((a for a in axes if begin[a] or end[a]), default=rank)
    torch_pads: list[int] = []
    for axis in reversed(range(first, rank)):  # F.pad lists the last dimension first
        torch_pads += [begin.get(axis, 0), end.get(axis, 0)]
    if not torch_pads:
        return x
    mode = node.attr("mode", "constant")
    if mode == "constant":
        return F.pad(x, torch_pads, mode="constant", value=value)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    return F.pad(x, torch_pads, mode=torch_mode)


@register_op("Trilu")
def _trilu(m, node, xs):
    x = xs[0]
    k = int(xs[1].item()) if len(xs) > 1 and xs[1] is not None else 0
    return torch.triu(x, k) if node.attr("upper", 1) else torch.tril(x, k)


@register_op("NonZero")
def _nonzero(m, node, xs):
    return torch.nonzero(xs[0]).t().contiguous()


@register_op("OneHot")
def _one_hot(m, node, xs):
    idx, depth, values = xs
    depth_i = int(depth.item())
    idx = idx.to(torch.int64)
    idx = torch.where(idx < 0, idx + depth_i, idx)
    valid = (idx >= 0) & (idx < depth_i)
    hot = F.one_hot(torch.where(valid, idx, 0), depth_i) * valid.unsqueeze(-1).to(torch.int64)
    out = torch.where(hot.bool(), values[1], values[0])
    axis = norm_axis(node.attr("axis", -1), out.dim())
    return out.movedim(-1, axis)


@register_op("DepthToSpace")
def _depth_to_space(m, node, xs):
    x = xs[0]
    b = node.attr("blocksize")
    n, c, h, w = x.shape
    if node.attr("mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


@register_op("SpaceToDepth")
def _space_to_depth(m, node, xs):
    x = xs[0]
    b = node.attr("blocksize")
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)
