"""Lottery tickets: iterative magnitude pruning with rewinding (``rewind: init | random``).

Frankle & Carbin: each round prunes the smallest surviving weights of the trained net, resets the
survivors to their values at initialisation (``init``: an uploaded model of the same graph), and retrains
with the mask fixed. ``random`` resets them to a fresh random init instead: the control of Liu et al.,
which says whether the ticket's initial values matter or only its mask.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch

from compression.context import StepContext, StepResult
from compression.errors import InvalidSpec
from compression.techniques.pruning.importance import IMPORTANCE, masks_for
from compression.techniques.pruning.weight import Masks, layer_sparsity, params_by_initializer, schedule, weight_report
from compression.training import Finetune, module_holdout_accuracy, to_trainable

if TYPE_CHECKING:
    from compression.techniques.pruning import PruneSpec


def lottery(model: onnx.ModelProto, spec: PruneSpec, ctx: StepContext, names: dict[str, str]) -> StepResult:
    """Prune ``spec.sparsity`` of the weights in ``spec.iterations`` rounds, rewinding before each retrain.

    Args:
        names: the prunable weight initializers (name -> node), as
            :func:`~compression.techniques.pruning.weight.prunable_initializers` gives them.

    Returns:
        StepResult with the weight report plus ``rounds``: held-out accuracy of the dense trained model
        (round 0) and after each retrain, with the fraction of weights kept.

    Raises:
        InvalidSpec: ``rewind: init`` without a model store, or a rewind model of another graph.
    """
    module = to_trainable(model, "lottery-ticket pruning")
    params = params_by_initializer(module, names)
    trainable = dict(module.named_parameters())
    init_state: dict[str, torch.Tensor] | None = None
    notes: list[str] = []
    if spec.rewind == "init":
        if ctx.load_model is None:
            raise InvalidSpec("rewind_model_id cannot be resolved here (no model store)",
                              [{"loc": ["rewind_model_id"], "msg": "cannot resolve model ids"}])
        init_module = to_trainable(ctx.load_model(str(spec.rewind_model_id)), "rewinding to the init model")
        init_params = dict(init_module.named_parameters())
        bad = sorted(k for k, p in trainable.items() if k not in init_params or init_params[k].shape != p.shape)
        if bad:
            raise InvalidSpec(f"rewind model is not the same graph: tensors {bad[:5]} missing or of another shape",
                              [{"loc": ["rewind_model_id"], "msg": "not the same graph as the model"}])
        init_state = {k: init_params[k].detach().clone() for k in trainable}
    ft = spec.finetune
    assert ft is not None  # PruneSpec: rewinding retrains every round
    tune = Finetune(ft, ctx, why="lottery-ticket retraining")
    notes.extend(tune.notes)
    rng = np.random.default_rng(ctx.seed)
    masks = Masks(params)
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
    rounds = [{"round": 0, "kept": 1.0, "accuracy": module_holdout_accuracy(module, ctx),
               "note": "the trained model, dense"}]
    targets = schedule(spec.sparsity, spec.iterations)
    for i, target in enumerate(targets):
        weights = {k: p.detach().cpu().numpy().copy() for k, p in params.items()}
        scores = IMPORTANCE[spec.importance](weights, None, rng)
        masks.set(masks_for(scores, weights, layer_sparsity(spec, names, target, spec.sparsity), spec.scope))
        rewind(i + 1)

        def on_epoch(epoch: int, loss: float, i: int = i) -> None:
            ctx.progress("finetuning", (i + (epoch + 1) / ft.epochs) / len(targets),
                         f"round {i + 1}/{len(targets)}, epoch {epoch + 1}: loss {loss:.4f}")

        losses = tune.run(module, seed_offset=i, after_step=reapply, on_epoch=on_epoch)
        module.cpu()
        reapply()
        rounds.append({"round": i + 1, "kept": round(1.0 - target, 4), "accuracy": module_holdout_accuracy(module, ctx),
                       "loss": losses[-1]})
    notes.extend(n for n in tune.notes if n not in notes)  # the rounds' training notes (BatchNorm re-inserted)
    out = module.write_back(model)
    final = {k: p.detach().cpu().numpy() for k, p in params.items()}
    report = weight_report(final, names, spec)
    report.update(rewind=spec.rewind, rewind_model_id=spec.rewind_model_id, rounds=rounds, notes=notes,
                  finetune=ft.model_dump())
    return StepResult(out, report)
