"""``scheme: fp16`` — float16 weights and compute where ONNX Runtime's CPU kernels exist.

Uses ONNX Runtime's own converter (``onnxruntime.transformers.float16``). Ops without a float16 CPU
kernel are found by loading the result in ONNX Runtime and are kept in float32 behind Casts, so the
output always runs; the report lists them.
"""
from __future__ import annotations

import re

import onnx

from compression.context import StepContext, StepResult
from compression.errors import CompressionError
from compression.graph_prep import lift_constants

_MISSING = re.compile(r"Could not find an implementation for (\w+)\(")
# Ops kept in float32 up front: ONNX Runtime 1.32's CPU provider has no float16 kernel for recurrent
# ops, and a session on a CRNN whose LSTM stayed float32 (blocked, or left to the loop below) crashes
# the process (SIGSEGV, measured) instead of raising the "Could not find an implementation" error the
# loop learns from. Keeping the graph's Transposes in float32 with them avoids it (measured: blocking the
# LSTM's own neighbours is not enough; ORT's transpose optimizer moves them across the Casts).
NO_FP16_CPU_KERNEL = ["LSTM", "GRU", "RNN"]


def _kept_float32(model: onnx.ModelProto) -> list[str]:
    """Op types kept in float32 before the first try: recurrent ops and, beside them, Transpose."""
    ops = {n.op_type for n in model.graph.node}
    return sorted(ops & set(NO_FP16_CPU_KERNEL)) + (["Transpose"] if ops & set(NO_FP16_CPU_KERNEL) else [])


def to_fp16(model: onnx.ModelProto, ctx: StepContext, *, keep_io_types: bool, exclude_nodes: list[str]) -> StepResult:
    """Convert to float16; returns the model and which ops stayed float32.

    ``Constant`` nodes holding weights (paddle2onnx writes every weight so) become initializers first.

    Args:
        keep_io_types: graph inputs and outputs stay float32 (Casts at the edges).
        exclude_nodes: node names left in float32.
    """
    import onnxruntime as ort
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model, lifted = lift_constants(model)  # the converter leaves some Constant weights in float32
    kept, blocked = _kept_float32(model), []
    last = ""
    for _ in range(16):
        ctx.progress("quantizing", 0.2, "converting to float16")
        try:
            out = convert_float_to_float16(model, keep_io_types=keep_io_types,
                                           op_block_list=DEFAULT_OP_BLOCK_LIST + kept + blocked,
                                           node_block_list=exclude_nodes or None)
        except Exception as e:
            raise CompressionError(f"float16 conversion failed: {type(e).__name__}: {e}") from None
        try:
            ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
            break
        except Exception as e:
            last = str(e)
            m = _MISSING.search(last)
            if not m or m.group(1) in blocked:
                raise CompressionError(f"the float16 model does not load in ONNX Runtime: {last[:300]}") from None
            blocked.append(m.group(1))
    else:
        raise CompressionError(f"the float16 model does not load in ONNX Runtime: {last[:300]}")
    fallback = _runtime_float32_ops(out, ctx)
    report = {"keep_io_types": keep_io_types, "kept_float32_op_types": kept + blocked,
              "kept_float32_nodes": list(exclude_nodes),
              "casts": sum(1 for n in out.graph.node if n.op_type == "Cast"),
              "runtime_float32_fallback": fallback,
              "notes": ["weights are stored in float16 (half the bytes); ONNX Runtime's CPU provider computes in "
                        "float16 where it has a kernel and inserts Casts to run the other nodes in float32 "
                        "(runtime_float32_fallback counts them by op type), so speed depends on the CPU"]}
    if lifted:
        report["notes"].append(f"{lifted} Constant nodes lifted into initializers (stored in float16 with the weights)")
    return StepResult(out, report)


def _runtime_float32_ops(model: onnx.ModelProto, ctx: StepContext) -> dict[str, int]:
    """Op types ONNX Runtime's CPU provider runs in float32 behind its own inserted Casts, with counts."""
    import tempfile
    from pathlib import Path

    import onnxruntime as ort

    path = Path(tempfile.mkdtemp(prefix="fp16-", dir=ctx.workdir)) / "loaded.onnx"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    loaded = onnx.load_model(str(path))
    upcasts = {n.output[0] for n in loaded.graph.node if n.op_type == "Cast"
               and n.name.startswith("InsertedPrecisionFreeCast")
               and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)}
    counts: dict[str, int] = {}
    for n in loaded.graph.node:
        if n.op_type != "Cast" and any(i in upcasts for i in n.input):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))
