"""``scheme: int8, mode: qat`` — quantization-aware training, exported as ONNX Runtime QDQ.

1. ORT's pre-processing (BatchNorm folded into Conv, constants folded) runs first, so training sees
   the same weights ORT will quantize.
2. The graph becomes a torch module; every Conv/Gemm/MatMul weight computes through a per-channel
   symmetric int8 fake-quant (scale = max|W|/127, ORT's formula) and every such layer's input through
   an asymmetric uint8 fake-quant with a moving-average range; gradients pass straight through.
3. After training the weights written back *are* on the int8 grid, so ORT's static quantizer
   reproduces them exactly; the learned activation ranges are handed to it as ``TensorQuantOverrides``
   for those inputs, the rest is calibrated on the training split as in ``mode: static``.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch.nn.utils import parametrize

from compression.context import StepContext, StepResult
from compression.errors import InvalidSpec
from compression.spec import FinetuneSpec
from compression.techniques.quantization.fake_quant import ActivationFakeQuant, FakeQuantWeight
from compression.techniques.quantization.int8 import Int8Options, pre_process, quantize_int8
from compression.techniques.quantization.layers import weight_layers
from compression.techniques.quantization.trainable import WHY, latent, trainable_layers
from compression.training import finetune_onnx


def _prepared(model: onnx.ModelProto, workdir: Path) -> tuple[onnx.ModelProto, str]:
    """``model`` after ORT's pre-processing (or as it was, when that fails), and the pre-processing status."""
    work = Path(tempfile.mkdtemp(prefix="qat-", dir=workdir))
    src, dst = work / "float.onnx", work / "prepared.onnx"
    onnx.save_model(model, str(src))
    status = pre_process(src, dst)
    return (onnx.load_model(str(dst)) if status == "ok" else model), status


def qat(model: onnx.ModelProto, ctx: StepContext, *, options: Int8Options, training: FinetuneSpec) -> StepResult:
    """Fake-quant training, then QDQ export with the trained weights on the int8 grid.

    Args:
        options: the int8 export's options (``per_channel`` also shapes the weights' fake-quant).
        training: the QAT fine-tuning.
    """
    if ctx.data is None:
        raise InvalidSpec("int8 qat trains on a dataset", [{"loc": ["mode"], "msg": "qat needs a dataset"}])
    prepared, pre = _prepared(model, ctx.workdir)
    layers = weight_layers(prepared)
    tr = trainable_layers(prepared, layers)
    if not tr.layers:
        raise InvalidSpec("no trainable Conv/Gemm/MatMul weights: nothing for QAT to train")
    observers: dict[str, ActivationFakeQuant] = {}
    hooks = []
    masks = {w: (layer.weight.detach() != 0).to(layer.weight.dtype) for w, layer in tr.layers.items()
             if bool((layer.weight == 0).any())}  # an earlier step's pruned zeros stay zero
    for w, layer in tr.layers.items():
        cd = tr.channel_dim(w)
        parametrize.register_parametrization(layer, "weight", FakeQuantWeight(cd if options.per_channel else None))
        obs = ActivationFakeQuant()
        layer.add_module("nc_input_fake_quant", obs)
        hooks.append(layer.register_forward_pre_hook(lambda mod, args, obs=obs: (obs(args[0]), *args[1:])))
        observers[w] = obs
    ctx.progress("finetuning", 0.05, f"QAT on {len(tr.layers)} layers")
    def keep_zeros() -> None:
        with torch.no_grad():
            for w, m in masks.items():
                latent(tr.layers[w]).mul_(m.to(latent(tr.layers[w]).device))

    done = finetune_onnx(prepared, training, ctx, why=WHY, module=tr.module, after_step=keep_zeros if masks else None,
                         span=(0.1, 0.8))
    for h in hooks:
        h.remove()
    trained, losses, notes = done.model, done.losses, done.notes
    # Learned input ranges of each weight layer, by ONNX tensor name.
    by_weight = {wl.weight: wl for wl in layers}
    nodes = {n.name: n for n in prepared.graph.node}
    overrides: dict[str, list[dict]] = {}
    for w, obs in observers.items():
        node = nodes.get(by_weight[w].node)
        if node is not None and bool(obs.seen) and node.input[0] not in overrides:
            overrides[node.input[0]] = [{"rmin": np.float32(obs.lo), "rmax": np.float32(obs.hi)}]
    result = quantize_int8(trained, ctx, options=options, overrides=overrides or None)
    result.report.update(
        qat={"layers": len(tr.layers), "layers_with_pruned_zeros_kept": len(masks), "untrainable": tr.untrainable, "losses": losses, "pre_process": pre,
             "activation_ranges_from_training": len(overrides),
             "weights_on_grid_max_error": _grid_error(trained, result.model, [wl.weight for wl in layers])},
    )
    result.report.setdefault("notes", []).extend(notes)
    return result


def _grid_error(trained: onnx.ModelProto, quantized: onnx.ModelProto, weights: list[str]) -> float | None:
    """Largest |dequantized ORT weight − trained weight|: ~0 when the export kept the QAT grid."""
    tw = {t.name: numpy_helper.to_array(t) for t in trained.graph.initializer if t.name in weights}
    qi = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    worst = None
    for n in quantized.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in qi:
            continue
        base = n.input[0].removesuffix("_quantized")
        if base not in tw:
            continue
        q = qi[n.input[0]].astype(np.float64)
        s = qi[n.input[1]].astype(np.float64)
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if s.ndim == 1 and q.ndim > 1:
            shape = [1] * q.ndim
            shape[axis] = -1
            s = s.reshape(shape)
        err = float(np.abs(q * s - tw[base]).max())
        worst = err if worst is None else max(worst, err)
    return worst
