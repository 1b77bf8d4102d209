"""Weight (unstructured) pruning: magnitude masks and the iterative prune → fine-tune loop.

Exact zeros stay in the ONNX weights. Dense ONNX Runtime kernels do not skip zeros: it shrinks
``nonzero_params`` and ``zip_bytes``, not latency, and the report says so. Without fine-tuning the
initializers are zeroed in the graph itself (any graph, convertible or not); with it, the graph is
converted to torch, and the masks are re-applied after every optimizer step so pruned weights stay zero.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from compression.context import StepContext, StepResult
from compression.errors import InvalidSpec, NotTrainable
from compression.techniques.pruning.importance import IMPORTANCE, masks_for
from compression.training import Finetune, TrainLog, to_trainable

if TYPE_CHECKING:
    from compression.converter import OnnxModule
    from compression.techniques.pruning import PruneSpec

PRUNABLE_OPS = {"Conv": 1, "Gemm": 1, "MatMul": 1, "ConvTranspose": 1}  # op -> input slot of its weight


def prunable_initializers(model: onnx.ModelProto) -> dict[str, str]:
    """weight initializer name -> node name for Conv/Gemm/MatMul weights held as initializers."""
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        slot = PRUNABLE_OPS.get(node.op_type)
        if slot is not None and len(node.input) > slot and node.input[slot] in inits:
            out[node.input[slot]] = node.name or node.input[slot]
    return out


def schedule(target: float, iterations: int) -> list[float]:
    """Geometric schedule: the same fraction of the survivors is pruned each round.

    Example:
        >>> [round(s, 4) for s in schedule(0.75, 2)]
        [0.5, 0.75]
    """
    return [1.0 - (1.0 - target) ** ((i + 1) / iterations) for i in range(iterations)]


def layer_sparsity(spec: PruneSpec, names: dict[str, str], target: float, base: float) -> dict[str, float] | float:
    """This round's sparsity: one global fraction, or per layer (overrides scaled along the schedule)."""
    if spec.scope == "global":
        return target
    out = {}
    for init, node in names.items():
        want = base
        if spec.layers:
            want = spec.layers.get(init, spec.layers.get(node, base))
        # Scale the override along the same schedule as the global target.
        out[init] = want * (target / base) if base > 0 else want
    return out


def check_layer_names(spec: PruneSpec, names: dict[str, str]) -> None:
    """Raises InvalidSpec when ``layers`` names a layer that is not a prunable weight or node."""
    if spec.layers:
        known = set(names) | set(names.values())
        unknown = sorted(set(spec.layers) - known)
        if unknown:
            raise InvalidSpec(f"unknown layers {unknown}; prunable layers: {sorted(names.values())}",
                              [{"loc": ["layers", u], "msg": "unknown layer"} for u in unknown])


def weight_report(weights: dict[str, np.ndarray], names: dict[str, str], spec: PruneSpec) -> dict[str, Any]:
    """The report of a weight-pruned model: overall and per-layer sparsity of the pruned weights."""
    layers = []
    total = zeros = 0
    for init, w in weights.items():
        z = int((w == 0).sum())
        total += w.size
        zeros += z
        layers.append({"layer": names[init], "weight": init, "params": int(w.size),
                       "sparsity": round(z / w.size, 4)})
    return {"granularity": spec.granularity, "importance": spec.importance, "scope": spec.scope,
            "iterations": spec.iterations, "target_sparsity": spec.sparsity,
            "sparsity": round(zeros / max(total, 1), 4), "layers": layers,
            "note": "dense ONNX Runtime kernels do not skip zeros: expect smaller zip_bytes, not lower latency"}


def prune_onnx_only(model: onnx.ModelProto, spec: PruneSpec, ctx: StepContext, names: dict[str, str],
                    rng: np.random.Generator) -> StepResult:
    """No training needed: zero initializers in the ONNX graph directly (works on any convertible or not model)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    weights = {n: numpy_helper.to_array(inits[n]).copy() for n in names}
    for i, target in enumerate(schedule(spec.sparsity, spec.iterations)):
        scores = IMPORTANCE[spec.importance](weights, None, rng)
        masks = masks_for(scores, weights, layer_sparsity(spec, names, target, spec.sparsity), spec.scope)
        for k in weights:
            weights[k] = weights[k] * masks[k]
        ctx.progress("pruning", (i + 1) / spec.iterations, f"iteration {i + 1}/{spec.iterations}")
    for k, w in weights.items():
        inits[k].CopyFrom(numpy_helper.from_array(w.astype(numpy_helper.to_array(inits[k]).dtype), k))
    return StepResult(out, weight_report(weights, names, spec))


def prune_with_training(model: onnx.ModelProto, spec: PruneSpec, ctx: StepContext, names: dict[str, str],
                        rng: np.random.Generator) -> StepResult:
    """Iterative pruning in torch: each round scores (Taylor from gradients), masks, and fine-tunes with
    the masks re-applied after every step; the trained values are written back into the graph."""
    ft = spec.finetune
    assert ft is not None  # training without a finetune section is Taylor importance, which PruneSpec refuses
    tune = Finetune(ft, ctx, why="fine-tuning")
    module = to_trainable(model, "fine-tuning")
    params = params_by_initializer(module, names)
    masks = Masks(params)
    reapply = masks.apply
    rounds = []

    targets = schedule(spec.sparsity, spec.iterations)
    for i, target in enumerate(targets):
        weights = {k: p.detach().cpu().numpy().copy() for k, p in params.items()}
        grads = _taylor_grads(tune, module, params) if spec.importance == "taylor" else None
        scores = IMPORTANCE[spec.importance](weights, grads, rng)
        masks.set(masks_for(scores, weights, layer_sparsity(spec, names, target, spec.sparsity), spec.scope))
        reapply()
        losses: TrainLog | list[float] = []
        if tune.epochs:
            def on_epoch(epoch: int, loss: float, i: int = i) -> None:
                frac = (i + (epoch + 1) / tune.epochs) / len(targets)
                ctx.progress("finetuning", frac,
                             f"iteration {i + 1}/{len(targets)}, epoch {epoch + 1}: loss {loss:.4f}")

            losses = tune.run(module, seed_offset=i, after_step=reapply, on_epoch=on_epoch)
        else:
            ctx.progress("pruning", (i + 1) / len(targets), f"iteration {i + 1}/{len(targets)}")
        rounds.append({"iteration": i + 1, "sparsity": round(target, 4), "loss": losses[-1] if losses else None,
                       **({"training": losses.summary()} if losses else {})})
    module.cpu()
    reapply()
    out = module.write_back(model)
    final = {k: p.detach().cpu().numpy() for k, p in params.items()}
    report = weight_report(final, names, spec)
    report.update(rounds=rounds, notes=tune.notes, finetune=ft.model_dump())
    return StepResult(out, report)


class Masks:
    """Pruning masks kept applied to the parameters they prune (after each optimizer step, after a rewind).

    A mask follows its parameter's device the first time they differ: training moves the module to the
    GPU, and a CPU mask multiplied into a CUDA weight fails (found by the GPU check).
    """

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        self.params = params
        self.masks: dict[str, torch.Tensor] = {}

    def set(self, masks: dict[str, np.ndarray]) -> None:
        self.masks = {k: torch.from_numpy(m.astype(np.float32)) for k, m in masks.items()}

    def apply(self) -> None:
        with torch.no_grad():
            for k, m in self.masks.items():
                p = self.params[k]
                if m.device != p.device:
                    m = self.masks[k] = m.to(p.device)
                p.mul_(m)


def params_by_initializer(module: OnnxModule, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """Map ONNX weight initializer names to the converted module's weight parameters."""
    out, missing = {}, []
    for n in names:
        try:
            out[n] = module.get_parameter(module.tensor_name(n))  # torch layout (Linear: [out, in])
        except (KeyError, AttributeError):
            missing.append(n)
    if missing:
        raise NotTrainable(f"weights not trainable after conversion: {missing[:5]}")
    return out


def _taylor_grads(tune: Finetune, module: OnnxModule, params: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Gradients of the training loss over a few batches, per pruned weight, for Taylor importance."""
    tune.gradients(module)
    return {k: (p.grad.detach().numpy().copy() if p.grad is not None else np.zeros(p.shape, np.float32))
            for k, p in params.items()}
