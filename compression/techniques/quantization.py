"""Quantization: one ``quantize`` technique, five schemes.

- ``int8`` with ``mode: dynamic | static | qat`` — ONNX Runtime's quantizer (QDQ for static/qat).
  Defaults favour accuracy and real speed on CPU: per-channel symmetric int8 weights, uint8 activations
  (ORT's U8S8 kernels), no dynamic quantization of Conv (ConvInteger is 4–10× slower than fp32 on CPU:
  static QDQ is the road for convolutions), and embedding tables (``Gather`` data) quantized too — half
  of a small transformer's bytes are its word embeddings.
- ``fp16`` — weights and compute in float16 where ONNX Runtime's CPU kernels exist (ops without one
  stay float32 behind Casts), inputs/outputs float32 with ``keep_io_types``.
- ``cluster`` — per-layer k-means weight sharing (Deep Compression), stored as packed indices + codebook.
- ``binary`` / ``ternary`` — BinaryConnect / TWN training with a straight-through estimator, per-channel α,
  stored as 1-/2-bit packed codes.

Options that do not apply to the chosen scheme are refused at submit time; the settings used (defaults
filled in) are in the step's report.
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
from pydantic import Field, ValidationInfo, field_validator, model_validator

from compression.context import StepContext, StepResult
from compression.data import Arrays
from compression.errors import CompressionError, InvalidSpec
from compression.registry import register_technique
from compression.spec import FinetuneSpec, StrictModel

DYNAMIC_DEFAULT_OPS = ["MatMul", "Gather", "Attention", "LSTM", "EmbedLayerNormalization"]
SCHEMES = ("int8", "fp16", "cluster", "binary", "ternary")

# option -> the schemes it applies to (anything else set is refused with this table's answer)
_APPLIES: dict[str, tuple[str, ...]] = {
    "mode": ("int8",),
    "calibration": ("int8",),
    "calibration_samples": ("int8",),
    "per_channel": ("int8",),
    "op_types": ("int8",),
    "exclude_nodes": ("int8", "fp16"),
    "keep_io_types": ("fp16",),
    "bits": ("cluster",),
    "finetune": ("int8", "cluster", "binary", "ternary"),
    "threshold": ("ternary",),
    "layers": ("cluster", "binary", "ternary"),
    "exclude_layers": ("cluster", "binary", "ternary"),
}
# defaults filled in per scheme (accuracy first)
QAT_FINETUNE = FinetuneSpec(epochs=2, lr=1e-4)
LOWBIT_FINETUNE = FinetuneSpec(epochs=6, lr=1e-3)


class QuantizeSpec(StrictModel):
    method: Literal["quantize"] = "quantize"
    scheme: Literal["int8", "fp16", "cluster", "binary", "ternary"] = "int8"
    mode: Literal["dynamic", "static", "qat"] | None = Field(
        None, description="int8 only (default static): static = QDQ calibrated on the dataset; dynamic = "
        "weights only, activation scales at run time; qat = fake-quant training, then QDQ")
    calibration: Literal["minmax", "entropy", "percentile"] | None = Field(
        None, description="int8 static/qat (default minmax)")
    calibration_samples: int | None = Field(None, ge=1, le=100_000, description="int8 static/qat (default 256)")
    per_channel: bool | None = Field(None, description="int8: per-output-channel weight scales (default true)")
    op_types: list[str] | None = Field(None, max_length=200, description="int8: op types to quantize")
    exclude_nodes: list[str] = Field(default_factory=list, max_length=10_000,
                                     description="int8/fp16: node names left in float32")
    keep_io_types: bool | None = Field(None, description="fp16: keep float32 inputs/outputs (default true)")
    bits: int | None = Field(None, ge=1, le=8, description="cluster: at most 2**bits shared values per layer (default 5)")
    finetune: FinetuneSpec | None = Field(
        None, description="training: int8 qat (default 2 epochs, lr 1e-4), cluster centroid fine-tuning "
        "(default none), binary/ternary STE training (default 6 epochs, lr 1e-3)")
    threshold: float | None = Field(None, gt=0, le=1.5, description="ternary: Δ = threshold·mean|W| (default 0.7)")
    layers: list[str] | None = Field(None, max_length=10_000,
                                     description="cluster/binary/ternary: only these layers (weight or node names)")
    exclude_layers: list[str] = Field(default_factory=list, max_length=10_000,
                                      description="cluster/binary/ternary: layers left in float32")

    @field_validator(*_APPLIES)
    @classmethod
    def _applies(cls, value, info: ValidationInfo):  # noqa: ANN001, ANN206
        """Refuse an option the chosen scheme (or int8 mode) does not use, at that option's JSON path."""
        scheme, mode = info.data.get("scheme"), info.data.get("mode")
        if value in (None, []) or scheme is None:
            return value
        schemes = _APPLIES[info.field_name]
        if scheme not in schemes:
            raise ValueError(f"'{info.field_name}' does not apply to scheme '{scheme}' "
                             f"(it applies to: {', '.join(schemes)})")
        if scheme == "int8" and info.field_name in ("calibration", "calibration_samples") and mode == "dynamic":
            raise ValueError(f"'{info.field_name}' applies to int8 modes static and qat, not dynamic")
        if scheme == "int8" and info.field_name == "finetune" and mode != "qat":
            raise ValueError("'finetune' applies to int8 mode 'qat' only")
        return value

    @model_validator(mode="after")
    def _defaults(self) -> "QuantizeSpec":
        """Fill the scheme's defaults, so the stored spec and the report say what ran."""
        if self.scheme == "int8":
            self.mode = self.mode or "static"
            if self.mode != "dynamic":
                self.calibration = self.calibration or "minmax"
                self.calibration_samples = self.calibration_samples or 256
            if self.mode == "qat" and self.finetune is None:
                self.finetune = QAT_FINETUNE.model_copy()
            if self.per_channel is None:
                self.per_channel = True
        elif self.scheme == "fp16":
            if self.keep_io_types is None:
                self.keep_io_types = True
        elif self.scheme == "cluster":
            self.bits = self.bits or 5
        else:
            if self.finetune is None:
                self.finetune = LOWBIT_FINETUNE.model_copy()
            if self.scheme == "ternary" and self.threshold is None:
                self.threshold = 0.7
        return self

    @property
    def needs_data(self) -> bool:
        if self.scheme == "int8":
            return self.mode in ("static", "qat")
        return self.finetune is not None and self.finetune.epochs > 0

    def settings(self) -> dict:
        """The options that apply to this scheme, defaults filled in (for the report)."""
        out = {"scheme": self.scheme}
        for name, schemes in _APPLIES.items():
            if self.scheme in schemes:
                v = getattr(self, name)
                out[name] = v.model_dump() if hasattr(v, "model_dump") else v
        if self.scheme == "int8" and self.mode == "dynamic":
            out.pop("calibration", None)
            out.pop("calibration_samples", None)
        if self.scheme == "int8" and self.mode != "qat":
            out.pop("finetune", None)
        return out


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
    """Quantize weights (and, for int8 static/qat, activations) so the file really shrinks.

    Args:
        model: float model (earlier steps' zeros are kept by every scheme but binary, which has no zero).
        spec: scheme and its options; see :class:`QuantizeSpec`.
        ctx: the training split feeds calibration and training (the held-out split is never seen).

    Returns:
        StepResult with the quantized model; the report holds the settings used and per-layer facts
        (bits per weight for cluster/binary/ternary).

    Raises:
        InvalidSpec: a scheme that needs data got none; unknown layer names.
        NotTrainable: a training scheme on a graph the converter cannot train.
        CompressionError: ONNX Runtime's quantizer failed.

    Example:
        >>> quantize(model, QuantizeSpec(scheme="cluster", bits=4), ctx).report["layers"][0]["centroids"]  # doctest: +SKIP
        16
    """
    if spec.scheme == "int8":
        if spec.mode == "qat":
            from compression.quant.qat import qat

            result = qat(model, spec, ctx)
        else:
            result = int8_ort(model, spec, ctx)
    elif spec.scheme == "fp16":
        from compression.quant.fp16 import to_fp16

        result = to_fp16(model, spec, ctx)
    elif spec.scheme == "cluster":
        from compression.quant.cluster import cluster

        result = cluster(model, spec, ctx)
    else:
        from compression.quant.lowbit import lowbit

        result = lowbit(model, spec, ctx)
    result.report = {"settings": spec.settings(), **result.report}
    ctx.progress("quantizing", 1.0, "done")
    return result


def int8_ort(model: onnx.ModelProto, spec: QuantizeSpec, ctx: StepContext, *,
             overrides: dict[str, list[dict]] | None = None) -> StepResult:
    """int8 with ONNX Runtime: ``dynamic`` (MatMulInteger, weights only) or QDQ ``static``/``qat`` export.

    ``overrides`` are ORT ``TensorQuantOverrides`` (QAT passes its learned activation ranges).
    """
    from onnxruntime.quantization import (
        CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    work = Path(tempfile.mkdtemp(prefix="quant-", dir=ctx.workdir))
    report: dict = {"mode": spec.mode, "per_channel": spec.per_channel, "weight_type": "int8 (symmetric)", "notes": []}
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
                quantize_dynamic(str(prepared), str(dst), op_types_to_quantize=ops, per_channel=bool(spec.per_channel),
                                 weight_type=QuantType.QInt8, nodes_to_exclude=spec.exclude_nodes or None)
                report["op_types"] = ops
            else:
                if ctx.data is None:
                    raise InvalidSpec(f"int8 {spec.mode} needs a dataset for calibration (or use mode: dynamic)",
                                      [{"loc": ["mode"], "msg": f"{spec.mode} needs a dataset"}])
                fixed = _fixed_batch(model)
                samples = min(int(spec.calibration_samples or 256), ctx.data.train.samples)
                reader = _Reader(ctx.data.train, samples, 16, fixed)
                method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                          "percentile": CalibrationMethod.Percentile}[spec.calibration or "minmax"]
                ctx.progress("quantizing", 0.2, f"calibrating ({spec.calibration}) on {samples} samples")
                ops = spec.op_types or _static_default_ops(model)
                extra = {"WeightSymmetric": True, "ActivationSymmetric": False}
                if overrides:
                    extra["TensorQuantOverrides"] = overrides
                quantize_static(str(prepared), str(dst), reader, quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=ops, per_channel=bool(spec.per_channel),
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                nodes_to_exclude=spec.exclude_nodes or None, calibrate_method=method,
                                extra_options=extra)
                report.update(calibration=spec.calibration, calibration_samples=samples, op_types=ops,
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
    inits = {t.name for t in model.graph.initializer}
    for i in model.graph.input:
        if i.name in inits:
            continue
        dims = i.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return dims[0].dim_value
    return None
