"""``scheme: int8`` with ONNX Runtime's quantizer: ``dynamic`` (MatMulInteger, weights only) or QDQ ``static``
(calibrated on the training split); ``mode: qat`` trains first (:mod:`.qat`) and exports through here.

Defaults favour accuracy and real speed on CPU: per-channel symmetric int8 weights, uint8 activations
(ORT's U8S8 kernels), no dynamic quantization of Conv (ConvInteger is 4–10× slower than fp32 on CPU:
static QDQ is the road for convolutions), and embedding tables (``Gather`` data) quantized too — half
of a small transformer's bytes are its word embeddings.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compression.context import StepContext, StepResult
from compression.data import Arrays
from compression.errors import CompressionError, InvalidSpec

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

    Args:
        model: float model.
        ctx: the training split calibrates static/qat; ``workdir`` holds ORT's files.
        options: mode, calibration and op selection (see :class:`Int8Options`).
        overrides: ORT ``TensorQuantOverrides`` (QAT passes its learned activation ranges).

    Returns:
        StepResult with the quantized model; the report counts quantized ops and embedding tables.

    Raises:
        InvalidSpec: static/qat without a dataset.
        CompressionError: ONNX Runtime's quantizer failed.

    Example:
        >>> options = Int8Options(mode="dynamic", per_channel=True)
        >>> quantize_int8(model, ctx, options=options).report["mode"]  # doctest: +SKIP
        'dynamic'
    """
    from onnxruntime.quantization import (
        CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static,
    )

    work = Path(tempfile.mkdtemp(prefix="quant-", dir=ctx.workdir))
    report: dict = {"mode": options.mode, "per_channel": options.per_channel, "weight_type": "int8 (symmetric)",
                    "notes": []}
    src = work / "float.onnx"
    prepared = work / "prepared.onnx"
    dst = work / "quantized.onnx"
    ctx.progress("quantizing", 0.05, "pre-processing")
    if options.mode == "dynamic":
        model, n = gemm_to_matmul(model)
        if n:
            report["notes"].append(f"{n} Gemm rewritten as MatMul+Add (ORT quantizes MatMul, not Gemm, dynamically)")
    onnx.save_model(model, str(src))
    with working_directory(work):
        report["pre_process"] = pre_process(src, prepared)
        if report["pre_process"] != "ok":
            prepared = src
        try:
            if options.mode == "dynamic":
                ops = options.op_types or DYNAMIC_DEFAULT_OPS
                if "Conv" not in ops and any(n.op_type == "Conv" for n in model.graph.node):
                    report["notes"].append("Conv left in float32: dynamic ConvInteger is slower than float on "
                                           "CPU; use mode: static for convolutions")
                quantize_dynamic(str(prepared), str(dst), op_types_to_quantize=ops,
                                 per_channel=bool(options.per_channel), weight_type=QuantType.QInt8, nodes_to_exclude=options.exclude_nodes or None)
                report["op_types"] = ops
            else:
                if ctx.data is None:
                    raise InvalidSpec(f"int8 {options.mode} needs a dataset for calibration (or use mode: dynamic)",
                                      [{"loc": ["mode"], "msg": f"{options.mode} needs a dataset"}])
                fixed = _fixed_batch(model)
                samples = min(int(options.calibration_samples or 256), ctx.data.train.samples)
                reader = CalibrationReader(ctx.data.train, samples, 16, fixed)
                method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                          "percentile": CalibrationMethod.Percentile}[options.calibration or "minmax"]
                ctx.progress("quantizing", 0.2, f"calibrating ({options.calibration}) on {samples} samples")
                ops = options.op_types or _static_default_ops(model)
                extra = {"WeightSymmetric": True, "ActivationSymmetric": False}
                if overrides:
                    extra["TensorQuantOverrides"] = overrides
                quantize_static(str(prepared), str(dst), reader, quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=ops, per_channel=bool(options.per_channel),
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                nodes_to_exclude=options.exclude_nodes or None, calibrate_method=method,
                                extra_options=extra)
                report.update(calibration=options.calibration, calibration_samples=samples, op_types=ops,
                              activation_type="uint8 (asymmetric)", format="QDQ")
        except CompressionError:
            raise
        except Exception as e:
            raise CompressionError(f"ONNX Runtime quantization failed: {type(e).__name__}: {e}") from None
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


def _fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size a graph input fixes (calibration batches must match it), or None when it is free."""
    inits = {t.name for t in model.graph.initializer}
    for i in model.graph.input:
        if i.name in inits:
            continue
        dims = i.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return dims[0].dim_value
    return None
