"""Lottery tickets: iterative magnitude pruning with rewinding (``rewind: init | random | sign``).

Frankle & Carbin: each round prunes the smallest surviving weights of the trained net, resets the
survivors to their values at initialisation (``init``: an uploaded model of the same graph), and retrains
with the mask fixed. ``random`` resets them to a fresh random init instead: the control of Liu et al.,
which says whether the ticket's initial values matter or only its mask. ``sign`` keeps only the *signs* of
the init (Zhou et al. 2019, "Deconstructing lottery tickets": the sign decides whether it trains, the
magnitude does not): the pruned weights restart at ``sign(w_init) * m`` with ``m`` the std of the layer's
init weights (``sign_magnitude: constant``, the default) or a fresh random init's ``|w|`` (``random``);
biases and the other tensors are rewound to the init as with ``init``.

``baseline: scratch`` is Liu et al.'s Scratch-B beside the ticket: at each chosen round a separate copy of
the net, the same mask, trains from a fresh random init for the *budget* of the ticket's path —
:func:`scratch_epochs` — and its held-out accuracy is reported as ``scratch_accuracy``. The step's result
stays the ticket.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx
import torch

from compression.context import StepContext, StepResult
from compression.errors import InvalidSpec
from compression.techniques.pruning.importance import IMPORTANCE, masks_for
from compression.techniques.pruning.weight import Masks, layer_sparsity, params_by_initializer, schedule, weight_report
from compression.training import Finetune, module_holdout_accuracy, to_trainable

if TYPE_CHECKING:
    from compression.converter.module import OnnxModule
    from compression.spec import FinetuneSpec
    from compression.techniques.pruning import PruneSpec


def scratch_epochs(round_number: int, epochs: int) -> int:
    """Scratch-B's budget at round ``round_number`` (1 = first): the epochs of the whole path that produced
    the ticket's mask, counting the dense training as one round (Frankle & Carbin train the dense net and
    every round for the same number of iterations): ``(round + 1) * epochs``. Same data and batch size, so
    the same optimizer steps. A dense model trained longer than ``finetune.epochs`` makes it a lower bound.

    Example:
        >>> scratch_epochs(3, 6)
        24
    """
    return (round_number + 1) * epochs


def _init_state(spec: PruneSpec, ctx: StepContext, trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The uploaded init model's values by parameter name (``rewind: init | sign``).

    Raises:
        InvalidSpec: no model store, or a rewind model of another graph.
    """
    if ctx.load_model is None:
        raise InvalidSpec("rewind_model_id cannot be resolved here (no model store)",
                          [{"loc": ["rewind_model_id"], "msg": "cannot resolve model ids"}])
    init_module = to_trainable(ctx.load_model(str(spec.rewind_model_id)), "rewinding to the init model")
    init_params = dict(init_module.named_parameters())
    bad = sorted(k for k, p in trainable.items() if k not in init_params or init_params[k].shape != p.shape)
    if bad:
        raise InvalidSpec(f"rewind model is not the same graph: tensors {bad[:5]} missing or of another shape",
                          [{"loc": ["rewind_model_id"], "msg": "not the same graph as the model"}])
    return {k: init_params[k].detach().clone() for k in trainable}


def _random_init(module: OnnxModule, seed: int) -> None:
    """A fresh random init (PyTorch's defaults) of the module's Conv/Linear/BatchNorm layers, seeded."""
    torch.manual_seed(seed)
    for layer in [*module.weights.values(), *module.norms.values()]:
        layer.reset_parameters()


def _scratch_b(model: onnx.ModelProto, names: dict[str, str], mask: dict[str, np.ndarray], ft: FinetuneSpec,
               ctx: StepContext, round_number: int, progress: Callable[[int, float], None]) -> dict[str, float | int]:
    """Train a separate copy of ``model`` under ``mask`` from a fresh random init for Scratch-B's budget;
    returns its held-out accuracy and epochs. Leaves the ticket alone."""
    epochs = scratch_epochs(round_number, ft.planned_epochs(ctx.data.train.samples if ctx.data else None))
    module = to_trainable(model, "the scratch baseline")
    masks = Masks(params_by_initializer(module, names))
    masks.set(mask)
    _random_init(module, ctx.seed * 1000 + 500 + round_number)  # apart from rewind: random's seeds
    masks.apply()
    tune = Finetune(ft.model_copy(update={"epochs": epochs}), ctx, why="the scratch baseline")
    tune.run(module, seed_offset=1000 + round_number, after_step=masks.apply, on_epoch=progress)
    module.cpu()
    masks.apply()
    return {"scratch_accuracy": module_holdout_accuracy(module, ctx), "scratch_epochs": epochs}


def lottery(model: onnx.ModelProto, spec: PruneSpec, ctx: StepContext, names: dict[str, str]) -> StepResult:
    """Prune ``spec.sparsity`` of the weights in ``spec.iterations`` rounds, rewinding before each retrain.

    Args:
        names: the prunable weight initializers (name -> node), as
            :func:`~compression.techniques.pruning.weight.prunable_initializers` gives them.

    Returns:
        StepResult with the weight report plus ``rounds``: held-out accuracy of the dense trained model
        (round 0) and after each retrain, with the fraction of weights kept; with ``baseline: scratch`` the
        chosen rounds also carry ``scratch_accuracy`` and ``scratch_epochs``.

    Raises:
        InvalidSpec: ``rewind: init | sign`` without a model store, or a rewind model of another graph.
    """
    module = to_trainable(model, "lottery-ticket pruning")
    params = params_by_initializer(module, names)
    trainable = dict(module.named_parameters())
    init_state = _init_state(spec, ctx, trainable) if spec.rewind in ("init", "sign") else None
    notes: list[str] = []
    ft = spec.finetune
    assert ft is not None  # PruneSpec: rewinding retrains every round
    tune = Finetune(ft, ctx, why="lottery-ticket retraining")
    notes.extend(tune.notes)
    rng = np.random.default_rng(ctx.seed)
    masks = Masks(params)
    reapply = masks.apply
    magnitude = spec.sign_magnitude or "constant"
    resettable = {id(p) for layer in module.weights.values() for p in layer.parameters()}
    signs: dict[str, torch.Tensor] = {}
    constant: dict[str, float] = {}
    if init_state is not None and spec.rewind == "sign":
        key = {id(p): k for k, p in trainable.items()}
        for n, p in params.items():
            w0 = init_state[key[id(p)]]
            signs[n], constant[n] = torch.sign(w0), float(w0.std(correction=0))
        kept_constant = [n for n, p in params.items() if id(p) not in resettable]
        if magnitude == "random" and kept_constant:
            notes.append(f"{len(kept_constant)} pruned tensors outside Conv/Linear layers have no standard random "
                         "init: their magnitudes are constant (the init's std)")

    def rewind(round_index: int) -> None:
        with torch.no_grad():
            if spec.rewind == "random" or (spec.rewind == "sign" and magnitude == "random"):
                _random_init(module, ctx.seed * 1000 + round_index)
            fresh = {n: p.detach().abs().clone() for n, p in params.items()} if magnitude == "random" else {}
            if init_state is not None:
                for k, p in trainable.items():
                    p.copy_(init_state[k])
            for n, s in signs.items():
                p = params[n]
                m = fresh[n] if magnitude == "random" and id(p) in resettable else constant[n]
                p.copy_(s * m)
        reapply()

    if spec.rewind == "random" and len(module.params):
        notes.append(f"{len(module.params)} tensors outside Conv/Linear/BatchNorm layers keep their trained values "
                     "(no standard random init for them)")
    targets = schedule(spec.sparsity, spec.iterations)
    scratch_rounds = set(spec.scratch_rounds)
    work = len(targets) * tune.epochs + sum(scratch_epochs(r, tune.epochs) for r in scratch_rounds)
    done = 0

    def progress(what: str) -> Callable[[int, float], None]:
        def on_epoch(epoch: int, loss: float) -> None:
            nonlocal done
            done += 1
            ctx.progress("finetuning", done / work, f"{what}, epoch {epoch + 1}: loss {loss:.4f}")
        return on_epoch

    rounds = [{"round": 0, "kept": 1.0, "accuracy": module_holdout_accuracy(module, ctx),
               "note": "the trained model, dense"}]
    for i, target in enumerate(targets):
        weights = {k: p.detach().cpu().numpy().copy() for k, p in params.items()}
        scores = IMPORTANCE[spec.importance](weights, None, rng)
        mask = masks_for(scores, weights, layer_sparsity(spec, names, target, spec.sparsity), spec.scope)
        masks.set(mask)
        rewind(i + 1)
        losses = tune.run(module, seed_offset=i, after_step=reapply, on_epoch=progress(f"round {i + 1}/{len(targets)}"))
        module.cpu()
        reapply()
        rounds.append({"round": i + 1, "kept": round(1.0 - target, 4), "accuracy": module_holdout_accuracy(module, ctx),
                       "loss": losses[-1], "training": losses.summary()})
        if i + 1 in scratch_rounds:
            rounds[-1].update(_scratch_b(model, names, mask, ft, ctx, i + 1,
                                         progress(f"round {i + 1}/{len(targets)}, scratch baseline")))
    notes.extend(n for n in tune.notes if n not in notes)  # the rounds' training notes (BatchNorm re-inserted)
    out = module.write_back(model)
    final = {k: p.detach().cpu().numpy() for k, p in params.items()}
    report = weight_report(final, names, spec)
    report.update(rewind=spec.rewind, rewind_model_id=spec.rewind_model_id, rounds=rounds, notes=notes,
                  finetune=ft.model_dump())
    if spec.rewind == "sign":
        report["sign_magnitude"] = magnitude
    if scratch_rounds:
        report["baseline"] = {"kind": "scratch", "rounds": sorted(scratch_rounds),
                              "epochs": "Scratch-B: (round + 1) × finetune.epochs from a fresh random init, same mask"}
    return StepResult(out, report)
