"""Quantization: one ``quantize`` technique, six schemes.

- ``int8`` with ``mode: dynamic | static | qat`` — ONNX Runtime's quantizer (QDQ for static/qat).
  Defaults favour accuracy and real speed on CPU: per-channel symmetric int8 weights, uint8 activations
  (ORT's U8S8 kernels), no dynamic quantization of Conv (ConvInteger is 4–10× slower than fp32 on CPU:
  static QDQ is the road for convolutions), and embedding tables (``Gather`` data) quantized too — half
  of a small transformer's bytes are its word embeddings.
- ``int4`` (and ``int8`` with ``mode: weight_only``) — blockwise weight-only quantization of MatMul weights
  and embedding tables with ONNX Runtime (``MatMulNBits``/``GatherBlockQuantized``, or blocked
  ``DequantizeLinear``): the road for transformers and language models, whose bytes are in MatMuls.
- ``fp16`` — weights and compute in float16 where ONNX Runtime's CPU kernels exist (ops without one
  stay float32 behind Casts), inputs/outputs float32 with ``keep_io_types``.
- ``cluster`` — per-layer k-means weight sharing (Deep Compression), stored as packed indices + codebook.
- ``binary`` / ``ternary`` — BinaryConnect / TWN training with a straight-through estimator, per-channel α,
  stored as 1-/2-bit packed codes.

Options that do not apply to the chosen scheme are refused at submit time; the settings used (defaults
filled in) are in the step's report.

This module holds the spec and picks the engine; beside it:

- ``int8``: ONNX Runtime's quantizer (dynamic, static QDQ, calibration) and its pre-processing.
- ``weight_only``: int4/int8 blockwise weight-only quantization (rtn, hqq, gptq) with ONNX Runtime.
- ``qat``: int8 quantization-aware training, exported through ``int8``.
- ``fp16``: ONNX Runtime's float16 converter, with the ops it cannot run kept float32.
- ``cluster``: k-means weight sharing (``kmeans``: 1-D k-means with a fixed zero centroid).
- ``lowbit``: binary / ternary weights.
- ``fake_quant``: torch parametrizations (cluster, sign, int8 fake-quant) and activation fake-quant.
- ``trainable``: the ONNX → torch round trip shared by the training-based schemes.
- ``layers``: which initializers are layer weights, and their output-channel axis.
- ``packing``: low-bit codes packed into bytes and decoded in-graph (``BitShift`` → ``Gather``/affine).

The engines that train import torch; they are imported when their scheme runs, so validating a spec
(the API does, for every submit) stays light.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import onnx
from pydantic import Field, ValidationInfo, field_validator, model_validator

from compression.context import StepContext, StepResult
from compression.registry import register_technique
from compression.spec import FinetuneSpec
from compression.step_spec import ModelFacts, Passes, StepCheck, StepSpec
from compression.techniques.quantization.int8 import Int8Options, quantize_int8

# defaults filled in per scheme (accuracy first)
QAT_FINETUNE = FinetuneSpec(epochs=2, lr=1e-4)
LOWBIT_FINETUNE = FinetuneSpec(epochs=6, lr=1e-3)
# what ``search: auto`` tries for a step left int8 or cluster (fp16, binary and ternary are kept as chosen)
AUTO_GRID: dict[str, list[Any]] = {"scheme": ["int8", "cluster"], "bits": [4, 5, 6]}
# what it tries for an int4 step: 128 halves the scales but pads every K under 128 (measured on the testkit GPT,
# dim 64: larger and no more faithful); the data-free algorithms (gptq needs a dataset, which would make every
# candidate need one, and measured no better); the LM head at 8 bits or at 4
INT4_AUTO_GRID: dict[str, list[Any]] = {"block_size": [32, 128], "algorithm": ["rtn", "hqq"],
                                        "keep_8bit": ["lm_head", []]}
# the weight-only options (int4, int8 mode weight_only) and the int8 quantizer's own (not weight_only)
WEIGHT_ONLY_OPTIONS = frozenset({"algorithm", "block_size", "symmetric", "accuracy_level", "embeddings", "embedding_bits",
                                 "keep_8bit", "format"})
INT8_QUANTIZER_OPTIONS = frozenset({"calibration", "calibration_samples", "per_channel", "op_types", "exclude_nodes",
                                    "finetune"})


class QuantizeSpec(StepSpec):
    """Scheme and its options; options of another scheme are refused at their JSON path."""

    # option -> the schemes it applies to (anything else set is refused with this table's answer); a search
    # that changes a step's scheme reads it too, to drop the options the new scheme does not take
    OPTION_SCHEMES: ClassVar[dict[str, tuple[str, ...]]] = {
        "mode": ("int8",),
        "calibration": ("int8",),
        "calibration_samples": ("int8",),
        "per_channel": ("int8",),
        "op_types": ("int8",),
        "exclude_nodes": ("int8", "fp16"),
        "keep_io_types": ("fp16",),
        "bits": ("cluster",),
        "layer_bits": ("cluster",),
        "finetune": ("int8", "cluster", "binary", "ternary"),
        "threshold": ("ternary",),
        "layers": ("cluster", "binary", "ternary", "int4", "int8"),
        "exclude_layers": ("cluster", "binary", "ternary", "int4", "int8"),
        "algorithm": ("int4", "int8"),
        "block_size": ("int4", "int8"),
        "symmetric": ("int4", "int8"),
        "accuracy_level": ("int4", "int8"),
        "embeddings": ("int4", "int8"),
        "embedding_bits": ("int4",),
        "keep_8bit": ("int4",),
        "format": ("int4", "int8"),
    }

    method: Literal["quantize"] = "quantize"
    scheme: Literal["int8", "int4", "fp16", "cluster", "binary", "ternary"] = "int8"
    mode: Literal["dynamic", "static", "qat", "weight_only"] | None = Field(
        None, description="int8 only (default static): static = QDQ calibrated on the dataset; dynamic = "
        "weights only, activation scales at run time; qat = fake-quant training, then QDQ; weight_only = blockwise "
        "8-bit weights (MatMulNBits), activations float, as scheme int4 but at 8 bits")
    calibration: Literal["minmax", "entropy", "percentile"] | None = Field(
        None, description="int8 static/qat (default minmax)")
    calibration_samples: int | None = Field(None, ge=1, le=100_000, description="int8 static/qat (default 256)")
    per_channel: bool | None = Field(None, description="int8: per-output-channel weight scales (default true)")
    op_types: list[str] | None = Field(None, max_length=200, description="int8: op types to quantize")
    exclude_nodes: list[str] = Field(default_factory=list, max_length=10_000,
                                     description="int8/fp16: node names left in float32")
    keep_io_types: bool | None = Field(None, description="fp16: keep float32 inputs/outputs (default true)")
    bits: int | None = Field(None, ge=1, le=8, description="cluster: at most 2**bits shared values per layer (default 5)")
    layer_bits: dict[str, int] = Field(
        default_factory=dict, max_length=10_000,
        description="cluster: bits for these layers (weight or node name -> 1..8), 'bits' for the rest (Deep "
        "Compression gave conv layers 8 bits and fully connected ones 5; a big, mostly-zero layer often keeps "
        "its accuracy with fewer)")
    finetune: FinetuneSpec | None = Field(
        None, description="training: int8 qat (default 2 epochs, lr 1e-4), cluster centroid fine-tuning "
        "(default none), binary/ternary STE training (default 6 epochs, lr 1e-3)")
    threshold: float | None = Field(None, gt=0, le=1.5, description="ternary: Δ = threshold·mean|W| (default 0.7)")
    layers: list[str] | None = Field(None, max_length=10_000,
                                     description="cluster/binary/ternary/int4/int8 weight_only: only these layers "
                                     "(weight or node names)")
    exclude_layers: list[str] = Field(default_factory=list, max_length=10_000,
                                      description="cluster/binary/ternary/int4/int8 weight_only: layers left in float32")
    algorithm: Literal["rtn", "hqq", "gptq"] | None = Field(
        None, description="int4 (default rtn): rtn = round-to-nearest per block (ONNX Runtime's own); hqq = "
        "half-quadratic quantization, optimised scale and float zero point per block, no data (asymmetric "
        "only); gptq = GPTQ, error-compensating rounding from the dataset's activations (needs a dataset). "
        "rtn is the default because it measured as faithful as hqq and gptq on a small GPT (next-token agreement "
        "0.955 vs 0.955/0.956, 8-bit head, block 32) in the smallest file (hqq's float zero points add 10%); "
        "int8 weight_only: rtn only")
    block_size: int | None = Field(
        None, ge=16, le=256, description="int4/int8 weight_only (default 32, ONNX Runtime's CLI's): weights per "
        "scale along K, a power of two; 128 halves the scales' bytes but pads every K that is not a multiple "
        "(a 64-wide model's layers grow)")
    symmetric: bool | None = Field(None, description="int4/int8 weight_only: symmetric codes, no zero points "
                                   "(default true; hqq is asymmetric only and always runs with false)")
    accuracy_level: int | None = Field(
        None, ge=0, le=4, description="int4/int8 weight_only: MatMulNBits compute type (0 unset = float, the "
        "default; 4 = int8 activations, reported to pick wrong tokens on small language models)")
    embeddings: bool | None = Field(None, description="int4/int8 weight_only: quantize embedding tables "
                                    "(Gather; default true: GatherBlockQuantized at embedding_bits, blocks along "
                                    "the embedding dimension)")
    embedding_bits: Literal[4, 8] | None = Field(
        None, description="int4: bits of the embedding tables (default 8, GatherBlockQuantized either way). On "
        "the benchmark's byte-level GPT, 4-bit tables cost more perplexity than every 4-bit MatMul together "
        "(8.40 vs 8.32 at block 32, float 8.29) for 13% of the file; NNCF keeps tables at 8 bits too. 4 gives "
        "the smallest file where the tables are most of the model (a small encoder's vocabulary)")
    keep_8bit: list[str] | Literal["lm_head"] | None = Field(
        None, description="int4: layers kept at 8 bits (node or weight names); default 'lm_head': the last MatMul "
        "feeding a graph output when it is the widest projection (an int4 head makes a small model repeat "
        "itself); [] turns it off")
    format: Literal["matmulnbits", "qdq"] | None = Field(
        None, description="int4/int8 weight_only (default matmulnbits): matmulnbits = ONNX Runtime's "
        "MatMulNBits/GatherBlockQuantized contrib ops; qdq = standard blocked DequantizeLinear (opset 21, "
        "the model is converted), rtn only")

    @field_validator(*OPTION_SCHEMES)
    @classmethod
    def _applies(cls, value, info: ValidationInfo):
        """Refuse an option the chosen scheme (or int8 mode) does not use, at that option's JSON path."""
        scheme, mode = info.data.get("scheme"), info.data.get("mode")
        if value in (None, [], {}) or scheme is None:
            return value
        schemes = cls.OPTION_SCHEMES[info.field_name]
        if scheme not in schemes:
            raise ValueError(f"'{info.field_name}' does not apply to scheme '{scheme}' "
                             f"(it applies to: {', '.join(schemes)})")
        weight_only_field = info.field_name in WEIGHT_ONLY_OPTIONS or info.field_name in ("layers", "exclude_layers")
        if scheme == "int8" and weight_only_field and mode != "weight_only":
            raise ValueError(f"'{info.field_name}' applies to int8 mode 'weight_only' (or scheme int4), not "
                             f"mode '{mode or 'static'}'")
        if scheme == "int8" and mode == "weight_only" and info.field_name in INT8_QUANTIZER_OPTIONS:
            raise ValueError(f"'{info.field_name}' does not apply to int8 mode 'weight_only'")
        if scheme == "int8" and info.field_name in ("calibration", "calibration_samples") and mode == "dynamic":
            raise ValueError(f"'{info.field_name}' applies to int8 modes static and qat, not dynamic")
        if scheme == "int8" and info.field_name == "finetune" and mode != "qat":
            raise ValueError("'finetune' applies to int8 mode 'qat' only")
        return value

    @field_validator("layer_bits")
    @classmethod
    def _bits_range(cls, value: dict[str, int]) -> dict[str, int]:
        bad = {k: v for k, v in value.items() if not 1 <= v <= 8}
        if bad:
            raise ValueError(f"bits must be in 1..8: {bad}")
        return value

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int | None) -> int | None:
        if value is not None and value & (value - 1):
            raise ValueError(f"block_size must be a power of two (16, 32, 64, 128 or 256), not {value}")
        return value

    @property
    def weight_only(self) -> bool:
        """int4, or int8 mode weight_only: the blockwise weight-only engine."""
        return self.scheme == "int4" or (self.scheme == "int8" and self.mode == "weight_only")

    def _weight_only_defaults(self) -> None:
        """Fill the weight-only defaults and refuse the combinations ONNX Runtime cannot write."""
        self.algorithm = self.algorithm or "rtn"
        if self.scheme == "int8" and self.algorithm != "rtn":
            raise ValueError(f"int8 weight_only supports algorithm rtn only, not {self.algorithm} (ONNX Runtime's "
                             "hqq and gptq write 4-bit weights; use scheme int4)")
        if self.algorithm == "hqq":
            # asymmetric only (a float zero point per block); a stored spec re-parsed with symmetric filled in,
            # or a search switching the algorithm, must still validate: the settings say what ran
            self.symmetric = False
        elif self.symmetric is None:
            self.symmetric = True
        self.format = self.format or "matmulnbits"
        if self.format == "qdq" and self.algorithm != "rtn":
            raise ValueError(f"format qdq is written by algorithm rtn only (ONNX Runtime's {self.algorithm} "
                             "writes MatMulNBits)")
        self.block_size = self.block_size or 32
        if self.embeddings is None:
            self.embeddings = True
        if self.scheme == "int4" and self.embedding_bits is None:
            self.embedding_bits = 8
        if self.scheme == "int4" and self.keep_8bit is None:
            self.keep_8bit = "lm_head"

    @model_validator(mode="after")
    def _defaults(self) -> "QuantizeSpec":
        """Fill the scheme's defaults, so the stored spec and the report say what ran."""
        if self.weight_only:
            self._weight_only_defaults()
        elif self.scheme == "int8":
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
    def trains(self) -> bool:
        """QAT, or a scheme's fine-tune with epochs (binary/ternary STE training, cluster centroids)."""
        return self.mode == "qat" or self.recovery is not None

    @property
    def needs_data(self) -> bool:
        if self.weight_only:
            return self.algorithm == "gptq"  # rtn and hqq are data-free
        if self.scheme == "int8":
            return self.mode in ("static", "qat")
        return self.recovery is not None

    @property
    def handles_large(self) -> bool:
        """Weight-only rtn/hqq in MatMulNBits form acts on tensors in memory and checks its result from files:
        it runs on a model over 2 GiB. The other schemes serialize the whole model (fp16's shape inference,
        the int8 quantizer's save, GPTQ's calibration sessions, qdq's version converter) or train."""
        return self.weight_only and self.format == "matmulnbits" and self.algorithm != "gptq"

    def preflight(self, facts: ModelFacts) -> StepCheck:
        if self.weight_only:
            from compression.techniques.quantization.weight_only import preflight_check

            return preflight_check(facts, bits=4 if self.scheme == "int4" else 8, block_size=self.block_size or 32,
                                   embeddings=bool(self.embeddings), keep_8bit=self.keep_8bit,
                                   embedding_bits=self.embedding_bits or 8)
        return StepCheck.acting_on(facts.quantizable)

    def forward_passes(self, train_n: int) -> Passes:
        if self.weight_only:
            from compression.techniques.quantization.weight_only import GPTQ_SAMPLES

            return Passes(infer=min(GPTQ_SAMPLES, train_n) if self.algorithm == "gptq" else 0)
        return self.recovery_passes(train_n) + Passes(infer=self.calibration_samples or 0)

    @classmethod
    def auto_grid(cls, raw_step: dict[str, Any]) -> dict[str, list[Any]]:
        if raw_step.get("scheme", "int8") == "int4":
            grid = {k: list(v) for k, v in INT4_AUTO_GRID.items()}
            if raw_step.get("format") == "qdq":
                grid["algorithm"] = ["rtn"]  # the one algorithm that writes QDQ
            return grid
        if raw_step.get("scheme", "int8") not in ("int8", "cluster") or raw_step.get("mode") == "weight_only":
            return {}  # the user chose fp16/binary/ternary/int8 weight-only: keep it
        return {k: list(v) for k, v in AUTO_GRID.items()}

    def settings(self) -> dict:
        """The options that apply to this scheme, defaults filled in (for the report)."""
        out = {"scheme": self.scheme}
        for name, schemes in self.OPTION_SCHEMES.items():
            if self.scheme in schemes:
                v = getattr(self, name)
                out[name] = v.model_dump() if hasattr(v, "model_dump") else v
        if self.scheme == "int8" and self.mode == "dynamic":
            out.pop("calibration", None)
            out.pop("calibration_samples", None)
        if self.scheme == "int8" and self.mode != "qat":
            out.pop("finetune", None)
        if self.scheme == "int8" and self.mode == "weight_only":
            for name in INT8_QUANTIZER_OPTIONS:
                out.pop(name, None)
        elif self.scheme == "int8":
            for name in (*WEIGHT_ONLY_OPTIONS, "layers", "exclude_layers"):
                out.pop(name, None)
        return out


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
    if spec.weight_only:
        from compression.techniques.quantization.weight_only import WeightOnlyOptions, quantize_weight_only

        keep = None if spec.keep_8bit in (None, "lm_head") else list(spec.keep_8bit)
        result = quantize_weight_only(model, ctx, options=WeightOnlyOptions(
            bits=4 if spec.scheme == "int4" else 8, algorithm=spec.algorithm or "rtn", block_size=spec.block_size or 32,
            symmetric=bool(spec.symmetric), accuracy_level=spec.accuracy_level, embeddings=bool(spec.embeddings),
            embedding_bits=spec.embedding_bits or 8,
            layers=spec.layers, exclude_layers=spec.exclude_layers, keep_8bit=keep,
            format=spec.format or "matmulnbits"))
    elif spec.scheme == "int8":
        options = Int8Options(mode=spec.mode, per_channel=bool(spec.per_channel), calibration=spec.calibration,
                              calibration_samples=spec.calibration_samples, op_types=spec.op_types,
                              exclude_nodes=spec.exclude_nodes)
        if spec.mode == "qat":
            from compression.techniques.quantization.qat import qat

            result = qat(model, ctx, options=options, training=spec.finetune)
        else:
            result = quantize_int8(model, ctx, options=options)
    elif spec.scheme == "fp16":
        from compression.techniques.quantization.fp16 import to_fp16

        result = to_fp16(model, ctx, keep_io_types=bool(spec.keep_io_types), exclude_nodes=spec.exclude_nodes)
    elif spec.scheme == "cluster":
        from compression.techniques.quantization.cluster import cluster

        result = cluster(model, ctx, bits=spec.bits, layers=spec.layers, exclude_layers=spec.exclude_layers,
                         training=spec.finetune, layer_bits=spec.layer_bits)
    else:
        from compression.techniques.quantization.lowbit import lowbit

        result = lowbit(model, ctx, kind=spec.scheme, threshold=spec.threshold, layers=spec.layers,
                        exclude_layers=spec.exclude_layers, training=spec.finetune)
    result.report = {"settings": spec.settings(), **result.report}
    ctx.progress("quantizing", 1.0, "done")
    return result


