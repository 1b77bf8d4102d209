"""What ``lowrank`` and ``depthwise_separable`` measure for their reports: per-layer MACs (held-out accuracy
is :func:`compression.metrics.holdout_accuracy`, as every family's).

Measured on the graph as it really runs (ONNX Runtime), before and after the rewrite; never fails the step
(the pipeline measures the model again anyway).

Example:
    >>> layer_macs(model, probe_sample(model, ctx))["/conv1/Conv"]  # doctest: +SKIP
    112896
"""
from __future__ import annotations

import numpy as np
import onnx

from compression.analysis import measured_shapes, node_macs
from compression.context import StepContext
from compression.techniques.factorization.layers import FACTORABLE_OPS


def probe_sample(model: onnx.ModelProto, ctx: StepContext) -> dict[str, np.ndarray]:
    """One sample (batch 1) to measure per-layer MACs on: the first training input, else synthetic inputs."""
    from compression.data import synthetic_inputs
    from compression.modelio import describe

    if ctx.data is not None:
        return {k: v[:1] for k, v in ctx.data.train.inputs.items()}
    return synthetic_inputs(describe(model)["inputs"], 1, seed=ctx.seed)


def layer_macs(model: onnx.ModelProto, sample: dict[str, np.ndarray]) -> dict[str, int]:
    """Multiply-accumulates per sample of every Conv/Gemm/MatMul node, by node name, from the shapes ONNX
    Runtime actually produces on ``sample`` (batch 1): :func:`compression.analysis.macs`'s counting, split
    per node. Unnamed nodes are keyed ``OpType_index``.

    Raises:
        KeyError: a shape the count needs was not measured.
    """
    shapes = measured_shapes(model, sample)
    return {n.name or f"{n.op_type}_{i}": node_macs(n, shapes)
            for i, n in enumerate(model.graph.node) if n.op_type in FACTORABLE_OPS}


def safe_layer_macs(model: onnx.ModelProto, sample: dict[str, np.ndarray]) -> dict[str, int] | None:
    """Per-node MACs, or None when the model cannot run on the sample (the pipeline measures anyway)."""
    try:
        return layer_macs(model, sample)
    except Exception:
        return None

