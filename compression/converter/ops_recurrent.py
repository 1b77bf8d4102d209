"""Recurrent ops: LSTM, GRU and RNN (one layer; forward, reverse or bidirectional).

The weights stay in ONNX layout (``W [dirs, gates·H, I]``, ``R [dirs, gates·H, H]``, ``B [dirs, 2·gates·H]``):
as initializers they are ordinary trainable parameters of the module, so fine-tuning trains them and
:meth:`~compression.converter.OnnxModule.write_back` puts them back unchanged in shape, and when an exporter
computes them at run time (the dynamo exporter slices ``weight_ih`` per gate) the gradient flows through
those ops. Each forward reorders the gate blocks into torch's and runs torch's fused kernel
(``torch.lstm``/``torch.gru``/``torch.rnn_*``, cuDNN on a GPU):

- LSTM: ONNX ``i, o, f, c`` → torch ``i, f, g, o``
- GRU: ONNX ``z, r, h`` → torch ``r, z, n``; torch's GRU is ``linear_before_reset=1``, the ONNX default
  ``linear_before_reset=0`` runs a step loop instead (:func:`_gru_reset_before`).

``sequence_lens`` (a batch of different lengths) packs the batch the way ``nn.LSTM`` does: steps past a
sequence's length are zeros in ``Y`` and ``Y_h``/``Y_c`` are each sequence's last valid state, which is the
ONNX semantics. Anything torch's cells cannot express (other activations, ``clip``, ``input_forget``,
peepholes ``P``) is refused at conversion with :class:`~compression.converter.ops.UnsupportedOp` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .nodes import NodeSpec
from .ops import UnsupportedOp, register_op


@dataclass(frozen=True)
class _Cell:
    gates: int
    torch_order: tuple[int, ...]  # ONNX gate block feeding each torch gate block
    activations: tuple[str, ...]  # the ONNX defaults, per direction


_CELLS = {
    "LSTM": _Cell(4, (0, 2, 3, 1), ("sigmoid", "tanh", "tanh")),
    "GRU": _Cell(3, (1, 0, 2), ("sigmoid", "tanh")),
    "RNN": _Cell(1, (0,), ("tanh",)),
}
_DIRECTIONS = {"forward": 1, "reverse": 1, "bidirectional": 2}


def _refuse(node: NodeSpec, what: str) -> UnsupportedOp:
    return UnsupportedOp([f"{node.op_type}({what})"])


def _prepare_recurrent(b, node: NodeSpec) -> None:
    """Refuse at conversion what torch's cells cannot compute (the error names the attribute)."""
    cell = _CELLS[node.op_type]
    direction = node.attr("direction", "forward")
    if direction not in _DIRECTIONS:
        raise _refuse(node, f"direction={direction}")
    acts = [a.lower() for a in node.attr("activations", [])]
    allowed = [list(cell.activations)]
    if node.op_type == "RNN":
        allowed.append(["relu"])
    if acts and not any(acts == want * _DIRECTIONS[direction] for want in allowed):
        raise _refuse(node, "activations=" + ",".join(node.attr("activations")))
    if node.attr("clip") is not None:
        raise _refuse(node, "clip")
    if node.attr("input_forget", 0):
        raise _refuse(node, "input_forget=1")
    if node.op_type == "LSTM" and len(node.inputs) > 7 and node.inputs[7]:
        raise _refuse(node, "peepholes P")


def _opt(xs: list, i: int) -> torch.Tensor | None:
    return xs[i] if len(xs) > i else None


def _torch_weights(cell: _Cell, w: torch.Tensor, r: torch.Tensor, bias: torch.Tensor | None, d: int,
                   hidden: int) -> list[torch.Tensor]:
    """Direction ``d``'s ``[w_ih, w_hh, b_ih, b_hh]`` in torch's gate order (differentiable)."""

    def reorder(t: torch.Tensor) -> torch.Tensor:
        blocks = t.reshape(cell.gates, hidden, *t.shape[1:])
        return blocks[list(cell.torch_order)].reshape(t.shape)

    out = [reorder(w[d]), reorder(r[d])]
    if bias is not None:
        gh = cell.gates * hidden
        out += [reorder(bias[d, :gh]), reorder(bias[d, gh:])]
    return out


def _reverse_in_time(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """``x [T, N, …]`` with each sequence's first ``length`` steps reversed (padding stays in place)."""
    if lengths is None:
        return x.flip(0)
    steps = torch.arange(x.shape[0], device=x.device)[:, None]
    lens = lengths.to(x.device)[None, :]
    idx = torch.where(steps < lens, lens - 1 - steps, steps)
    return x.gather(0, idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x))


def _run_fused(op: str, x: torch.Tensor, hx: list[torch.Tensor], flat: list[torch.Tensor], bidirectional: bool,
               lengths: torch.Tensor | None, training: bool, relu: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """torch's one-layer kernel on ``x [T, N, I]``; returns ``Y [T, N, dirs·H]`` and the final states."""
    has_bias = len(flat) == 4 * (1 + bidirectional)
    fn = {"LSTM": torch.lstm, "GRU": torch.gru, "RNN": torch.rnn_relu if relu else torch.rnn_tanh}[op]
    state = tuple(hx) if op == "LSTM" else hx[0]
    if lengths is None:
        y, *final = fn(x, state, flat, has_bias, 1, 0.0, training, bidirectional, False)
        return y, final
    packed = pack_padded_sequence(x, lengths.cpu().long(), enforce_sorted=False)
    order, unorder = packed.sorted_indices, packed.unsorted_indices
    state = tuple(h.index_select(1, order) for h in hx) if op == "LSTM" else hx[0].index_select(1, order)
    y, *final = fn(packed.data, packed.batch_sizes, state, flat, has_bias, 1, 0.0, training, bidirectional)
    y, _ = pad_packed_sequence(packed._replace(data=y), total_length=x.shape[0])
    return y, [h.index_select(1, unorder) for h in final]


def _gru_reset_before(x: torch.Tensor, h: torch.Tensor, w: list[torch.Tensor], hidden: int,
                      lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """ONNX GRU with ``linear_before_reset=0`` (``h̃ = tanh(W_h·x + R_h·(r ⊙ h) + b)``), which torch has no
    kernel for: a loop over ``x [T, N, I]`` (already in processing order) with weights in torch order."""
    w_ih, w_hh = w[0], w[1]
    b_ih = w[2] if len(w) > 2 else x.new_zeros(3 * hidden)
    b_hh = w[3] if len(w) > 3 else x.new_zeros(3 * hidden)
    gx = torch.nn.functional.linear(x, w_ih, b_ih)  # [T, N, 3H]: r, z, n
    ys = []
    for t in range(x.shape[0]):
        gr, gz, gn = gx[t].chunk(3, -1)
        hr, hz, _ = torch.nn.functional.linear(h, w_hh, b_hh).chunk(3, -1)
        r = torch.sigmoid(gr + hr)
        z = torch.sigmoid(gz + hz)
        n = torch.tanh(gn + torch.nn.functional.linear(r * h, w_hh[2 * hidden:], b_hh[2 * hidden:]))
        new = (1 - z) * n + z * h
        if lengths is not None:
            live = (t < lengths.to(x.device))[:, None]
            new = torch.where(live, new, h)
            ys.append(torch.where(live, new, torch.zeros_like(new)))
        else:
            ys.append(new)
        h = new
    return torch.stack(ys), h


@register_op("LSTM", "GRU", "RNN", prepare=_prepare_recurrent)
def _recurrent(m, node: NodeSpec, xs):
    op, cell = node.op_type, _CELLS[node.op_type]
    x, w, r = xs[0], xs[1], xs[2]
    bias, lengths = _opt(xs, 3), _opt(xs, 4)
    direction = node.attr("direction", "forward")
    dirs = _DIRECTIONS[direction]
    hidden = int(node.attr("hidden_size", r.shape[-1]))
    batch_first = bool(node.attr("layout", 0))
    if batch_first:
        x = x.transpose(0, 1)
    steps, batch = x.shape[0], x.shape[1]
    states = []
    for i in (5, 6) if op == "LSTM" else (5,):
        h0 = _opt(xs, i)
        if h0 is None:
            h0 = x.new_zeros(dirs, batch, hidden)
        elif batch_first:
            h0 = h0.transpose(0, 1)
        states.append(h0.to(x.dtype))
    if lengths is not None and bool((lengths == steps).all()):
        lengths = None  # the whole batch is full length: no packing needed
    per_dir = [_torch_weights(cell, w, r, bias, d, hidden) for d in range(dirs)]
    relu = op == "RNN" and [a.lower() for a in node.attr("activations", ["tanh"])][0] == "relu"
    reset_before = op == "GRU" and not node.attr("linear_before_reset", 0)
    if reset_before or direction == "reverse":
        ys, finals = [], []
        for d in range(dirs):
            backwards = direction == "reverse" or d == 1
            xd = _reverse_in_time(x, lengths) if backwards else x
            hd = [s[d:d + 1] for s in states]
            if reset_before:
                y, h = _gru_reset_before(xd, hd[0][0], per_dir[d], hidden, lengths)
                fin = [h[None]]
            else:
                y, fin = _run_fused(op, xd, hd, per_dir[d], False, lengths, m.training, relu)
            ys.append(_reverse_in_time(y, lengths) if backwards else y)
            finals.append(fin)
        y = torch.cat(ys, -1)
        final = [torch.cat(parts, 0) for parts in zip(*finals, strict=True)]
    else:
        flat = [t for weights in per_dir for t in weights]
        y, final = _run_fused(op, x, states, flat, dirs == 2, lengths, m.training, relu)
    y = y.reshape(steps, batch, dirs, hidden)  # [T, N, dirs, H]
    if batch_first:
        return [y.transpose(0, 1), *(h.transpose(0, 1) for h in final)]  # [N, T, dirs, H], [N, dirs, H]
    return [y.permute(0, 2, 1, 3), *final]  # [T, dirs, N, H], [dirs, N, H]
