"""Quantization with ONNX Runtime: ``scheme: int8``, ``mode: dynamic | static`` (QDQ, calibrated).

Defaults favour accuracy and real speed on CPU: per-channel symmetric int8 weights, uint8 activations
(ORT's U8S8 kernels), and no dynamic quantization of Conv (ConvInteger is 4–10× slower than fp32 on
CPU: static QDQ is the road for convolutions).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper
from pydantic import Field, model_validator

from compression.context import StepContext, StepResult
from compression.data import Arrays
from compression.errors import CompressionError, InvalidSpec
from compression.registry import register_technique
from compression.spec import StrictModel

DYNAMIC_DEFAULT_OPS = ["MatMul", "Gather", "Attention", "LSTM", "EmbedLayerNormalization"]


class QuantizeSpec(StrictModel):
    method: Literal["quantize"] = "quantize"
    scheme: Literal["int8"] = "int8"
    mode: Literal["dynamic", "static"] = Field(
        "static", description="static: QDQ calibrated on the dataset; dynamic: weights only, activations at run time"
    )
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_samples: int = Field(256, ge=1, le=100_000)
    per_channel: bool = Field(True, description="per-output-channel weight scales (keeps transformers accurate)")
    op_types: list[str] | None = Field(None, description="op types to quantize; default: all that help")
    exclude_nodes: list[str] = Field(default_factory=list, max_length=10_000)

    @model_validator(mode="after")
    def _check(self) -> "QuantizeSpec":
        if self.mode == "dynamic" and self.calibration != "minmax":
            raise ValueError("calibration applies to mode 'static' only")
        return self

    @property
    def needs_data(self) -> bool:
        return self.mode == "static"


@contextlib.contextmanager
def _in_dir(path: Path) -> Iterator[None]:
    """ORT's pre-processing leaves large temp files in the *current* directory on failure: contain it."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


class _Reader:
    """CalibrationDataReader over the training split, in small batches."""

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


@register_technique("quantize", QuantizeSpec, phase="quantizing")
def quantize(model: onnx.ModelProto, spec: QuantizeSpec, ctx: StepContext) -> StepResult:
    """int8 quantization in ONNX Runtime's QDQ format (static) or with dynamic activation scales.

    Args:
        model: float model.
        spec: mode, calibration method and sample count, per_channel, op types.
        ctx: the training split feeds calibration (the held-out split is never seen).

    Returns:
        StepResult with the quantized model and the settings used.

    Example:
        >>> quantize(model, QuantizeSpec(mode="dynamic"), ctx).model  # doctest: +SKIP
    """
    from onnxruntime.quantization import (
        CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    work = Path(tempfile.mkdtemp(prefix="quant-", dir=ctx.workdir))
    report: dict = {"scheme": spec.scheme, "mode": spec.mode, "per_channel": spec.per_channel,
                    "weight_type": "int8 (symmetric)", "notes": []}
    src = work / "float.onnx"
    prepared = work / "prepared.onnx"
    dst = work / "quantized.onnx"
    ctx.progress("quantizing", 0.05, "pre-processing")
    if spec.mode == "dynamic":
        model, n = gemm_to_matmul(model)
        if n:
            report["notes"].append(f"{n} Gemm rewritten as MatMul+Add (ORT quantizes MatMul, not Gemm, dynamically)")
    onnx.save_model(model, str(src))
    with _in_dir(work):
        try:
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
            report["pre_process"] = "ok"
        except Exception as e:  # pre-processing is an optimisation; quantize the raw graph instead
            prepared = src
            report["pre_process"] = f"skipped: {type(e).__name__}"
        try:
            if spec.mode == "dynamic":
                ops = spec.op_types or DYNAMIC_DEFAULT_OPS
                if "Conv" not in ops and any(n.op_type == "Conv" for n in model.graph.node):
                    report["notes"].append("Conv left in float32: dynamic ConvInteger is slower than float on "
                                           "CPU; use mode: static for convolutions")
                quantize_dynamic(str(prepared), str(dst), op_types_to_quantize=ops, per_channel=spec.per_channel,
                                 weight_type=QuantType.QInt8, nodes_to_exclude=spec.exclude_nodes or None)
                report["op_types"] = ops
            else:
                if ctx.data is None:
                    raise InvalidSpec("static int8 needs a dataset for calibration (or use mode: dynamic)",
                                      [{"loc": ["mode"], "msg": "static needs a dataset"}])
                fixed = _fixed_batch(model)
                reader = _Reader(ctx.data.train, spec.calibration_samples, 16, fixed)
                method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                          "percentile": CalibrationMethod.Percentile}[spec.calibration]
                ctx.progress("quantizing", 0.2, f"calibrating ({spec.calibration}) on "
                             f"{min(spec.calibration_samples, ctx.data.train.samples)} samples")
                quantize_static(str(prepared), str(dst), reader, quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=spec.op_types, per_channel=spec.per_channel,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                nodes_to_exclude=spec.exclude_nodes or None, calibrate_method=method,
                                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
                report.update(calibration=spec.calibration,
                              calibration_samples=min(spec.calibration_samples, ctx.data.train.samples),
                              activation_type="uint8 (asymmetric)", format="QDQ")
        except CompressionError:
            raise
        except Exception as e:
            raise CompressionError(f"ONNX Runtime quantization failed: {type(e).__name__}: {e}") from None
    out = onnx.load_model(str(dst))
    counts: dict[str, int] = {}
    for n in out.graph.node:
        if n.op_type in ("DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul"):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    report["quantized_op_counts"] = counts
    if not counts:
        report["notes"].append("nothing was quantized: no supported op found")
    ctx.progress("quantizing", 1.0, "done")
    return StepResult(out, report)


def _fixed_batch(model: onnx.ModelProto) -> int | None:
    inits = {t.name for t in model.graph.initializer}
    for i in model.graph.input:
        if i.name in inits:
            continue
        dims = i.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return dims[0].dim_value
    return None
