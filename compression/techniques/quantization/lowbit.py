"""``scheme: binary | ternary`` — BinaryConnect / TWN weights trained with a straight-through estimator.

Each selected layer computes with ``α·sign(W)`` (binary) or ``α·sign(W)·[|W| > Δ]`` (ternary), α per
output channel; the latent float weights train and are clipped to their starting per-channel range.
Exported weights take only the values {−α, +α} / {−α, 0, +α}, stored as 1-/2-bit packed codes plus α:
16–32× smaller than float32 on those layers. Activations stay float (weights-only, as in BinaryConnect).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch.nn.utils import parametrize

from compression.context import StepContext, StepResult
from compression.errors import CompressionError, InvalidSpec
from compression.spec import FinetuneSpec
from compression.techniques.quantization.fake_quant import SignWeight
from compression.techniques.quantization.layers import broadcast_shape, channel_view, select_layers, weight_layers
from compression.techniques.quantization.packing import encode_weight
from compression.techniques.quantization.trainable import WHY, latent, trainable_layers
from compression.training import finetune_onnx


def lowbit(model: onnx.ModelProto, ctx: StepContext, *, kind: Literal["binary", "ternary"], threshold: float | None,
           layers: list[str] | None, exclude_layers: list[str], training: FinetuneSpec) -> StepResult:
    """Binarize / ternarize the selected layers with STE training, then pack them.

    Args:
        kind: binary (±α) or ternary ({−α, 0, +α}).
        threshold: ternary: Δ = threshold·mean|W| (None: 0.7).
        layers, exclude_layers: weight or node names to quantize / to leave float32 (None: every layer).
        training: the STE training.
    """
    all_layers = weight_layers(model)
    chosen = select_layers(all_layers, layers, exclude_layers)
    if not chosen:
        raise InvalidSpec(f"no Conv/Gemm/MatMul weights held as initializers: nothing to make {kind}")
    tr = trainable_layers(model, chosen)
    notes: list[str] = []
    if tr.untrainable:
        notes.append(f"left in float32 (not held by a trainable layer): {tr.untrainable}")
    bounds: dict[str, torch.Tensor] = {}
    lost_zeros = 0
    for w, layer in tr.layers.items():
        cd = tr.channel_dim(w)
        weight = layer.weight.detach()
        zeros = weight == 0
        mask = (~zeros).to(weight.dtype) if kind == "ternary" and bool(zeros.any()) else None
        if kind == "binary":
            lost_zeros += int(zeros.sum())
        dims = tuple(d for d in range(weight.dim()) if d != cd)
        bounds[w] = weight.abs().amax(dims, keepdim=True)
        parametrize.register_parametrization(layer, "weight", SignWeight(kind, cd, threshold or 0.7, mask))
    if lost_zeros:
        notes.append(f"binary weights have no zero: {lost_zeros} pruned weights became ±α (ternary keeps them)")

    def clip() -> None:  # BinaryConnect: latent weights stay in their range, so STE gradients stay live
        with torch.no_grad():
            for w, layer in tr.layers.items():
                lat = latent(layer)
                b = bounds[w].to(lat.device)
                lat.copy_(torch.maximum(torch.minimum(lat, b), -b))

    done = finetune_onnx(model, training, ctx, why=WHY, module=tr.module, after_step=clip, span=(0.1, 0.8))
    losses, out = done.losses, done.model
    notes += done.notes
    arrays = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    by_weight = {wl.weight: wl for wl in chosen}
    rows = []
    for w in tr.layers:
        wl = by_weight[w]
        arr = arrays[w]
        alpha = channel_view(np.abs(arr), wl.axis).max(1)
        a_b = alpha.reshape(broadcast_shape(arr.shape, wl.axis)).astype(arr.dtype)
        if kind == "binary":
            codes = (arr > 0).astype(np.uint8)
            width, offset, scale, zero_code = 1, 0.5, (2 * a_b).astype(arr.dtype), None
        else:
            codes = (np.sign(arr) + 1).astype(np.uint8)
            width, offset, scale, zero_code = 2, 1.0, a_b, 1
        decoded = (codes.astype(arr.dtype) - arr.dtype.type(offset)) * scale
        if not np.array_equal(decoded, arr):
            raise CompressionError(f"{w}: trained {kind} weights do not take the values ±α per channel")
        enc = encode_weight(out, w, codes, width, scale=scale, offset=offset, zero_code=zero_code)
        levels = np.unique(arr)
        rows.append({"layer": wl.node, "weight": w, "params": wl.size, "channels": int(alpha.size),
                     "values_per_channel": 2 if kind == "binary" else 3, "distinct_values": int(levels.size),
                     "stored_bits": width, "bits_per_weight": round(enc.stored_bytes * 8 / wl.size, 4),
                     "sparsity": round(float((arr == 0).mean()), 4),
                     "alpha_mean": float(alpha.mean())})
    onnx.checker.check_model(out)
    total = sum(r["params"] for r in rows)
    report = {
        "layers": rows,
        "quantized_params": total,
        "bits_per_weight": round(sum(r["bits_per_weight"] * r["params"] for r in rows) / max(total, 1), 4),
        "layers_left_float": [x.node for x in all_layers if x.weight not in tr.layers],
        "storage": f"{1 if kind == 'binary' else 2}-bit codes packed in uint8 -> BitShift unpack -> "
                   "(code - offset) * per-channel scale",
        "ste": "identity gradient to latent float weights, clipped to their initial per-channel range",
        "finetune_losses": losses,
        "notes": notes,
    }
    return StepResult(out, report)
