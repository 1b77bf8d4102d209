"""Low-bit weights that really shrink the file: integer codes packed into bytes, decoded inside the graph.

A weight initializer ``W`` is replaced by a few nodes that compute a tensor named ``W`` again, so its
consumers are untouched:

- codes of width 1, 2 or 4 bits are packed LSB-first, ``8 / width`` per byte, into a ``uint8 [M, 1]``
  initializer and unpacked with two ``BitShift`` nodes (opset 11; shift left to drop the higher codes —
  uint8 wraps — then right to drop the lower ones), ``Reshape`` (and ``Slice`` when padded);
  8-bit codes are stored as ``uint8`` in the weight's shape;
- ``codebook`` decoding: ``Gather(codebook, Cast(codes, int32))`` (k-means clusters);
- ``sparse`` layout for mostly-zero clustered layers (:func:`encode_sparse_codebook`): a 1-bit nonzero mask
  plus the codes of the nonzeros only, ranked in-graph with ``CumSum``;
- ``relative`` layout (:func:`encode_relative_codebook`), Deep Compression's own sparse storage: the gap
  before each nonzero in one byte (a filler entry when a gap overflows 255) plus its code, scattered in-graph
  with ``CumSum`` + ``ScatterElements``; for very sparse layers an entropy coder squeezes the gaps further
  than the bitmap (gaps are symbols whose skewed distribution xz or Huffman models directly);
- ``affine`` decoding: ``(Cast(codes, float) - offset) * scale`` with a per-channel ``scale``
  (binary: offset 0.5 and scale 2α gives exactly ±α; ternary: offset 1 and scale α gives {−α, 0, +α}).

ONNX Runtime folds these constant subgraphs once when the session is created, so inference runs the
same dense kernels as before. ONNX's own ``INT4``/``INT2`` types with ``DequantizeLinear`` would also
work, but ONNX Runtime 1.32 accepts them only from opset 21 (4-bit) and 25 (2-bit), which would force an
opset upgrade on the whole graph; ``BitShift`` works from opset 11.

``analysis.count_params`` sees the packed bytes, not the weights; ``analysis.packed_param_counts`` gives the
correction from what :func:`encode_weight` records in the model's ``metadata_props`` (under
``analysis.PACKED_KEY``), and ``analysis.param_counts`` — what the service reports — applies it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compression.analysis import PACKED_KEY, packed_entries
from compression.errors import CompressionError

WIDTHS = (1, 2, 4, 8)


def container_bits(bits: int) -> int:
    """Storage width for codes of ``bits`` bits: the smallest of 1, 2, 4, 8 that holds them."""
    if not 1 <= bits <= 8:
        raise ValueError("bits must be in 1..8")
    return next(w for w in WIDTHS if w >= bits)


def pack_codes(codes: np.ndarray, width: int) -> np.ndarray:
    """Pack unsigned codes (< 2**width) LSB-first, ``8 // width`` per byte; returns ``uint8 [M, 1]``.

    Example:
        >>> pack_codes(np.array([1, 0, 1, 1]), 1).ravel().tolist()
        [13]
    """
    flat = np.asarray(codes, dtype=np.uint8).ravel()
    if width == 8:
        return flat.copy()
    if flat.size and int(flat.max()) >= 1 << width:
        raise ValueError(f"code {int(flat.max())} does not fit in {width} bits")
    per = 8 // width
    padded = np.zeros(-(-flat.size // per) * per, np.uint8)
    padded[:flat.size] = flat
    shifts = (np.arange(per, dtype=np.uint8) * width)
    packed = np.bitwise_or.reduce(padded.reshape(-1, per) << shifts, axis=1).astype(np.uint8)
    return packed.reshape(-1, 1)


def unpack_codes(packed: np.ndarray, width: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_codes` (numpy reference of what the graph computes)."""
    if width == 8:
        return np.asarray(packed, np.uint8).ravel()[:n]
    per = 8 // width
    shifts = np.arange(per, dtype=np.uint8) * width
    vals = (np.asarray(packed, np.uint8).reshape(-1, 1) >> shifts) & np.uint8((1 << width) - 1)
    return vals.ravel()[:n]


@dataclass
class Encoded:
    """What :func:`encode_weight` wrote for one weight (for reports and the params correction)."""

    weight: str
    width: int
    stored_bytes: int  # packed codes + codebook/scales
    params: int
    nonzero: int
    tensors: list[str]
    layout: str = "dense"  # dense | sparse (bitmap of nonzeros + their codes) | relative (gaps + codes)


class _Names:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.used = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
        self.used |= {i.name for i in graph.input} | {n.name for n in graph.node}

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


class _Builder:
    """Collects the initializers and nodes that decode one weight, with names unique in the graph."""

    def __init__(self, graph: onnx.GraphProto, weight: str) -> None:
        self.names = _Names(graph)
        self.existing = {t.name: t for t in graph.initializer}
        self.base = weight.replace("/", "_").replace(":", "_")
        self.inits: list[onnx.TensorProto] = []
        self.shared: list[str] = []  # small constants reused across layers (named by their content)
        self.nodes: list[onnx.NodeProto] = []

    def init(self, arr: np.ndarray, suffix: str) -> str:
        name = self.names(f"{self.base}.{suffix}")
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def const(self, arr: np.ndarray) -> str:
        """A small constant (shift tables, shapes, axes), shared by every layer that needs the same one."""
        arr = np.ascontiguousarray(arr)
        name = f"nc.{arr.dtype}.{'x'.join(map(str, arr.shape))}.{'_'.join(str(v) for v in arr.ravel())}"
        t = self.existing.get(name)
        if t is not None and not np.array_equal(numpy_helper.to_array(t), arr):
            return self.init(arr, "const")  # a user tensor happens to have this name
        if t is None and name not in {x.name for x in self.inits}:
            self.inits.append(numpy_helper.from_array(arr, name))
        if name not in self.shared:
            self.shared.append(name)
        return name

    def node(self, op: str, inputs: list[str], suffix: str, out: str | None = None, **attrs) -> str:
        out = out or self.names(f"{self.base}.{suffix}")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.names(f"{self.base}.{suffix}.node"), **attrs))
        return out

    def codes(self, codes: np.ndarray, width: int, shape: list[int], suffix: str) -> tuple[str, str]:
        """Store ``codes`` packed at ``width`` bits; returns (stored initializer, uint8 tensor of ``shape``)."""
        n = int(np.prod(shape))
        if width == 8:
            name = self.init(np.asarray(codes, np.uint8).reshape(shape), suffix)
            return name, name
        per = 8 // width
        packed = pack_codes(codes, width)
        stored = self.init(packed, f"{suffix}{width}b")
        shl = self.const(np.array([[8 - width - j * width for j in range(per)]], np.uint8))
        shr = self.const(np.array([[8 - width]], np.uint8))
        t = self.node("BitShift", [stored, shl], "hi", direction="LEFT")
        t = self.node("BitShift", [t, shr], "lo", direction="RIGHT")
        if packed.shape[0] * per != n:
            t = self.node("Reshape", [t, self.const(np.array([-1], np.int64))], "flat")
            t = self.node("Slice", [t, self.const(np.array([0], np.int64)), self.const(np.array([n], np.int64)),
                                    self.const(np.array([0], np.int64))], "cut")
        return stored, self.node("Reshape", [t, self.const(np.array(shape, np.int64))], "unpacked")

    def install(self, model: onnx.ModelProto, weight: str) -> None:
        """Swap the weight initializer for the decode subgraph (which outputs a tensor of the same name)."""
        g = model.graph
        idx = next(i for i, t in enumerate(g.initializer) if t.name == weight)
        del g.initializer[idx]
        keep_inputs = [i for i in g.input if i.name != weight]  # IR < 4 lists initializers as inputs too
        if len(keep_inputs) != len(g.input):
            del g.input[:]
            g.input.extend(keep_inputs)
        g.initializer.extend(self.inits)
        rest = list(g.node)
        del g.node[:]
        g.node.extend(self.nodes + rest)

    def tensor_names(self) -> list[str]:
        return list(dict.fromkeys([t.name for t in self.inits] + self.shared))

    def nbytes(self, name: str) -> int:
        t = next(t for t in self.inits if t.name == name)
        return len(t.raw_data) if t.HasField("raw_data") else numpy_helper.to_array(t).nbytes


def _weight_info(model: onnx.ModelProto, weight: str) -> tuple[list[int], np.dtype]:
    t = next((t for t in model.graph.initializer if t.name == weight), None)
    if t is None:
        raise ValueError(f"no initializer {weight!r}")
    return [int(d) for d in t.dims], helper.tensor_dtype_to_np_dtype(t.data_type)


def _check_opset(model: onnx.ModelProto, need: int, what: str) -> None:
    if _opset(model) < need:
        raise CompressionError(f"{what} need opset >= {need}; this model has opset {_opset(model)}")


def encode_weight(
    model: onnx.ModelProto,
    weight: str,
    codes: np.ndarray,
    width: int,
    *,
    codebook: np.ndarray | None = None,
    scale: np.ndarray | None = None,
    offset: float = 0.0,
    zero_code: int | None = None,
) -> Encoded:
    """Replace initializer ``weight`` (in place) by packed ``codes`` and a decode subgraph.

    Args:
        model: edited in place; the decoded tensor keeps the name ``weight``.
        codes: unsigned integer codes in the weight's shape.
        width: 1, 2, 4 or 8 bits per code in storage.
        codebook: for ``Gather`` decoding (value = codebook[code]).
        scale, offset: for affine decoding (value = (code - offset) * scale); ``scale`` broadcasts
            against the weight (a per-channel shape such as ``[C, 1, 1, 1]``).
        zero_code: the code that decodes to 0 (for nonzero counts), if any.

    Returns:
        What was stored, for the report.

    Raises:
        CompressionError: the model's opset is below 11 and sub-byte codes need ``BitShift``.
    """
    if width not in WIDTHS:
        raise ValueError(f"width must be one of {WIDTHS}")
    if (codebook is None) == (scale is None):
        raise ValueError("give exactly one of codebook or scale")
    if width < 8:
        _check_opset(model, 11, f"packed {width}-bit weights (BitShift)")
    shape, dtype = _weight_info(model, weight)
    codes = np.asarray(codes).astype(np.uint8).reshape(shape)
    b = _Builder(model.graph, weight)
    stored_name, idx_name = b.codes(codes, width, shape, "codes")
    if codebook is not None:
        cb = b.init(np.asarray(codebook, dtype), "codebook")
        i32 = b.node("Cast", [idx_name], "idx", to=TensorProto.INT32)
        b.node("Gather", [cb, i32], "gather", out=weight, axis=0)
        decoded = np.asarray(codebook, dtype)[codes.astype(np.int64)]
        aux = np.asarray(codebook).size * dtype.itemsize
    else:
        assert scale is not None
        sc = b.init(np.asarray(scale, dtype), "scale")
        f = b.node("Cast", [idx_name], "float", to=helper.np_dtype_to_tensor_dtype(dtype))
        c = b.node("Sub", [f, b.const(np.array(offset, dtype))], "centered")
        b.node("Mul", [c, sc], "mul", out=weight)
        decoded = (codes.astype(dtype) - dtype.type(offset)) * np.asarray(scale, dtype)
        aux = np.asarray(scale).size * dtype.itemsize
    nonzero = int(np.count_nonzero(codes != zero_code)) if zero_code is not None else int(np.count_nonzero(decoded))
    enc = Encoded(weight, width, b.nbytes(stored_name) + aux, codes.size, nonzero, b.tensor_names(), "dense")
    b.install(model, weight)
    _record(model, stored_name, enc)
    return enc


def encode_sparse_codebook(model: onnx.ModelProto, weight: str, codes: np.ndarray, codebook: np.ndarray,
                           zero_code: int) -> Encoded:
    """Like :func:`encode_weight` with a codebook, for mostly-zero layers: a 1-bit nonzero mask plus the
    codes of the nonzeros only (Deep Compression's sparse storage, with the positions as a bitmap).

    In the graph: ``rank = CumSum(mask) * mask`` numbers the nonzeros 1..nnz (0 for zeros), and
    ``Gather(codebook, Gather([zero_code, nz_codes...], rank))`` decodes every weight.
    """
    _check_opset(model, 11, "sparse packed weights (BitShift, CumSum)")
    shape, dtype = _weight_info(model, weight)
    codes = np.asarray(codes).astype(np.int64).reshape(shape)
    mask = codes != zero_code
    nz = codes[mask]
    table = np.concatenate([[zero_code], nz]).astype(np.uint8)
    width = container_bits(max(1, int(np.ceil(np.log2(max(int(table.max()) + 1, 2))))))
    b = _Builder(model.graph, weight)
    mask_name, m = b.codes(mask.ravel().astype(np.uint8), 1, [codes.size], "mask")
    table_name, t = b.codes(table, width, [table.size], "nzcodes")
    m32 = b.node("Cast", [m], "mask32", to=TensorProto.INT32)
    rank = b.node("CumSum", [m32, b.const(np.array(0, np.int32))], "rank")
    rank = b.node("Mul", [rank, m32], "select")
    t32 = b.node("Cast", [t], "nz32", to=TensorProto.INT32)
    idx = b.node("Gather", [t32, rank], "codes", axis=0)
    cb = b.init(np.asarray(codebook, dtype), "codebook")
    flat = b.node("Gather", [cb, idx], "values", axis=0)
    b.node("Reshape", [flat, b.const(np.array(shape, np.int64))], "reshape", out=weight)
    stored = b.nbytes(mask_name) + b.nbytes(table_name) + np.asarray(codebook).size * dtype.itemsize
    enc = Encoded(weight, width, stored, codes.size, int(mask.sum()), b.tensor_names(), "sparse")
    b.install(model, weight)
    _record(model, mask_name, enc)
    return enc


MAX_GAP = 255  # one byte per gap; Deep Compression used 4-5 bits, but xz codes whole bytes best


def relative_entries(codes: np.ndarray, zero_code: int, max_gap: int = MAX_GAP) -> tuple[np.ndarray, np.ndarray]:
    """Deep Compression's relative indices: per entry the number of zeros skipped before it, and its code.

    A gap longer than ``max_gap`` gets filler entries (gap ``max_gap``, code ``zero_code``) that land on a
    zero weight, so every entry is one gap byte and one code, whatever the spacing.

    Example:
        >>> g, c = relative_entries(np.array([0, 3, 0, 0, 0, 0, 1]), 0, max_gap=2)
        >>> g.tolist(), c.tolist()
        ([1, 2, 1], [3, 0, 1])
    """
    flat = np.asarray(codes).ravel()
    pos = np.flatnonzero(flat != zero_code)
    gaps = np.diff(pos, prepend=-1) - 1  # zeros before each nonzero
    fillers = gaps // (max_gap + 1)  # entries of gap max_gap (each skips max_gap zeros and one filler slot)
    n = pos.size + int(fillers.sum())
    is_real = np.zeros(n, bool)
    is_real[np.cumsum(fillers + 1) - 1] = True
    out_gaps = np.full(n, max_gap, np.int64)
    out_gaps[is_real] = gaps % (max_gap + 1)
    out_codes = np.full(n, zero_code, np.int64)
    out_codes[is_real] = flat[pos]
    return out_gaps.astype(np.uint8), out_codes


def encode_relative_codebook(model: onnx.ModelProto, weight: str, codes: np.ndarray, codebook: np.ndarray,
                             zero_code: int) -> Encoded:
    """Like :func:`encode_sparse_codebook`, with the positions as relative indices (:func:`relative_entries`).

    In the graph: ``pos = CumSum(gap + 1) - 1`` gives each entry's flat position, and
    ``ScatterElements(ConstantOfShape(zero_code), pos, codes)`` rebuilds every code before the codebook
    ``Gather``. ONNX Runtime folds it all at session start, as it does the other layouts.
    """
    _check_opset(model, 11, "relative-index weights (CumSum, ScatterElements)")
    shape, dtype = _weight_info(model, weight)
    codes = np.asarray(codes).astype(np.int64).reshape(shape)
    nonzero = int((codes != zero_code).sum())
    if nonzero == 0:
        raise ValueError("no nonzero weight: use the dense layout")
    gaps, entry_codes = relative_entries(codes, zero_code)
    width = container_bits(max(1, int(np.ceil(np.log2(max(int(entry_codes.max()) + 1, 2))))))
    b = _Builder(model.graph, weight)
    gaps_name = b.init(gaps, "gaps")
    codes_name, c = b.codes(entry_codes, width, [entry_codes.size], "relcodes")
    step = b.node("Add", [b.node("Cast", [gaps_name], "gaps64", to=TensorProto.INT64),
                          b.const(np.array(1, np.int64))], "step")
    pos = b.node("Sub", [b.node("CumSum", [step, b.const(np.array(0, np.int64))], "end"),
                         b.const(np.array(1, np.int64))], "pos")
    base = b.node("ConstantOfShape", [b.const(np.array([codes.size], np.int64))], "zeros",
                  value=numpy_helper.from_array(np.array([zero_code], np.int32)))
    c32 = b.node("Cast", [c], "rel32", to=TensorProto.INT32)
    idx = b.node("ScatterElements", [base, pos, c32], "codes", axis=0)
    cb = b.init(np.asarray(codebook, dtype), "codebook")
    flat = b.node("Gather", [cb, idx], "values", axis=0)
    b.node("Reshape", [flat, b.const(np.array(shape, np.int64))], "reshape", out=weight)
    stored = gaps.size + b.nbytes(codes_name) + np.asarray(codebook).size * dtype.itemsize
    enc = Encoded(weight, width, stored, codes.size, nonzero, b.tensor_names(), "relative")
    b.install(model, weight)
    _record(model, gaps_name, enc)
    return enc


def _record(model: onnx.ModelProto, codes_name: str, enc: Encoded) -> None:
    entries = packed_entries(model)
    entries[codes_name] = {"weight": enc.weight, "width": enc.width, "params": enc.params,
                           "nonzero": enc.nonzero, "tensors": enc.tensors}
    kept = [p for p in model.metadata_props if p.key != PACKED_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=PACKED_KEY, value=json.dumps(entries, sort_keys=True))


def computed_weights(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """Values of tensors computed from initializers alone (decoded weights), run in ONNX Runtime.

    The nodes that produce ``names`` (and only those) are copied into a model without inputs.
    """
    import onnxruntime as ort

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    direct = {n: numpy_helper.to_array(inits[n]) for n in names if n in inits}
    wanted = [n for n in names if n not in inits]
    if not wanted:
        return direct
    needed_nodes: list[onnx.NodeProto] = []
    needed_inits: set[str] = set()
    seen: set[str] = set()
    stack = list(wanted)
    while stack:
        name = stack.pop()
        if name in seen or not name:
            continue
        seen.add(name)
        if name in inits:
            needed_inits.add(name)
            continue
        node = producer.get(name)
        if node is None:
            raise ValueError(f"{name!r} is not computed from initializers alone")
        if node not in needed_nodes:
            needed_nodes.append(node)
        stack.extend(node.input)
    order = [n for n in g.node if n in needed_nodes]
    probe_inits = [inits[n] for n in sorted(needed_inits)]
    untyped = helper.make_graph(order, "weights", [], [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None)
                                                        for n in wanted], initializer=probe_inits)
    m = helper.make_model(untyped, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    inferred = onnx.shape_inference.infer_shapes(m).graph.value_info
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred}
    del m.graph.output[:]
    m.graph.output.extend(helper.make_tensor_value_info(n, types.get(n) or TensorProto.FLOAT, None) for n in wanted)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    direct.update(zip(wanted, sess.run(wanted, {})))
    return direct
