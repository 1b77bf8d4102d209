"""Weight-only blockwise quantization: ``scheme: int4`` and ``scheme: int8, mode: weight_only``.

Each selected weight is cut into blocks of ``block_size`` values along its input axis (K of a MatMul's
``[K, N]`` weight; the embedding dimension of a ``Gather`` table), and each block gets its own scale (and a
zero point when asymmetric). Activations stay float: nothing to calibrate for ``rtn``/``hqq``, and the
accuracy of 4-bit weights holds far better than 4-bit per-tensor codes would.

What ONNX Runtime (``onnxruntime.quantization.matmul_nbits_quantizer``) does, and what is done here:

- ``format: matmulnbits`` — ``MatMulNBits`` (com.microsoft, 4 or 8 bits) for MatMuls and
  ``GatherBlockQuantized`` (4 bits, quant axis 1) for embedding tables. ORT forces opset 21 whenever it
  writes int4 tables; the contrib ops do not need it (measured: the graph loads and runs at its own opset with
  IR 10), so the original opset is restored rather than claimed without a conversion.
- ``format: qdq`` — standard ONNX: blocked ``DequantizeLinear`` (opset 21, ``block_size`` attribute) in
  front of the MatMul/Gather. The graph is converted to opset 21 with ONNX's version converter first (and
  kept only when it computes what the original does). ORT writes 4-bit QDQ for MatMul only; the 8-bit head
  and the tables are written here (:func:`_dequantize_linear`).
- Algorithms: ``rtn`` is ORT's own round-to-nearest (``DefaultWeightOnlyQuantConfig``), ``hqq`` ORT's
  half-quadratic quantizer (optimises scale and a float zero point per block; asymmetric only), ``gptq``
  GPTQ from ORT's bundled neural-compressor code (needs calibration inputs; MatMul only). The tables of
  ``hqq``/``gptq`` runs are quantized by ``rtn``: neither algorithm handles ``Gather``.
- ``keep_8bit``: layers written as 8-bit ``MatMulNBits`` in a second pass restricted to them (the LM head by
  default: a 4-bit head makes a small language model repeat itself).
- Gemm with a constant B is rewritten as MatMul (+Add) first: ORT's weight-only quantizer skips Gemm.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compression.analysis import fixed_batch, input_specs
from compression.context import StepContext, StepResult
from compression.errors import CompressionError, InvalidSpec, NotApplicable, QuantizerFailed, scrub_paths
from compression.graph_prep import lift_constants, opset, upgrade_opset
from compression.step_spec import ModelFacts, StepCheck
from compression.techniques.quantization.int8 import gemm_to_matmul

QDQ_BLOCK_OPSET = 21  # DequantizeLinear's block_size and the int4 type
# block of the 8-bit codes inside an int4 step (the LM head, 8-bit tables): 8-bit rounding error is small
# against a coarse block's range, and at block 32 the float32 scales would be an eighth of the codes' bytes
# (NNCF keeps these layers per-channel int8: one scale per column)
EIGHT_BIT_BLOCK = 128
GPTQ_SAMPLES = 128  # calibration inputs GPTQ's Hessians are built from (capped by the training split)
_FLOAT = (TensorProto.FLOAT, TensorProto.FLOAT16)


@dataclass(frozen=True)
class WeightOnlyOptions:
    """The weight-only options of a spec, defaults filled in (see ``QuantizeSpec``)."""

    bits: Literal[4, 8]
    algorithm: Literal["rtn", "hqq", "gptq"] = "rtn"
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int | None = None
    embeddings: bool = True
    embedding_bits: Literal[4, 8] = 8
    layers: list[str] | None = None
    exclude_layers: list[str] = field(default_factory=list)
    keep_8bit: list[str] | None = None  # None: the LM head (when there is one); []: none
    format: Literal["matmulnbits", "qdq"] = "matmulnbits"


@dataclass(frozen=True)
class Weight:
    """A weight the engine can quantize: a MatMul's constant 2-D ``[K, N]`` or a Gather's ``[rows, dim]`` table."""

    node: str
    weight: str
    op: Literal["MatMul", "Gather"]
    shape: tuple[int, int]

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]


def weights(model: onnx.ModelProto) -> list[Weight]:
    """MatMuls with a constant 2-D float weight (input B) and Gathers (axis 0) of a constant 2-D float table.

    Gemm is not listed: :func:`prepare` rewrites it as MatMul first. MatMuls of two activations (attention
    scores) have no constant weight and are not listed either.
    """
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) > 1:
            t = inits.get(n.input[1])
        elif n.op_type == "Gather" and _attr(n, "axis", 0) == 0:
            t = inits.get(n.input[0])
        else:
            continue
        if t is not None and t.data_type in _FLOAT and len(t.dims) == 2:
            out.append(Weight(n.name, t.name, n.op_type, (int(t.dims[0]), int(t.dims[1]))))
    return out


def lm_head(model: onnx.ModelProto, found: list[Weight]) -> Weight | None:
    """The language-model head: the last MatMul whose output reaches a graph output through weightless ops
    only, when its N is the widest of every MatMul (the vocabulary projection), else None."""
    mats = [w for w in found if w.op == "MatMul"]
    if not mats:
        return None
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}
    weighted = {"MatMul", "Gemm", "Conv", "MatMulNBits", "Gather"}
    by_node = {n.name: n for n in model.graph.node}

    def reaches_output(name: str, depth: int = 0) -> bool:
        if name in outputs:
            return True
        if depth > 8:
            return False
        return any(c.op_type not in weighted and any(reaches_output(o, depth + 1) for o in c.output)
                   for c in consumers.get(name, []))

    widest = max(w.shape[1] for w in mats)
    for w in reversed(mats):
        if any(reaches_output(o) for o in by_node[w.node].output):
            return w if w.shape[1] == widest else None
    return None


def prepare(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Constants lifted, Gemm rewritten as MatMul(+Add), every node named, shared weights unshared.

    ORT names a quantized tensor after its source (``W_Q4``): two nodes reading one weight (a tied embedding
    read by a Gather and by the head) would write two tensors of one name, so each reader gets its own copy —
    the tied table and the head are stored once each, in their own layouts (blocks along different axes).
    """
    notes = []
    model, lifted = lift_constants(model)
    if lifted:
        notes.append(f"{lifted} Constant nodes lifted into initializers")
    model, rewritten = gemm_to_matmul(model)
    if rewritten:
        notes.append(f"{rewritten} Gemm rewritten as MatMul(+Add): ORT's weight-only quantizer skips Gemm")
    g = model.graph
    names = {n.name for n in g.node if n.name}
    for i, n in enumerate(g.node):
        if not n.name or sum(1 for m in g.node if m.name == n.name) > 1:
            base = f"{n.op_type}_wq{i}"
            while base in names:
                base += "_"
            n.name = base
            names.add(base)
    inits = {t.name: t for t in g.initializer}
    seen: set[str] = set()
    copies = 0
    for n in g.node:
        slot = 1 if n.op_type == "MatMul" else 0 if n.op_type == "Gather" else None
        if slot is None or len(n.input) <= slot or n.input[slot] not in inits:
            continue
        name = n.input[slot]
        if name in seen:
            t = onnx.TensorProto()
            t.CopyFrom(inits[name])
            t.name = f"{name}_{n.name}"
            g.initializer.append(t)
            n.input[slot] = t.name
            copies += 1
        seen.add(name)
    if copies:
        notes.append(f"{copies} shared weights copied (one per reader: tied embeddings)")
    return model, notes


def select(found: list[Weight], options: WeightOnlyOptions, head: Weight | None) -> tuple[list[Weight], set[str]]:
    """The weights to quantize and the node names kept at 8 bits; unknown names are refused (InvalidSpec)."""
    known = {w.weight for w in found} | {w.node for w in found}
    errors = []
    for fld, names in (("layers", options.layers or []), ("exclude_layers", options.exclude_layers),
                       ("keep_8bit", options.keep_8bit or [])):
        errors += [{"loc": [fld], "msg": f"unknown layer {u!r}"} for u in sorted(set(names) - known)]
    if errors:
        raise InvalidSpec(f"unknown layers {[e['msg'][14:] for e in errors]}; quantizable weights: "
                          f"{[w.node for w in found]}", errors)

    def named(w: Weight, names: list[str]) -> bool:
        return w.node in names or w.weight in names

    chosen = [w for w in found if (options.layers is None or named(w, options.layers))
              and not named(w, options.exclude_layers) and (w.op == "MatMul" or options.embeddings)]
    if options.bits == 8:
        return chosen, {w.node for w in chosen}
    keep = options.keep_8bit if options.keep_8bit is not None else ([head.node] if head else [])
    return chosen, {w.node for w in chosen if w.op == "MatMul" and named(w, keep)}


def weight_summary(model: onnx.ModelProto) -> dict:
    """What preflight needs to judge a weight-only step: every quantizable weight as ``[op, K, N, is_head]``
    (a Gather's table as ``[rows, dim]``), after the same preparation the step does (Gemm rewritten)."""
    prepared, _ = prepare(model)
    found = weights(prepared)
    head = lm_head(prepared, found)
    return {"weights": [[w.op, w.shape[0], w.shape[1], head is not None and w.node == head.node] for w in found]}


def expected_bytes(op: str, k: int, n: int, bits: int, block: int, symmetric: bool = True) -> int:
    """Bytes of one weight after blockwise quantization: codes of padded blocks, a float scale per block (and a
    zero point when asymmetric). A MatMul's blocks run along K (padded), a table's along its dim."""
    along, across = (k, n) if op == "MatMul" else (n, k)
    blocks = -(-along // block)
    codes = blocks * block * across * bits // 8 if op == "MatMul" else along * across * bits // 8
    return codes + blocks * across * 4 + (0 if symmetric else -(-blocks * across * bits // 8))


def preflight_check(facts: ModelFacts, *, bits: int, block_size: int, embeddings: bool,
                    keep_8bit: list[str] | str | None, embedding_bits: int = 8) -> StepCheck:
    """The weight-only step against preflight's facts: qualifying MatMuls, padded blocks, the expected size."""
    summary = facts.weight_only
    if summary is None:
        return StepCheck.acting_on(facts.quantizable)
    rows = summary["weights"]
    mats = [r for r in rows if r[0] == "MatMul"]
    if not mats:
        return StepCheck(targets=0, applies=False, notes=[
            "no MatMul (or Gemm) with a constant 2-D weight: weight-only quantization has nothing to act on "
            "(use scheme int8 for convolutions)"])
    chosen = mats + ([r for r in rows if r[0] == "Gather"] if embeddings else [])
    head_8 = keep_8bit == "lm_head" or keep_8bit is None
    before = sum(r[1] * r[2] * 4 for r in chosen)
    def width(r: list) -> int:
        return 8 if bits == 8 or (r[3] and head_8) or (r[0] == "Gather" and embedding_bits == 8) else 4

    def block(r: list) -> int:
        eight_in_int4 = bits == 4 and width(r) == 8
        return coarse_block(r[1] if r[0] == "MatMul" else r[2]) if eight_in_int4 else block_size

    after = sum(expected_bytes(r[0], r[1], r[2], width(r), block(r)) for r in chosen)
    padded = [r for r in mats if r[1] % block_size]
    notes = [f"{len(mats)} MatMuls with constant 2-D weights qualify"
             + (f", and {len(chosen) - len(mats)} embedding tables" if len(chosen) > len(mats) else "")
             + f": {before / 1e6:.2f} MB of float32 weights, about {after / 1e6:.2f} MB after int{bits} "
             f"(block {block_size}{', LM head at 8 bits' if bits == 4 and head_8 and any(r[3] for r in mats) else ''})"]
    if padded:
        notes.append(f"{len(padded)} MatMuls have K not a multiple of {block_size} (K = "
                     f"{sorted({r[1] for r in padded})}): their last block is padded")
    return StepCheck(targets=len(chosen), notes=notes)


def quantize_weight_only(model: onnx.ModelProto, ctx: StepContext, *, options: WeightOnlyOptions) -> StepResult:
    """Blockwise weight-only quantization with ONNX Runtime (see the module doc).

    Args:
        model: float model.
        ctx: ``gptq`` calibrates on the training split (at most :data:`GPTQ_SAMPLES` inputs).
        options: bits, algorithm, block size and the layers (see :class:`WeightOnlyOptions`).

    Returns:
        StepResult; the report has ``layers`` (one entry per quantizable weight: name, weight, op, shape,
        bits — 32 when left float —, block_size, algorithm), ``bytes_before``/``bytes_after`` of the
        quantized weights, ``opset`` and ``notes``.

    Raises:
        NotApplicable: no MatMul with a constant 2-D weight.
        InvalidSpec: unknown layer names; ``gptq`` without a dataset.
        QuantizerFailed: ONNX Runtime's quantizer failed, or what it wrote does not load and run.

    Example:
        >>> quantize_weight_only(model, ctx, options=WeightOnlyOptions(bits=4)).report["layers"][0]["bits"]  # doctest: +SKIP
        4
    """
    if options.algorithm == "gptq" and ctx.data is None:
        raise InvalidSpec("algorithm gptq needs a dataset for calibration (or use rtn/hqq)",
                          [{"loc": ["algorithm"], "msg": "gptq needs a dataset"}])
    ctx.progress("quantizing", 0.05, "preparing the graph")
    prepared, notes = prepare(model)
    found = weights(prepared)
    if not any(w.op == "MatMul" for w in found):
        raise NotApplicable("weight-only quantization needs MatMul (or Gemm) layers with constant 2-D weights; "
                            "this model has none (use scheme int8 for convolutions)")
    head = lm_head(prepared, found)
    chosen, eight = select(found, options, head)
    if not any(w.op == "MatMul" for w in chosen):
        raise InvalidSpec("no MatMul left to quantize after layers/exclude_layers",
                          [{"loc": ["layers"], "msg": "selects no MatMul"}])
    sample = _sample(prepared, ctx)
    original_opset = opset(prepared)
    if options.format == "qdq" and original_opset < QDQ_BLOCK_OPSET:
        prepared = _to_opset(prepared, sample)
        notes.append(f"opset {original_opset} converted to {QDQ_BLOCK_OPSET} (blocked DequantizeLinear)")
    # the passes below work in place on ``prepared`` (prepare() made it: never the caller's model), so a
    # multi-GiB model is not copied once per pass; what the report compares is taken first
    before_names = {t.name for t in prepared.graph.initializer}
    quantized_names = {w.weight for w in chosen}
    before_bytes = {t.name: _nbytes(t) for t in prepared.graph.initializer if t.name in quantized_names}
    bits: dict[str, int] = {}
    out = prepared
    four = [w for w in chosen if w.op == "MatMul" and w.node not in eight]
    gathers = [w for w in chosen if w.op == "Gather"]
    with _quiet_ort():
        if four:
            ctx.progress("quantizing", 0.2, f"{options.algorithm}: {len(four)} MatMuls at 4 bits")
            out = _checked(out, four, 4, bits, lambda m: _four_bit_pass(m, four, options, ctx))
        mats8 = [w for w in chosen if w.op == "MatMul" and w.node in eight]
        if mats8:
            ctx.progress("quantizing", 0.6, f"{len(mats8)} MatMuls at 8 bits")
            if options.format == "qdq":
                out = _dq_pass(out, mats8, 8, options, bits)
            else:
                groups: dict[int, list[Weight]] = {}  # int8 weight_only: the options' block; int4: coarse blocks
                for w in mats8:
                    groups.setdefault(block_of(w, 8, options), []).append(w)
                for block8, group in groups.items():
                    out = _checked(out, group, 8, bits,
                                   lambda m, g=group, b=block8: _rtn_pass(m, g, 8, options, ("MatMul",), block=b))
        if gathers:
            tb = options.embedding_bits if options.bits == 4 else 8
            ctx.progress("quantizing", 0.8, f"{len(gathers)} embedding tables at {tb} bits")
            if options.format == "qdq":
                out = _dq_pass(out, gathers, tb, options, bits, table=True)
            elif tb == 8:
                out = _gather8_pass(out, gathers, options, bits)
            else:
                out = _checked(out, gathers, 4, bits, lambda m: _rtn_pass(m, gathers, 4, options, ("Gather",)))
    out = _finish(out, original_opset, options, notes)
    _check_runs(out, sample, ctx.workdir)
    rows = [{"name": w.node, "weight": w.weight, "op": w.op, "shape": list(w.shape), "bits": bits.get(w.node, 32),
             "block_size": block_of(w, bits[w.node], options) if w.node in bits else None,
             "algorithm": (options.algorithm if bits.get(w.node) == 4 and w.op == "MatMul" else "rtn")
             if w.node in bits else None,
             "params": int(np.prod(w.shape)), "bits_per_weight": _bits_per_weight(bits.get(w.node, 32), options,
                                                 block_of(w, bits.get(w.node, 4), options))}
            for w in found]
    quantized = {w.weight for w in found if w.node in bits}
    before = sum(n for name, n in before_bytes.items() if name in quantized)
    after = sum(_nbytes(t) for t in out.graph.initializer if t.name not in before_names)
    report = {"layers": rows, "bytes_before": before, "bytes_after": after,
              "quantized_weights": len(bits), "left_float": [w.node for w in found if w.node not in bits],
              "lm_head": head.node if head else None,
              "opset": {"original": original_opset, "quantized": opset(out)}, "notes": notes}
    return StepResult(out, report)


def _bits_per_weight(bits: int, options: WeightOnlyOptions, block: int) -> float:
    """Stored bits per weight with the block's scale (float32) and zero point (hqq: float32; other asymmetric
    codes: one code) spread over the block — what the dashboard's per-layer table shows."""
    if bits == 32:
        return 32.0
    zero = 0 if options.symmetric and options.algorithm != "hqq" else (32 if options.algorithm == "hqq" else bits)
    return round(bits + (32 + zero) / block, 3)


def _four_bit_pass(model: onnx.ModelProto, targets: list[Weight], options: WeightOnlyOptions,
                   ctx: StepContext) -> onnx.ModelProto:
    """The 4-bit MatMuls with the chosen algorithm."""
    if options.algorithm == "rtn":
        return _rtn_pass(model, targets, 4, options, ("MatMul",))
    if options.algorithm == "hqq":
        from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

        cfg = HQQWeightOnlyQuantConfig(block_size=options.block_size, bits=4, op_types_to_quantize=("MatMul",))
        q = MatMulNBitsQuantizer(model, bits=4, block_size=options.block_size, is_symmetric=False,
                                 accuracy_level=options.accuracy_level, nodes_to_exclude=_others(model, targets),
                                 algo_config=cfg)
        q.process()
        return q.model.model
    return _gptq(model, targets, options, ctx)


def block_of(w: Weight, nbits: int, options: WeightOnlyOptions) -> int:
    """The block a weight's codes use: the options' for 4-bit codes and in an int8 weight_only step; for the
    8-bit layers of an int4 step, :func:`coarse_block` of the axis the blocks run along (K, a table's width)."""
    if nbits == 4 or options.bits == 8 or options.format == "qdq":
        return options.block_size
    return coarse_block(w.shape[0] if w.op == "MatMul" else w.shape[1])


def coarse_block(dim: int) -> int:
    """The block of 8-bit codes in an int4 step: :data:`EIGHT_BIT_BLOCK`, or the largest power of two (≥ 16)
    not above ``dim`` so a narrow layer is not padded to a block it does not fill."""
    block = EIGHT_BIT_BLOCK
    while block > 16 and block > dim:
        block //= 2
    return block


def _rtn_pass(model: onnx.ModelProto, targets: list[Weight], nbits: int, options: WeightOnlyOptions,
              ops: tuple[str, ...], *, block: int | None = None) -> onnx.ModelProto:
    """ORT's round-to-nearest on ``targets`` only (every other node excluded: ``nodes_to_include`` adds to the
    op types rather than restricting them). ``block`` None: the options' (4-bit) or :func:`coarse_block` of
    the narrowest target's K (8-bit codes in an int4 step)."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    if block is None:
        block = options.block_size if nbits == 4 else coarse_block(min(w.shape[0] for w in targets))
    fmt = QuantFormat.QDQ if options.format == "qdq" else QuantFormat.QOperator
    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=options.symmetric,
                                       accuracy_level=options.accuracy_level, quant_format=fmt,
                                       op_types_to_quantize=ops, bits=nbits)
    q = MatMulNBitsQuantizer(model, bits=nbits, block_size=block,
                             is_symmetric=options.symmetric, accuracy_level=options.accuracy_level,
                             nodes_to_exclude=_others(model, targets), algo_config=cfg)
    q.process()
    return q.model.model


def _gptq(model: onnx.ModelProto, targets: list[Weight], options: WeightOnlyOptions,
          ctx: StepContext) -> onnx.ModelProto:
    """GPTQ (ORT's bundled neural-compressor code) on ``targets``; every other MatMul is marked ``fp32``."""
    from onnxruntime.quantization.neural_compressor.weight_only import gptq_quantize

    assert ctx.data is not None  # checked by the caller
    names = {w.node for w in targets}
    scheme = "sym" if options.symmetric else "asym"
    config: dict[str, object] = {
        n.name: ({"bits": 4, "group_size": options.block_size, "scheme": scheme} if n.name in names else "fp32")
        for n in model.graph.node if n.op_type == "MatMul"}
    fixed = fixed_batch(s["shape"] for s in input_specs(model))
    train = ctx.data.train
    n = min(GPTQ_SAMPLES, train.samples)
    batch = fixed or 16

    def loader() -> Iterator[tuple[dict[str, np.ndarray], None]]:
        for start in range(0, n - n % batch if fixed else n, batch):  # a fixed batch takes full batches only
            yield train.take(np.arange(start, min(start + batch, n))).inputs, None

    out = gptq_quantize(_copy(model), loader(), weight_config=config, num_bits=4, group_size=options.block_size,
                        scheme=scheme, n_samples=-1, accuracy_level=options.accuracy_level or 0)
    return out.model if hasattr(out, "model") else out


def _gather8_pass(model: onnx.ModelProto, targets: list[Weight], options: WeightOnlyOptions,
                  bits: dict[str, int]) -> onnx.ModelProto:
    """8-bit tables as ONNX Runtime's ``GatherBlockQuantized`` (uint8 codes, ``bits`` 8, blocks along the
    embedding dimension, the default zero point 128: symmetric): a row is dequantized when it is gathered,
    where a ``DequantizeLinear`` in front of a ``Gather`` would expand the whole table on every run. ORT's
    quantizer writes only 4-bit tables. Blocks: :func:`block_of`."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    by_name = {n.name: n for n in g.node}
    for w in targets:
        node = by_name[w.node]
        if _attr(node, "axis", 0) != 0:
            continue  # GatherBlockQuantized gathers uint8 rows on axis 0 only: the table stays float
        table = numpy_helper.to_array(inits[w.weight]).astype(np.float32)
        b = block_of(w, 8, options)
        codes, scale, _ = _block_quantize(table, 1, b, 8, True)
        base = f"{w.weight}_G8"
        g.initializer.append(numpy_helper.from_array((codes + 128).astype(np.uint8), base))
        dtype = helper.tensor_dtype_to_np_dtype(inits[w.weight].data_type)
        g.initializer.append(numpy_helper.from_array(scale.astype(dtype), base + "_scales"))
        new = helper.make_node("GatherBlockQuantized", [base, node.input[1], base + "_scales"], list(node.output),
                               name=node.name, domain="com.microsoft", bits=8, block_size=b, gather_axis=0,
                               quantize_axis=1)
        node.CopyFrom(new)
        bits[w.node] = 8
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _drop_unused(model)
    return model


def _dq_pass(model: onnx.ModelProto, targets: list[Weight], nbits: int, options: WeightOnlyOptions,
             bits: dict[str, int], *, table: bool = False) -> onnx.ModelProto:
    """Blocked ``DequantizeLinear`` (opset 21) in front of each target: the 8-bit head in QDQ form, and the
    tables in QDQ form (ORT writes no QDQ Gather). In place: ``model`` is the engine's."""
    out = model
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    by_name = {n.name: n for n in g.node}
    new_nodes: dict[str, onnx.NodeProto] = {}
    for w in targets:
        array = numpy_helper.to_array(inits[w.weight]).astype(np.float32)
        axis = 1 if table else 0  # blocks along K for a MatMul, along the embedding dim for a table
        block = options.block_size
        q, scale, zp = _block_quantize(array, axis, block, nbits, options.symmetric)
        qtype = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4,
                 (8, True): TensorProto.INT8, (8, False): TensorProto.UINT8}[(nbits, options.symmetric)]
        base = f"{w.weight}_DQ_Q{nbits}"
        g.initializer.append(_codes_tensor(base, qtype, q, nbits))
        dtype = helper.tensor_dtype_to_np_dtype(inits[w.weight].data_type)
        g.initializer.append(numpy_helper.from_array(scale.astype(dtype), base + "_scales"))
        ins = [base, base + "_scales"]
        if zp is not None:
            g.initializer.append(_codes_tensor(base + "_zp", qtype, zp, nbits))
            ins.append(base + "_zp")
        attrs = {"axis": axis, "block_size": options.block_size}
        dq = helper.make_node("DequantizeLinear", ins, [base + "_float"], name=f"{w.node}_DQ_Q{nbits}", **attrs)
        node = by_name[w.node]
        node.input[0 if table else 1] = dq.output[0]
        new_nodes[w.node] = dq
        bits[w.node] = nbits
    order = []
    for n in g.node:
        if n.name in new_nodes:
            order.append(new_nodes[n.name])
        order.append(n)
    del g.node[:]
    g.node.extend(order)
    _drop_unused(out)
    return out


def _codes_tensor(name: str, qtype: int, codes: np.ndarray, nbits: int) -> onnx.TensorProto:
    """Codes as raw bytes: one per value at 8 bits, two per byte (low nibble first) at 4 — as ONNX stores int4."""
    flat = codes.ravel().astype(np.int64)
    if nbits == 8:
        raw = flat.astype(np.int8 if qtype == TensorProto.INT8 else np.uint8).tobytes()
    else:
        nib = (flat & 0xF).astype(np.uint8)
        if nib.size % 2:
            nib = np.append(nib, np.uint8(0))
        raw = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()
    return helper.make_tensor(name, qtype, list(codes.shape), raw, raw=True)


def _block_quantize(w: np.ndarray, axis: int, block: int, nbits: int,
                    symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Blockwise codes along ``axis`` (the last block padded), scales (and zero points) of shape ``w`` with
    ``ceil(dim / block)`` along ``axis``, as ``DequantizeLinear`` with ``block_size`` reads them."""
    moved = np.moveaxis(w, axis, 0)
    dim = moved.shape[0]
    blocks = -(-dim // block)
    padded = np.zeros((blocks * block, *moved.shape[1:]), np.float32)
    padded[:dim] = moved
    b = padded.reshape(blocks, block, *moved.shape[1:])
    if symmetric:
        qmax = 2 ** (nbits - 1) - 1
        scale = np.abs(b).max(axis=1) / qmax
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(b / scale[:, None]), -qmax - 1, qmax)
        zp = None
    else:
        qmax = 2 ** nbits - 1
        lo, hi = np.minimum(b.min(axis=1), 0), np.maximum(b.max(axis=1), 0)
        scale = (hi - lo) / qmax
        scale[scale == 0] = 1.0
        zp = np.clip(np.rint(-lo / scale), 0, qmax)
        q = np.clip(np.rint(b / scale[:, None]) + zp[:, None], 0, qmax)
    q = q.reshape(blocks * block, *moved.shape[1:])[:dim]
    codes = np.moveaxis(q, 0, axis).astype(np.int64)
    scale = np.moveaxis(scale, 0, axis)
    return codes, scale, None if zp is None else np.moveaxis(zp, 0, axis).astype(np.int64)


def _checked(model: onnx.ModelProto, targets: list[Weight], nbits: int, bits: dict[str, int],
             run) -> onnx.ModelProto:
    """Run one ORT pass; record the targets it replaced (a node ORT skipped keeps its name and op)."""
    try:
        out = run(model)
    except CompressionError:
        raise
    except Exception as e:
        raise QuantizerFailed(f"ONNX Runtime's weight-only quantizer failed: {_reason(e)}") from None
    left = {(n.name, n.op_type) for n in out.graph.node}
    for w in targets:
        if (w.node, w.op) not in left:
            bits[w.node] = nbits
    return out


def _finish(model: onnx.ModelProto, original_opset: int, options: WeightOnlyOptions,
            notes: list[str]) -> onnx.ModelProto:
    """IR 10 (int4 tensors) and, for MatMulNBits, the model's own opset back (ORT forces 21 and warns the model
    may be invalid; the contrib ops need only IR 10)."""
    if options.format == "matmulnbits" and opset(model) != original_opset:
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = original_opset
    if any(t.data_type in (TensorProto.INT4, TensorProto.UINT4) for t in model.graph.initializer):
        model.ir_version = max(model.ir_version, 10)
    if not any(o.domain == "com.microsoft" for o in model.opset_import) and any(
            n.domain == "com.microsoft" for n in model.graph.node):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _drop_unused(model)
    return model


def _to_opset(model: onnx.ModelProto, sample: dict[str, np.ndarray] | None) -> onnx.ModelProto:
    """The model at opset 21 by ONNX's converter, kept only when it computes what the original does."""
    from compression.techniques.quantization.int8 import _same_outputs

    try:
        upgraded = upgrade_opset(model, QDQ_BLOCK_OPSET)
        _same_outputs(model, upgraded, sample)
        return upgraded
    except Exception as e:
        raise QuantizerFailed(f"format qdq needs opset {QDQ_BLOCK_OPSET} and ONNX's version converter failed on "
                              f"this model ({_reason(e)}); use format: matmulnbits") from None


def _check_runs(model: onnx.ModelProto, sample: dict[str, np.ndarray] | None, workdir: Path) -> None:
    """The result must load and run; one too big to serialize (over protobuf's 2 GiB) is checked from files."""
    import onnxruntime as ort

    from compression.modelio import PROTOBUF_LIMIT, save, weight_bytes

    try:
        if weight_bytes(model) > PROTOBUF_LIMIT:
            check = Path(workdir) / "weight-only-check" / "model.onnx"
            check.parent.mkdir(parents=True, exist_ok=True)
            save(model, check)
            sess = ort.InferenceSession(str(check), providers=["CPUExecutionProvider"])
        else:
            sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        if sample is not None:
            sess.run(None, sample)
    except Exception as e:
        raise QuantizerFailed(f"the weight-only quantized model does not run in ONNX Runtime: {_reason(e)}") from None


def _sample(model: onnx.ModelProto, ctx: StepContext) -> dict[str, np.ndarray] | None:
    if ctx.data is None:
        return None
    fixed = fixed_batch(s["shape"] for s in input_specs(model))
    return ctx.data.train.take(np.arange(min(fixed or 4, ctx.data.train.samples))).inputs


def _others(model: onnx.ModelProto, targets: list[Weight]) -> list[str]:
    names = {w.node for w in targets}
    return [n.name for n in model.graph.node if n.name not in names]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _drop_unused(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)


def _nbytes(t: onnx.TensorProto) -> int:
    """Bytes a tensor holds (raw data, or its typed fields)."""
    if t.raw_data:
        return len(t.raw_data)
    return len(t.SerializeToString())


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _reason(e: Exception) -> str:
    return scrub_paths(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")[:300]


@contextlib.contextmanager
def _quiet_ort() -> Iterator[None]:
    """ORT's weight-only quantizer logs every node at INFO (and neural-compressor prints a progress bar)."""
    loggers = [logging.getLogger(n) for n in ("onnxruntime.quantization.matmul_nbits_quantizer",
                                              "onnxruntime.quantization.neural_compressor.weight_only")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with open("/dev/null", "w") as sink, contextlib.redirect_stdout(sink):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


__all__ = ["GPTQ_SAMPLES", "QDQ_BLOCK_OPSET", "Weight", "WeightOnlyOptions", "expected_bytes", "lm_head", "prepare",
           "preflight_check", "quantize_weight_only", "select", "weight_summary", "weights"]
