"""``scheme: int8`` with ONNX Runtime's quantizer: ``dynamic`` (MatMulInteger, weights only) or QDQ ``static``
(calibrated on the training split); ``mode: qat`` trains first (:mod:`.qat`) and exports through here.

Defaults favour accuracy and real speed on CPU: per-channel symmetric int8 weights, uint8 activations
(ORT's U8S8 kernels), no dynamic quantization of Conv (ConvInteger is 4–10× slower than fp32 on CPU:
static QDQ is the road for convolutions), and embedding tables (``Gather`` data) quantized too — half
of a small transformer's bytes are its word embeddings.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compression.analysis import fixed_batch, input_specs
from compression.context import StepContext, StepResult
from compression.data import Arrays
from compression.errors import CompressionError, InvalidSpec, UnsupportedOp, scrub_paths
from compression.graph_prep import PER_CHANNEL_QDQ_OPSET, lift_constants, opset, upgrade_opset

DYNAMIC_DEFAULT_OPS = ["MatMul", "Gather", "Attention", "LSTM", "EmbedLayerNormalization"]


@dataclass(frozen=True)
class Int8Options:
    """The int8 options of a spec, defaults filled in: what this engine (and QAT's export) reads."""

    mode: Literal["dynamic", "static", "qat"]
    per_channel: bool
    calibration: Literal["minmax", "entropy", "percentile"] | None = None
    calibration_samples: int | None = None
    op_types: list[str] | None = None
    exclude_nodes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run with ``path`` as the current directory.

    ORT's pre-processing leaves large temp files in the *current* directory on failure (≈90 MB on MiniLM):
    running it inside the step's scratch folder contains them.
    """
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def pre_process(src: Path, dst: Path) -> str:
    """ORT's ``quant_pre_process`` (BatchNorm folded, constants folded) from ``src`` to ``dst``, in ``dst``'s folder.

    Returns:
        ``"ok"``, or ``"skipped: <error type>"`` when it failed: pre-processing is an optimisation, the
        caller quantizes the raw graph instead.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with working_directory(dst.parent):
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
            return "ok"
        except Exception as e:
            return f"skipped: {type(e).__name__}"


class CalibrationReader:
    """ORT ``CalibrationDataReader`` over the training split, in small batches."""

    def __init__(self, arrays: Arrays, samples: int, batch: int, fixed_batch: int | None) -> None:
        n = min(samples, arrays.samples)
        self._arrays = arrays.take(np.arange(n))
        self._batch = fixed_batch or batch
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= self._arrays.samples:
            return None
        idx = np.arange(self._pos, min(self._pos + self._batch, self._arrays.samples))
        self._pos += self._batch
        return self._arrays.take(idx).inputs

    def rewind(self) -> None:
        self._pos = 0


@functools.cache  # the CPU does not change under a running process: /proc/cpuinfo is read once
def needs_reduce_range() -> bool:
    """Whether int8 weights should use 7 bits (ORT's ``reduce_range``) on this CPU.

    ONNX Runtime's U8S8 kernels on x86-64 without VNNI (AVX2, or AVX-512 without VNNI) multiply in 16-bit
    pairs that saturate; ORT's documentation says to quantize with ``reduce_range`` there. Measured on
    2026-12-01 on such a CPU (AVX2, no VNNI): default int8 dropped 6–14 pt on ResNet-50 / MobileNetV2 and the
    recogniser's centred cosine fell to 0.42. With VNNI (or off x86) the full 8 bits are kept."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return not {"avx512_vnni", "avx512vnni", "avx_vnni", "amx_int8"} & set(flags)


def gemm_to_matmul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite Gemm with a constant B (and transA=0) into MatMul + Add.

    ORT's dynamic quantizer has no Gemm support; without this rewrite an MLP exported with Gemm
    would come out of ``mode: dynamic`` exactly as large as it went in.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    new_nodes, rewritten = [], 0
    for node in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0):
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        if attrs.get("transB", 0):
            w = w.T
        w = w * float(attrs.get("alpha", 1.0))
        wname = node.input[1] + "_matmul"
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), wname))
        mm_out = node.output[0] + ("_mm" if len(node.input) > 2 and node.input[2] else "")
        new_nodes.append(helper.make_node("MatMul", [node.input[0], wname], [mm_out], name=(node.name or wname) + "_MatMul"))
        if len(node.input) > 2 and node.input[2]:
            bias = node.input[2]
            beta = float(attrs.get("beta", 1.0))
            if beta != 1.0 and bias in inits:
                b = numpy_helper.to_array(inits[bias]).astype(np.float32) * beta
                bias = bias + "_scaled"
                g.initializer.append(numpy_helper.from_array(b, bias))
            new_nodes.append(helper.make_node("Add", [mm_out, bias], [node.output[0]], name=(node.name or wname) + "_Add"))
        rewritten += 1
    del g.node[:]
    g.node.extend(new_nodes)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return out, rewritten


def quantize_int8(model: onnx.ModelProto, ctx: StepContext, *, options: Int8Options,
                  overrides: dict[str, list[dict]] | None = None) -> StepResult:
    """int8 with ONNX Runtime: ``dynamic`` (MatMulInteger, weights only) or QDQ ``static``/``qat`` export.

    Models from other exporters are prepared first (:mod:`compression.graph_prep`): ``Constant`` weights become
    initializers, and an opset-11/12 graph is raised to 13 for per-channel scales (or, when ONNX's converter
    cannot, quantized per-tensor at its own opset). ORT's pre-processed graph is tried first, the raw one when
    pre-processing fails or yields a graph the quantizer cannot handle; every result must load and run in
    ONNX Runtime. The report says which road was taken (``pre_process``, ``notes``).

    Args:
        model: float model.
        ctx: the training split calibrates static/qat; ``workdir`` holds ORT's files.
        options: mode, calibration and op selection (see :class:`Int8Options`).
        overrides: ORT ``TensorQuantOverrides`` (QAT passes its learned activation ranges).

    Returns:
        StepResult with the quantized model; the report counts quantized ops and embedding tables.

    Raises:
        InvalidSpec: static/qat without a dataset.
        UnsupportedOp: ONNX Runtime's quantizer cannot handle the graph (the message names the op when it can).
        CompressionError: ONNX Runtime's quantizer failed otherwise.

    Example:
        >>> options = Int8Options(mode="dynamic", per_channel=True)
        >>> quantize_int8(model, ctx, options=options).report["mode"]  # doctest: +SKIP
        'dynamic'
    """
    if options.mode != "dynamic" and ctx.data is None:
        raise InvalidSpec(f"int8 {options.mode} needs a dataset for calibration (or use mode: dynamic)",
                          [{"loc": ["mode"], "msg": f"{options.mode} needs a dataset"}])
    work = Path(tempfile.mkdtemp(prefix="quant-", dir=ctx.workdir))
    report: dict = {"mode": options.mode, "per_channel": options.per_channel, "weight_type": "int8 (symmetric)",
                    "notes": []}
    ctx.progress("quantizing", 0.05, "pre-processing")
    model, lifted = lift_constants(model)
    if lifted:
        report["notes"].append(f"{lifted} Constant nodes lifted into initializers (weights ORT can quantize)")
    if options.mode == "dynamic":
        model, n = gemm_to_matmul(model)
        if n:
            report["notes"].append(f"{n} Gemm rewritten as MatMul+Add (ORT quantizes MatMul, not Gemm, dynamically)")
    fixed = fixed_batch(s["shape"] for s in input_specs(model))
    sample = None if ctx.data is None else ctx.data.train.take(np.arange(min(fixed or 4, ctx.data.train.samples))).inputs
    roads = _roads(model, options.per_channel, sample, report)
    src, prepared, dst = work / "float.onnx", work / "prepared.onnx", work / "quantized.onnx"
    failures: list[str] = []
    skipped = None  # pre-processing's own failure on the road being tried
    with working_directory(work):
        for graph, per_channel, pre in roads:
            onnx.save_model(graph, str(src))
            if pre:
                skipped = pre_process(src, prepared)
                if skipped != "ok":
                    continue
                skipped = None
            try:
                ops = _quantize(prepared if pre else src, dst, ctx, options, per_channel, fixed, overrides, report)
                _check_runs(dst, sample)
            except CompressionError:
                raise
            except Exception as e:  # the quantizer's, or ORT refusing what it wrote: the next road may do
                failures.append(_reason(e))
                continue
            report["pre_process"] = "ok" if pre else skipped or f"retried without: {failures[-1][:300]}"
            if per_channel != options.per_channel:
                report["per_channel"] = False
                if failures:
                    report["notes"].append(f"per-tensor scales: per-channel failed ({failures[-1][:300]})")
            report["op_types"] = ops
            break
        else:
            raise _quantizer_error(failures or [f"pre-processing failed ({skipped})"])
    out = onnx.load_model(str(dst))
    del out.graph.value_info[:]  # shape annotations from pre-processing: bytes ORT does not need
    counts: dict[str, int] = {}
    for n in out.graph.node:
        if n.op_type in ("DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul"):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    report["quantized_op_counts"] = counts
    report["embeddings_quantized"] = _quantized_gathers(out)
    if not counts:
        report["notes"].append("nothing was quantized: no supported op found")
    return StepResult(out, report)


def _roads(model: onnx.ModelProto, per_channel: bool, sample: dict[str, np.ndarray] | None,
           report: dict) -> list[tuple[onnx.ModelProto, bool, bool]]:
    """What to try, in order: ``(graph, per_channel, pre_process)``.

    Per-channel QDQ needs opset 13 (``DequantizeLinear``'s ``axis``): an older graph is converted, and kept
    only when it computes what the original does; else (and as the last resort when the converted graph
    cannot be quantized) per-tensor scales at the model's own opset, which every opset ORT quantizes has.
    """
    if not per_channel or opset(model) >= PER_CHANNEL_QDQ_OPSET:
        return [(model, per_channel, True), (model, per_channel, False)]
    old = opset(model)
    try:
        upgraded = upgrade_opset(model, PER_CHANNEL_QDQ_OPSET)
        _same_outputs(model, upgraded, sample)
    except Exception as e:
        report["per_channel"] = False
        report["notes"].append(f"per-tensor scales at opset {old}: per-channel needs opset "
                               f"{PER_CHANNEL_QDQ_OPSET} and ONNX's version converter failed ({_reason(e)[:300]})")
        return [(model, False, True), (model, False, False)]
    report["notes"].append(f"opset {old} converted to {PER_CHANNEL_QDQ_OPSET} for per-channel scales")
    report["opset"] = {"original": old, "quantized": PER_CHANNEL_QDQ_OPSET}
    return [(upgraded, True, True), (upgraded, True, False), (model, False, True), (model, False, False)]


def _quantize(path: Path, dst: Path, ctx: StepContext, options: Int8Options, per_channel: bool, fixed: int | None,
              overrides: dict[str, list[dict]] | None, report: dict) -> list[str] | None:
    """One ORT quantizer call from ``path`` to ``dst``; returns the op types asked for."""
    from onnxruntime.quantization import (
        CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static,
    )

    model = onnx.load_model(str(path), load_external_data=False)
    reduce = needs_reduce_range() and options.mode != "qat"  # qat exports the 8-bit grid it trained on
    report["reduce_range"] = reduce
    if options.mode == "dynamic":
        ops = options.op_types or DYNAMIC_DEFAULT_OPS
        note = ("Conv left in float32: dynamic ConvInteger is slower than float on CPU; use mode: static for "
                "convolutions")
        if "Conv" not in ops and any(n.op_type == "Conv" for n in model.graph.node) and note not in report["notes"]:
            report["notes"].append(note)
        quantize_dynamic(str(path), str(dst), op_types_to_quantize=ops, per_channel=per_channel, reduce_range=reduce,
                         weight_type=QuantType.QInt8, nodes_to_exclude=options.exclude_nodes or None)
        return ops
    assert ctx.data is not None  # checked by the caller
    samples = min(int(options.calibration_samples or 256), ctx.data.train.samples)
    reader = CalibrationReader(ctx.data.train, samples, 16, fixed)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[options.calibration or "minmax"]
    ctx.progress("quantizing", 0.2, f"calibrating ({options.calibration}) on {samples} samples")
    ops = options.op_types or _static_default_ops(model)
    extra: dict = {"WeightSymmetric": True, "ActivationSymmetric": False}
    if overrides:
        extra["TensorQuantOverrides"] = overrides
    quantize_static(str(path), str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=ops,
                    per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    reduce_range=reduce, nodes_to_exclude=options.exclude_nodes or None, calibrate_method=method,
                    extra_options=extra)
    report.update(calibration=options.calibration, calibration_samples=samples, activation_type="uint8 (asymmetric)",
                  format="QDQ")
    return ops


def _check_runs(path: Path, sample: dict[str, np.ndarray] | None) -> None:
    """Load ``path`` in ONNX Runtime and run it on ``sample``: an INVALID_GRAPH is caught here, not later."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if sample is not None:
        sess.run(None, sample)


def _same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, sample: dict[str, np.ndarray] | None) -> None:
    """Raise unless ``b`` loads in ONNX Runtime and (given a sample) computes what ``a`` does."""
    import onnxruntime as ort

    sb = ort.InferenceSession(b.SerializeToString(), providers=["CPUExecutionProvider"])
    if sample is None:
        return
    sa = ort.InferenceSession(a.SerializeToString(), providers=["CPUExecutionProvider"])
    for x, y in zip(sa.run(None, sample), sb.run(None, sample), strict=True):
        if x.shape != y.shape or not np.allclose(x, y, rtol=1e-3, atol=1e-5 * (1 + float(np.abs(x).max(initial=0)))):
            raise ValueError("the converted graph computes something else")


# ORT names the failing node in its graph errors, or the op it has no kernel for
_NODE_OP = re.compile(r'In Node, \("[^"]*", (\w+),|implementation for (\w+)\(|for operator (\w+)')


def _reason(e: Exception) -> str:
    """An error in one short line, with server paths reduced to file names."""
    return scrub_paths(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def _quantizer_error(failures: list[str]) -> CompressionError:
    """What the user is told when no road quantized the model: the op when ORT named one, never a raw trace."""
    ops = sorted({g for f in failures for m in _NODE_OP.finditer(f) for g in m.groups() if g})
    if ops:
        return UnsupportedOp(f"ONNX Runtime's quantizer cannot quantize this model's {', '.join(ops)} "
                             f"({failures[-1][:300]})", ops)
    return CompressionError(f"ONNX Runtime quantization failed: {failures[-1][:300]}")


# Transformers: quantizing Softmax/Add/Mul/Where activations statically wrecks them (measured on
# all-MiniLM-L6-v2: mean sentence cosine 0.38 with every op, 0.94 with weight ops only), so the static
# default for them quantizes weight-carrying ops only; other graphs get ORT's full default list.
_STATIC_WEIGHT_OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul", "Gather"]


def _static_default_ops(model: onnx.ModelProto) -> list[str] | None:
    """Static QDQ op types: every ORT default for CNNs; weight ops (+ embeddings) for transformers."""
    ops = {n.op_type for n in model.graph.node}
    if ops & {"Softmax", "LayerNormalization", "Attention", "Gelu", "Erf"}:
        return _STATIC_WEIGHT_OPS
    return None


def _quantized_gathers(model: onnx.ModelProto) -> int:
    """Embedding lookups whose table is int8 (Gather fed by DequantizeLinear, or quantized Gather)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    int8 = {t.name for t in model.graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    count = 0
    for n in model.graph.node:
        if n.op_type != "Gather":
            continue
        src = producer.get(n.input[0])
        if n.input[0] in int8 or (src is not None and src.op_type == "DequantizeLinear" and src.input[0] in int8):
            count += 1  # dynamic: Gather reads the int8 table; static: Gather reads DequantizeLinear(table)
    return count
