"""Pruning. ``granularity: weight`` — unstructured magnitude pruning with exact zeros kept in the ONNX.

Dense ONNX Runtime kernels do not skip zeros: weight pruning shrinks ``nonzero_params`` and the
deflated size (``zip_bytes``), not latency, and the metrics say so.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from pydantic import Field, model_validator

from compression.context import StepContext, StepResult
from compression.errors import InvalidSpec, NotTrainable
from compression.registry import register_technique
from compression.spec import FinetuneSpec, StrictModel
from compression.techniques.importance import IMPORTANCE, masks_for
from compression.training import loss_config, teacher_outputs, train

PRUNABLE_OPS = {"Conv": 1, "Gemm": 1, "MatMul": 1, "ConvTranspose": 1}


class PruneSpec(StrictModel):
    method: Literal["prune"] = "prune"
    granularity: Literal["weight"] = Field(
        "weight", description="weight: unstructured magnitude pruning (channel: planned, see issue tracker)"
    )
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of prunable weights set to zero")
    importance: Literal["l1", "l2", "taylor", "random"] = "l1"
    scope: Literal["global", "layer"] = "global"
    iterations: int = Field(1, ge=1, le=100, description="prune a little, fine-tune, repeat")
    layers: dict[str, float] | None = Field(
        None, description="per-layer sparsity overrides by layer (weight initializer or node) name; scope=layer"
    )
    finetune: FinetuneSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> "PruneSpec":
        if self.layers:
            for name, s in self.layers.items():
                if not 0.0 <= s < 1.0:
                    raise ValueError(f"layers.{name}: sparsity must be in [0, 1)")
        if self.importance == "taylor" and self.finetune is None:
            raise ValueError("importance 'taylor' needs gradients: give a finetune section (and a dataset)")
        return self

    @property
    def needs_data(self) -> bool:
        return self.finetune is not None or self.importance == "taylor"


def _prunable_initializers(model: onnx.ModelProto) -> dict[str, str]:
    """weight initializer name -> node name for Conv/Gemm/MatMul weights held as initializers."""
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        slot = PRUNABLE_OPS.get(node.op_type)
        if slot is not None and len(node.input) > slot and node.input[slot] in inits:
            out[node.input[slot]] = node.name or node.input[slot]
    return out


def _schedule(target: float, iterations: int) -> list[float]:
    """Geometric schedule: the same fraction of the survivors is pruned each round."""
    return [1.0 - (1.0 - target) ** ((i + 1) / iterations) for i in range(iterations)]


def _layer_sparsity(spec: PruneSpec, names: dict[str, str], target: float, base: float) -> dict[str, float] | float:
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


def _check_layer_names(spec: PruneSpec, names: dict[str, str]) -> None:
    if spec.layers:
        known = set(names) | set(names.values())
        unknown = sorted(set(spec.layers) - known)
        if unknown:
            raise InvalidSpec(f"unknown layers {unknown}; prunable layers: {sorted(names.values())}",
                              [{"loc": ["layers", u], "msg": "unknown layer"} for u in unknown])


@register_technique("prune", PruneSpec, phase="pruning")
def prune(model: onnx.ModelProto, spec: PruneSpec, ctx: StepContext) -> StepResult:
    """Unstructured magnitude pruning (global or per layer, iterative, with optional fine-tuning).

    Args:
        model: the current model of the pipeline.
        spec: sparsity, importance, scope, iterations, finetune.
        ctx: data (needed for fine-tuning), the original model (teacher), progress.

    Returns:
        StepResult whose model has exact zeros in the pruned weights; the report lists per-layer sparsity.

    Example:
        >>> prune(model, PruneSpec(sparsity=0.5), ctx).report["sparsity"]  # doctest: +SKIP
        0.5
    """
    names = _prunable_initializers(model)
    if not names:
        raise InvalidSpec("no Conv/Gemm/MatMul weights held as initializers: nothing to prune")
    _check_layer_names(spec, names)
    rng = np.random.default_rng(ctx.seed)
    if spec.needs_data:
        if ctx.data is None:
            raise InvalidSpec("fine-tuning needs a dataset", [{"loc": ["finetune"], "msg": "needs a dataset"}])
        result = _prune_with_training(model, spec, ctx, names, rng)
    else:
        result = _prune_onnx_only(model, spec, ctx, names, rng)
    return result


def _report(weights: dict[str, np.ndarray], names: dict[str, str], spec: PruneSpec) -> dict:
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


def _prune_onnx_only(model: onnx.ModelProto, spec: PruneSpec, ctx: StepContext, names: dict[str, str],
                     rng: np.random.Generator) -> StepResult:
    """No training needed: zero initializers in the ONNX graph directly (works on any convertible or not model)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    weights = {n: numpy_helper.to_array(inits[n]).copy() for n in names}
    for i, target in enumerate(_schedule(spec.sparsity, spec.iterations)):
        scores = IMPORTANCE[spec.importance](weights, None, rng)
        masks = masks_for(scores, weights, _layer_sparsity(spec, names, target, spec.sparsity), spec.scope)
        for k in weights:
            weights[k] = weights[k] * masks[k]
        ctx.progress("pruning", (i + 1) / spec.iterations, f"iteration {i + 1}/{spec.iterations}")
    for k, w in weights.items():
        inits[k].CopyFrom(numpy_helper.from_array(w.astype(numpy_helper.to_array(inits[k]).dtype), k))
    return StepResult(out, _report(weights, names, spec))


def _prune_with_training(model: onnx.ModelProto, spec: PruneSpec, ctx: StepContext, names: dict[str, str],
                         rng: np.random.Generator) -> StepResult:
    from compression.converter import UnsupportedOp, to_torch

    try:
        module = to_torch(model)
    except UnsupportedOp as e:
        raise NotTrainable(f"fine-tuning needs a trainable model; unsupported ops: {e.op_types}") from None
    params = _params_by_initializer(module, names)
    data = ctx.data
    assert data is not None
    ft = spec.finetune or FinetuneSpec(epochs=0)
    cfg, notes = loss_config(ft, data.train.labels is not None)
    teacher = teacher_outputs(ctx.original, data.train, ctx.threads) if cfg.distill else None
    masks_t: dict[str, torch.Tensor] = {}
    rounds = []

    def reapply() -> None:
        with torch.no_grad():
            for k, m in masks_t.items():
                params[k].mul_(m)

    schedule = _schedule(spec.sparsity, spec.iterations)
    for i, target in enumerate(schedule):
        weights = {k: p.detach().cpu().numpy().copy() for k, p in params.items()}
        grads = _accumulate_grads(module, params, data.train, cfg, teacher, ft) if spec.importance == "taylor" else None
        scores = IMPORTANCE[spec.importance](weights, grads, rng)
        masks = masks_for(scores, weights, _layer_sparsity(spec, names, target, spec.sparsity), spec.scope)
        masks_t = {k: torch.from_numpy(m.astype(np.float32)) for k, m in masks.items()}
        reapply()
        losses: list[float] = []
        if ft.epochs:
            def on_epoch(epoch: int, loss: float, i: int = i) -> None:
                frac = (i + (epoch + 1) / ft.epochs) / len(schedule)
                ctx.progress("finetuning", frac, f"iteration {i + 1}/{len(schedule)}, epoch {epoch + 1}: loss {loss:.4f}")

            losses = train(module, list(module.input_names), data.train, epochs=ft.epochs, lr=ft.lr,
                           batch_size=ft.batch_size, loss=cfg, teacher=teacher, seed=ctx.seed + i,
                           device=ctx.device, after_step=reapply, on_epoch=on_epoch)
        else:
            ctx.progress("pruning", (i + 1) / len(schedule), f"iteration {i + 1}/{len(schedule)}")
        rounds.append({"iteration": i + 1, "sparsity": round(target, 4), "loss": losses[-1] if losses else None})
    module.cpu()
    reapply()
    out = module.write_back(model)
    final = {k: p.detach().cpu().numpy() for k, p in params.items()}
    report = _report(final, names, spec)
    report.update(rounds=rounds, notes=notes, finetune=ft.model_dump() if spec.finetune else None)
    return StepResult(out, report)


def _params_by_initializer(module: torch.nn.Module, names: dict[str, str]) -> dict[str, torch.Tensor]:
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


def _accumulate_grads(module, params, arrays, cfg, teacher, ft, batches: int = 8) -> dict[str, np.ndarray]:  # noqa: ANN001
    """Gradients of the training loss over a few batches, for Taylor importance."""
    from compression.training import loss_fn

    module.train()
    module.zero_grad(set_to_none=True)
    n = min(arrays.samples, batches * ft.batch_size)
    for s in range(0, n, ft.batch_size):
        idx = np.arange(s, min(s + ft.batch_size, n))
        b = arrays.take(idx)
        out = module(*[torch.from_numpy(b.inputs[k]) for k in module.input_names])
        out = out[0] if isinstance(out, (tuple, list)) else out
        labels = torch.from_numpy(b.labels) if b.labels is not None else None
        t = torch.from_numpy(teacher[idx]) if teacher is not None else None
        loss_fn(out, labels, t, cfg).backward()
    module.eval()
    return {k: (p.grad.detach().numpy().copy() if p.grad is not None else np.zeros(p.shape, np.float32))
            for k, p in params.items()}
