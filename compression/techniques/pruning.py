"""Pruning.

- ``granularity: weight`` — unstructured magnitude pruning with exact zeros kept in the ONNX. Dense
  ONNX Runtime kernels do not skip zeros: it shrinks ``nonzero_params`` and ``zip_bytes``, not latency,
  and the metrics say so. With ``rewind: init | random`` it is the lottery-ticket procedure.
- ``granularity: channel`` — filters, neurons, attention heads and FFN neurons removed physically
  (torch-pruning's DepGraph; see :mod:`compression.structured`): a smaller graph, fewer MACs, faster.
"""
from __future__ import annotations

from typing import ClassVar, Literal

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
from compression.training import accumulate_grads, loss_config, predict, teacher_outputs, train

PRUNABLE_OPS = {"Conv": 1, "Gemm": 1, "MatMul": 1, "ConvTranspose": 1}


class PruneSpec(StrictModel):
    model_ref_fields: ClassVar[dict[str, frozenset[str]]] = {"rewind_model_id": frozenset()}
    method: Literal["prune"] = "prune"
    granularity: Literal["weight", "channel"] = Field(
        "weight", description="weight: unstructured magnitude (zeros); channel: filters/neurons/heads removed"
    )
    sparsity: float = Field(0.5, ge=0.0, lt=1.0,
                            description="weight: fraction of weights zeroed; channel: fraction of channels removed")
    head_sparsity: float | None = Field(
        None, ge=0.0, lt=1.0, description="channel, transformers: fraction of attention heads removed (default: sparsity)"
    )
    importance: Literal["l1", "l2", "taylor", "bn_scale", "random"] = "l1"
    scope: Literal["global", "layer"] = "global"
    iterations: int = Field(1, ge=1, le=100, description="prune a little, fine-tune, repeat")
    layers: dict[str, float] | None = Field(
        None, description="per-layer sparsity overrides by layer (weight initializer or node) name"
    )
    max_layer_sparsity: float = Field(0.9, gt=0.0, le=1.0,
                                      description="channel: no layer loses more than this fraction of its channels")
    round_to: int | None = Field(
        None, ge=1, le=256, description="channel: keep channel counts multiples of this (ONNX Runtime's blocked "
                                        "conv kernels run fastest at multiples of 8)"
    )
    rewind: Literal["none", "init", "random"] = Field(
        "none", description="lottery ticket (weight granularity): reset survivors to the init model or a fresh "
                            "random init each round, then retrain"
    )
    rewind_model_id: str | None = Field(None, description="rewind: init — an uploaded model, same graph, at initialisation")
    finetune: FinetuneSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> "PruneSpec":
        if self.layers:
            for name, s in self.layers.items():
                if not 0.0 <= s < 1.0:
                    raise ValueError(f"layers.{name}: sparsity must be in [0, 1)")
        if self.importance == "taylor" and self.finetune is None:
            raise ValueError("importance 'taylor' needs gradients: give a finetune section (and a dataset)")
        if self.importance == "bn_scale" and self.granularity != "channel":
            raise ValueError("importance 'bn_scale' ranks channels by BatchNorm scale: needs granularity 'channel'")
        if self.rewind != "none":
            if self.granularity != "weight":
                raise ValueError("rewind (lottery ticket) works on granularity 'weight'")
            if self.finetune is None or self.finetune.epochs < 1:
                raise ValueError("rewind retrains every round: give finetune with epochs >= 1")
            if self.rewind == "init" and not self.rewind_model_id:
                raise ValueError("rewind 'init' needs rewind_model_id (the uploaded model at initialisation)")
        if self.rewind_model_id and self.rewind != "init":
            raise ValueError("rewind_model_id is only used with rewind 'init'")
        if (self.head_sparsity is not None or self.round_to is not None) and self.granularity != "channel":
            raise ValueError("head_sparsity and round_to apply to granularity 'channel'")
        return self

    @property
    def needs_data(self) -> bool:
        return self.finetune is not None or self.importance == "taylor" or self.rewind != "none"


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
    """Weight (unstructured, optionally lottery-ticket) or channel (structured) pruning.

    Args:
        model: the current model of the pipeline.
        spec: granularity, sparsity, importance, scope, iterations, finetune, rewind.
        ctx: data (needed for fine-tuning), the original model (teacher), ``load_model`` (rewind), progress.

    Returns:
        StepResult. ``weight``: exact zeros in the pruned weights, per-layer sparsity in the report.
        ``channel``: a smaller graph, channels per layer before/after and the layers left alone.

    Raises:
        InvalidSpec: unknown layer names, no dataset where one is needed, a rewind model of another graph.
        NotTrainable: fine-tuning or channel pruning on a graph the converter cannot make trainable.

    Example:
        >>> prune(model, PruneSpec(sparsity=0.5), ctx).report["sparsity"]  # doctest: +SKIP
        0.5
    """
    if spec.granularity == "channel":
        return _prune_channels(model, spec, ctx)
    names = _prunable_initializers(model)
    if not names:
        raise InvalidSpec("no Conv/Gemm/MatMul weights held as initializers: nothing to prune")
    _check_layer_names(spec, names)
    rng = np.random.default_rng(ctx.seed)
    if spec.rewind != "none":
        if ctx.data is None:
            raise InvalidSpec("rewind retrains every round: it needs a dataset", [{"loc": ["rewind"], "msg": "needs a dataset"}])
        return _lottery(model, spec, ctx, names)
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
    masks = _Masks(params)
    reapply = masks.apply
    rounds = []

    schedule = _schedule(spec.sparsity, spec.iterations)
    for i, target in enumerate(schedule):
        weights = {k: p.detach().cpu().numpy().copy() for k, p in params.items()}
        grads = _accumulate_grads(module, params, data.train, cfg, teacher, ft) if spec.importance == "taylor" else None
        scores = IMPORTANCE[spec.importance](weights, grads, rng)
        masks.set(masks_for(scores, weights, _layer_sparsity(spec, names, target, spec.sparsity), spec.scope))
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


class _Masks:
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
    accumulate_grads(module, list(module.input_names), arrays, cfg, teacher, ft.batch_size, batches)
    return {k: (p.grad.detach().numpy().copy() if p.grad is not None else np.zeros(p.shape, np.float32))
            for k, p in params.items()}


def _convert(model: onnx.ModelProto):  # noqa: ANN202
    from compression.converter import UnsupportedOp, to_torch

    try:
        return to_torch(model)
    except UnsupportedOp as e:
        raise NotTrainable(f"this step needs a trainable model; unsupported ops: {e.op_types}") from None


def _holdout_accuracy(module, ctx: StepContext) -> float | None:  # noqa: ANN001
    data = ctx.data
    if data is None or data.holdout.labels is None:
        return None
    out = predict(module, list(module.input_names), data.holdout, device=ctx.device)
    if out.ndim != 2:
        return None
    return round(float((out.argmax(1) == data.holdout.labels).mean()), 6)


def _lottery(model: onnx.ModelProto, spec: PruneSpec, ctx: StepContext, names: dict[str, str]) -> StepResult:
    """Iterative magnitude pruning with rewinding (Frankle & Carbin): each round prunes the smallest
    surviving weights of the trained net, resets the survivors to their initial values (``init``) or
    to a fresh random init (``random``, the control of Liu et al.), and retrains with the mask fixed."""
    module = _convert(model)
    params = _params_by_initializer(module, names)
    trainable = dict(module.named_parameters())
    init_state: dict[str, torch.Tensor] | None = None
    notes: list[str] = []
    if spec.rewind == "init":
        if ctx.load_model is None:
            raise InvalidSpec("rewind_model_id cannot be resolved here (no model store)",
                              [{"loc": ["rewind_model_id"], "msg": "cannot resolve model ids"}])
        init_module = _convert(ctx.load_model(str(spec.rewind_model_id)))
        init_params = dict(init_module.named_parameters())
        bad = sorted(k for k, p in trainable.items() if k not in init_params or init_params[k].shape != p.shape)
        if bad:
            raise InvalidSpec(f"rewind model is not the same graph: tensors {bad[:5]} missing or of another shape",
                              [{"loc": ["rewind_model_id"], "msg": "not the same graph as the model"}])
        init_state = {k: init_params[k].detach().clone() for k in trainable}
    data = ctx.data
    assert data is not None and spec.finetune is not None
    ft = spec.finetune
    cfg, cfg_notes = loss_config(ft, data.train.labels is not None)
    notes.extend(cfg_notes)
    teacher = teacher_outputs(ctx.original, data.train, ctx.threads) if cfg.distill else None
    rng = np.random.default_rng(ctx.seed)
    masks = _Masks(params)
    reapply = masks.apply

    def rewind(round_index: int) -> None:
        with torch.no_grad():
            if init_state is not None:
                for k, p in trainable.items():
                    p.copy_(init_state[k])
            else:
                torch.manual_seed(ctx.seed * 1000 + round_index)
                for layer in [*module.weights.values(), *module.norms.values()]:
                    layer.reset_parameters()
        reapply()

    if spec.rewind == "random" and len(module.params):
        notes.append(f"{len(module.params)} tensors outside Conv/Linear/BatchNorm layers keep their trained values "
                     "(no standard random init for them)")
    rounds = [{"round": 0, "kept": 1.0, "accuracy": _holdout_accuracy(module, ctx), "note": "the trained model, dense"}]
    schedule = _schedule(spec.sparsity, spec.iterations)
    for i, target in enumerate(schedule):
        weights = {k: p.detach().cpu().numpy().copy() for k, p in params.items()}
        scores = IMPORTANCE[spec.importance](weights, None, rng)
        masks.set(masks_for(scores, weights, _layer_sparsity(spec, names, target, spec.sparsity), spec.scope))
        rewind(i + 1)

        def on_epoch(epoch: int, loss: float, i: int = i) -> None:
            ctx.progress("finetuning", (i + (epoch + 1) / ft.epochs) / len(schedule),
                         f"round {i + 1}/{len(schedule)}, epoch {epoch + 1}: loss {loss:.4f}")

        losses = train(module, list(module.input_names), data.train, epochs=ft.epochs, lr=ft.lr,
                       batch_size=ft.batch_size, loss=cfg, teacher=teacher, seed=ctx.seed + i,
                       device=ctx.device, after_step=reapply, on_epoch=on_epoch)
        module.cpu()
        reapply()
        rounds.append({"round": i + 1, "kept": round(1.0 - target, 4), "accuracy": _holdout_accuracy(module, ctx),
                       "loss": losses[-1]})
    out = module.write_back(model)
    final = {k: p.detach().cpu().numpy() for k, p in params.items()}
    report = _report(final, names, spec)
    report.update(rewind=spec.rewind, rewind_model_id=spec.rewind_model_id, rounds=rounds, notes=notes,
                  finetune=ft.model_dump())
    return StepResult(out, report)


# ------------------------------------------------------------------------------------- channels


def _channel_overrides(spec: PruneSpec, plan) -> dict[str, float]:  # noqa: ANN001 - ChannelPlan
    if not spec.layers:
        return {}
    alias = {}
    for name, layer in plan.layers.items():
        alias[name] = name
        if layer.weight:
            alias[layer.weight] = name
    unknown = sorted(set(spec.layers) - set(alias))
    if unknown:
        raise InvalidSpec(f"unknown layers {unknown}; prunable layers: {sorted(plan.layers)}",
                          [{"loc": ["layers", u], "msg": "unknown layer"} for u in unknown])
    return {alias[k]: v for k, v in spec.layers.items()}


def _prune_channels(model: onnx.ModelProto, spec: PruneSpec, ctx: StepContext) -> StepResult:
    """Structured pruning: plan (what can go), prune in ``iterations`` rounds with fine-tuning, export."""
    from compression import structured as S
    from compression.metrics import session

    module = _convert(model)
    example = ctx.example_inputs(model)
    module.record_shapes(*example)
    ctx.progress("pruning", 0.0, "tracing channel dependencies")
    plan = S.plan_channels(module, model, example)
    overrides = _channel_overrides(spec, plan)
    before = {n: la.channels for n, la in plan.layers.items()}
    data = ctx.data
    ft = spec.finetune or FinetuneSpec(epochs=0)
    cfg = teacher = None
    notes: list[str] = []
    if data is not None and (spec.finetune is not None or spec.importance == "taylor"):
        cfg, notes = loss_config(ft, data.train.labels is not None)
        teacher = teacher_outputs(ctx.original, data.train, ctx.threads) if cfg.distill else None
    elif spec.needs_data:
        raise InvalidSpec("fine-tuning needs a dataset", [{"loc": ["finetune"], "msg": "needs a dataset"}])
    names = list(module.input_names)
    rounds = []
    rng = np.random.default_rng(ctx.seed)
    if plan.transformer:
        if spec.importance == "bn_scale":
            raise InvalidSpec("importance 'bn_scale' needs BatchNorm layers; a transformer has LayerNorm only",
                              [{"loc": ["importance"], "msg": "no BatchNorm in this model"}])
        totals_h = {b.o.name: b.heads for b in plan.attention}
        totals_n = {up.name: up.channels for up, _ in plan.ffn}
        heads_frac = spec.sparsity if spec.head_sparsity is None else spec.head_sparsity
        step = None
    else:
        candidates = [n for n in plan.layers if n not in plan.ignored]
        if not candidates:
            raise InvalidSpec("no layer of this model can be channel-pruned: "
                              + "; ".join(f"{k}: {v}" for k, v in plan.ignored.items()))
        if spec.importance == "bn_scale" and not S.has_batchnorm(module):
            raise InvalidSpec("importance 'bn_scale' needs BatchNormalization nodes; this graph has none "
                              "(exporters fold BatchNorm into Conv in eval mode)",
                              [{"loc": ["importance"], "msg": "no BatchNorm in this model"}])
        pruner = S.depgraph_pruner(module, example, plan, importance_name=spec.importance, sparsity=spec.sparsity,
                                   scope=spec.scope, layer_sparsity=overrides, iterations=spec.iterations,
                                   max_layer_sparsity=spec.max_layer_sparsity, round_to=spec.round_to)
        step = pruner.step
    for i in range(spec.iterations):
        if spec.importance == "taylor":
            assert cfg is not None
            S.zero_grads(module)
            accumulate_grads(module, names, data.train, cfg, teacher, ft.batch_size, device="cpu")
        if step is not None:
            step()
        else:
            frac = (i + 1) / spec.iterations
            for kind, totals, fraction in (("heads", totals_h, heads_frac), ("neurons", totals_n, spec.sparsity)):
                if kind == "heads":
                    scores = {b.o.name: S.head_scores(b, spec.importance, rng) for b in plan.attention}
                else:
                    scores = {up.name: S.neuron_scores(up, down, spec.importance, rng) for up, down in plan.ffn}
                per = {k: overrides.get(k, fraction) * frac for k in totals}
                drop = S.choose(scores, totals, per, spec.scope, spec.max_layer_sparsity,
                                round_to=spec.round_to if kind == "neurons" else None)
                if kind == "heads":
                    for b in plan.attention:
                        S.prune_heads(b, drop.get(b.o.name, []))
                else:
                    for up, down in plan.ffn:
                        S.prune_neurons(up, down, drop.get(up.name, []))
        S.zero_grads(module)
        losses: list[float] = []
        if ft.epochs and cfg is not None:
            def on_epoch(epoch: int, loss: float, i: int = i) -> None:
                ctx.progress("finetuning", (i + (epoch + 1) / ft.epochs) / spec.iterations,
                             f"iteration {i + 1}/{spec.iterations}, epoch {epoch + 1}: loss {loss:.4f}")

            losses = train(module, names, data.train, epochs=ft.epochs, lr=ft.lr, batch_size=ft.batch_size,
                           loss=cfg, teacher=teacher, seed=ctx.seed + i, device=ctx.device, on_epoch=on_epoch)
            module.cpu()
        else:
            ctx.progress("pruning", (i + 1) / spec.iterations, f"iteration {i + 1}/{spec.iterations}")
        rounds.append({"iteration": i + 1, "channels": sum(la.channels for la in plan.layers.values()),
                       "loss": losses[-1] if losses else None, "accuracy": _holdout_accuracy(module, ctx)})
    module.cpu().eval()
    ctx.progress("exporting", 1.0, "writing the smaller graph")
    out = module.export_resized(model, *example)
    # The exported graph must compute what the pruned torch module computes.
    check = data.holdout.take(np.arange(min(64, data.holdout.samples))) if data is not None else None
    feeds = ({k: check.inputs[k] for k in names} if check is not None
             else {n: t.numpy() for n, t in zip(names, example, strict=True)})
    with torch.no_grad():
        want = module(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names])
    want = (want[0] if isinstance(want, tuple) else want).numpy()
    got = session(out, ctx.threads).run(None, feeds)[0]
    err = float(np.abs(got - want).max())
    if not err <= 1e-3 * (float(np.abs(want).max()) + 1.0):
        raise RuntimeError(f"exported pruned graph disagrees with the pruned module (max error {err:.3g})")
    layers = [{"layer": n, "weight": la.weight, "channels_before": before[n], "channels_after": la.channels}
              for n, la in plan.layers.items()]
    odd = [la["layer"] for la in layers if la["channels_after"] != la["channels_before"] and la["channels_after"] % 8]
    if odd and not spec.round_to:
        notes.append(f"{len(odd)} layers keep channel counts that are not multiples of 8; ONNX Runtime's blocked conv "
                     "kernels can then be slower than the original: set round_to: 8 if latency did not improve")
    report = {
        "granularity": "channel", "importance": spec.importance, "scope": spec.scope,
        "iterations": spec.iterations, "target_sparsity": spec.sparsity,
        "channels_before": sum(before.values()), "channels_after": sum(la.channels for la in plan.layers.values()),
        "layers": layers, "ignored": [{"layer": k, "reason": v} for k, v in plan.ignored.items()],
        "rounds": rounds, "notes": notes, "export_max_abs_error": err,
        "finetune": spec.finetune.model_dump() if spec.finetune else None,
    }
    if plan.transformer:
        report["heads"] = [{"attention_output": b.o.name, "heads_before": totals_h[b.o.name], "heads_after": b.heads}
                           for b in plan.attention]
        report["ffn"] = [{"layer": up.name, "neurons_before": totals_n[up.name], "neurons_after": up.channels}
                         for up, _ in plan.ffn]
        report["head_sparsity"] = heads_frac
    return StepResult(out, report)
