"""Dynamic depth: early exits (BranchyNet, Teerapittayanon et al. 2016).

Small classifier heads (:mod:`.heads`) are attached after chosen blocks of a classifier (``exits: auto``
spreads them by MACs; names must be cut points, see :mod:`.cuts`) and trained (:mod:`.training`) with the sum
of the per-exit losses — cross-entropy on labels and/or distillation from the original (or from the model's
own final head) — with the backbone frozen (the final head's predictions stay exactly the original's) or
trained along.

Two models come out:

- the step's model: one ONNX with every exit as an output, the original output first under its own name, so
  the pipeline's fidelity metrics still compare the final head with the original; ``exit_1``, ``exit_2``, …
  follow. It runs the whole network: it is the training/analysis artifact, not the fast one.
- ``early_exit_gated.onnx``: batch 1, nested ``If`` nodes that compute block *k+1* only when exit *k*'s
  confidence (``criterion``) is below ``threshold`` — a graph input with a default, so one file serves every
  threshold — with outputs ``logits`` and ``exit_index``. This is the model that makes easy samples cheaper.

The report gives, per threshold: held-out accuracy, the fraction leaving at each head, mean MACs per sample
(per-segment MACs from measured shapes) and mean measured latency of the gated model at batch 1 against the
full model at batch 1; and the *recommended* threshold: the cheapest one within ``max_accuracy_drop`` of the
full model. The gated graph and its confidence rule: :mod:`.gating`; the timing: :mod:`.latency`.

Put it last in a spec (or after compression steps only): a later step changes ``model.onnx`` but not the gated
model built here.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
from pydantic import Field, field_validator, model_validator

from compression.context import StepContext, StepResult
from compression.errors import InvalidSpec
from compression.metrics import run_batched, session, top1_accuracy
from compression.registry import register_technique
from compression.spec import RecoveryOptions
from compression.step_spec import ModelFacts, StepCheck, StepSpec
from compression.techniques.early_exit.cuts import choose_cuts, find_cuts
from compression.techniques.early_exit.gating import build_gated, simulate
from compression.techniques.early_exit.heads import add_exit_heads, exit_costs
from compression.techniques.early_exit.latency import batch1_latency_ms
from compression.techniques.early_exit.training import train_exits
from compression.training import teacher_outputs, to_trainable

GATED_NAME = "early_exit_gated.onnx"
DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


class EarlyExitSpec(RecoveryOptions, StepSpec):
    method: Literal["early_exit"] = "early_exit"
    exits: Literal["auto"] | list[str] = Field(
        "auto", description='"auto" (spread by MACs) or node names whose output no skip connection crosses')
    num_exits: int = Field(2, ge=1, le=8, description="exits placed by exits: auto")
    pool_size: int = Field(4, ge=1, le=8, description="4-D exits average-pool to about pool_size² positions "
                                                      "before the linear layer (1: global average pool)")
    hidden: int = Field(0, ge=0, le=4096, description="hidden ReLU layer width in each head (0: one linear layer)")
    freeze_backbone: bool = Field(True, description="train the heads only: the final head stays the original's")
    epochs: int = Field(5, ge=1, le=1000)
    validation: float = Field(0.0, ge=0, lt=1, description="fraction of the training split carved off to keep the "
                              "best epoch; 0 (default): the last epoch (fresh heads in a few epochs improve every epoch, "
                              "and the thresholds are calibrated on the held-out split anyway)")
    lr: float = Field(1e-2, gt=0, le=10, description="fresh small heads learn fast; lower it (1e-3) when the "
                                                     "backbone trains too")
    batch_size: int = Field(64, ge=1, le=65536)
    distill: bool = Field(True, description="add a distillation term to every exit's loss")
    teacher: Literal["original", "final"] = Field(
        "original", description="distillation target: the original model's outputs or the model's own final head")
    temperature: float = Field(4.0, gt=0, le=100)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of CE on labels when distilling too")
    criterion: Literal["max_prob", "entropy"] = Field(
        "max_prob", description="confidence: top softmax probability, or 1 - entropy / log(classes)")
    threshold: float | Literal["auto"] = Field(
        0.9, description='default threshold of the gated model, in [0, 1]; "auto": the recommended one')
    thresholds: list[float] = Field(default_factory=lambda: list(DEFAULT_THRESHOLDS), min_length=1,
                                    max_length=32, description="thresholds the report measures, each in [0, 1]")
    max_accuracy_drop: float = Field(0.005, ge=0, le=1, description="the recommended threshold keeps accuracy "
                                                                    "within this of the full model (0.005 = 0.5 pt)")
    latency_samples: int = Field(200, ge=1, le=10000, description="held-out samples timed per threshold at batch 1")
    latency_rounds: int = Field(3, ge=1, le=20, description="timing rounds (full model and every threshold "
                                                            "interleaved); the best round counts")

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: float | str) -> float | str:
        if v != "auto" and not 0.0 <= float(v) <= 1.0:
            raise ValueError("confidences lie in [0, 1]: give a threshold in [0, 1] or 'auto'")
        return v

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: list[float]) -> list[float]:
        if any(not 0.0 <= t <= 1.0 for t in v):
            raise ValueError("confidences lie in [0, 1]: every threshold must be in [0, 1]")
        return v

    @model_validator(mode="after")
    def _check(self) -> "EarlyExitSpec":
        if not isinstance(self.augment, str):
            raise ValueError("augment: the exit heads learn the backbone's features of the raw inputs; give "
                             "auto or none")
        if isinstance(self.exits, list):
            if not self.exits or len(self.exits) > 8:
                raise ValueError("exits: give 1 to 8 node names, or 'auto'")
            if any(not e.strip() for e in self.exits) or len(set(self.exits)) != len(self.exits):
                raise ValueError("exits: node names must be distinct and non-empty")
            if "num_exits" in self.model_fields_set and self.num_exits != len(self.exits):
                raise ValueError("num_exits is for exits: auto; it disagrees with the names given")
        return self

    @property
    def trains(self) -> bool:
        return self.epochs > 0  # the exit heads (and the backbone unless frozen)

    @property
    def needs_data(self) -> bool:
        return True  # the heads are trained, the thresholds measured on the held-out split

    def preflight(self, facts: ModelFacts) -> StepCheck:
        """Exit heads predict classes: the first output must be class scores ``[N, C]`` (what ``find_cuts``
        refuses at run time with ``not_applicable``)."""
        first = (facts.outputs or [None])[0]
        if first is not None and (len(first) != 2 or (isinstance(first[1], int) and first[1] < 2)):
            return StepCheck(targets=0, applies=False,
                             notes=[f"not_applicable: early exits need a classifier; the first output has shape "
                                    f"{first}, not [N, classes]"])
        return StepCheck(targets=facts.prunable)


@register_technique("early_exit", EarlyExitSpec, phase="finetuning")
def early_exit(model: onnx.ModelProto, spec: EarlyExitSpec, ctx: StepContext) -> StepResult:
    """Attach and train exit heads; return the multi-exit model and a confidence-gated ONNX (``If``).

    Args:
        model: a classifier (first output ``[N, classes]``).
        spec: where the exits go, how heads look and train, the confidence rule and thresholds.
        ctx: the dataset (labels optional: without them the exits learn by distillation), the original
            model (distillation target), progress, seed, device, threads.

    Returns:
        StepResult whose model has outputs ``[original first output, exit_1, …]`` (the other original outputs
        keep their place after the first), extra model ``early_exit_gated.onnx``, and a report with the exits
        (where, shape, MACs, held-out accuracy), per-threshold accuracy / exit fractions / mean MACs / mean
        latency, and the recommended threshold.

    Raises:
        InvalidSpec: no dataset, not a classifier, an exit name that is not a cut point (the message lists the
            valid ones), a model already carrying exit outputs.
        NotTrainable: the graph cannot be converted to torch.

    Example:
        >>> res = early_exit(model, EarlyExitSpec(exits="auto", threshold="auto"), ctx)  # doctest: +SKIP
        >>> res.report["recommended_threshold"], list(res.extra_models)  # doctest: +SKIP
        (0.95, ['early_exit_gated.onnx'])
    """
    data = ctx.data
    if data is None:
        raise InvalidSpec("early_exit needs a dataset to train the exits and measure the thresholds",
                          [{"loc": ["method"], "msg": "needs a dataset"}])
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    missing = [n for n in names if n not in data.train.inputs]
    if missing:
        raise InvalidSpec(f"the model's inputs {missing} are not in the dataset",
                          [{"loc": ["method"], "msg": "inputs do not match the dataset"}])
    ctx.progress("finetuning", 0.0, "finding cut points")
    sample = {k: v[:1] for k, v in data.holdout.inputs.items() if k in names}
    facts = find_cuts(model, sample)
    cuts = choose_cuts(facts, spec.exits, spec.num_exits)
    notes: list[str] = []
    if spec.exits == "auto" and len(cuts) < spec.num_exits:
        notes.append(f"only {len(cuts)} cut point(s) worth an exit (no skip connection across them, and "
                     f"work left after them): placed {len(cuts)} of {spec.num_exits} exits")
    multi, layout = add_exit_heads(model, cuts, facts.classes, pool_size=spec.pool_size, hidden=spec.hidden,
                                   seed=ctx.seed)
    module = to_trainable(multi, "training early exits")
    head_keys = {module.tensor_name(n) for n in layout.initializers}
    teacher = None
    if spec.teacher == "original" and (spec.distill or data.train.labels is None):
        teacher = teacher_outputs(ctx.original, data.train, ctx.threads)
        if teacher.shape[1:] != (facts.classes,):
            raise InvalidSpec(f"the original's output {list(teacher.shape[1:])} differs from this model's "
                              f"[{facts.classes}]: use teacher: final", [{"loc": ["teacher"], "msg": "shape differs"}])
    history, train_notes = train_exits(module, list(module.input_names), data.train, spec, teacher, head_keys, ctx)
    notes += train_notes
    module.cpu()
    trained = module.write_back(multi)
    onnx.checker.check_model(trained)

    ctx.progress("benchmarking", 0.85, "measuring thresholds")
    hold = data.holdout
    outs = run_batched(session(trained, ctx.threads), {k: hold.inputs[k] for k in names})
    final, exit_logits = outs[0], outs[len(model.graph.output):]
    labels = hold.labels
    reference = final.argmax(1) if labels is None else labels  # without labels: agreement with the full model

    def acc(pred: np.ndarray) -> float:
        a = top1_accuracy(pred, reference)
        assert a is not None  # class scores [N, classes >= 2]: find_cuts refuses any other output
        return a

    full_acc = acc(final)
    before = None if spec.freeze_backbone else acc(run_batched(session(model, ctx.threads),
                                                               {k: hold.inputs[k] for k in names})[0])
    costs = exit_costs(facts, layout)
    grid = sorted(set(spec.thresholds) | ({spec.threshold} if spec.threshold != "auto" else set()))
    heads = [*exit_logits, final]
    rows = []
    for t in grid:
        where = simulate(exit_logits, t, spec.criterion)
        pred = np.stack([heads[w - 1][i] for i, w in enumerate(where)])
        counts = np.bincount(where, minlength=len(heads) + 1)[1:]
        mean_macs = float(np.dot(counts, costs) / len(where))
        rows.append({"threshold": t, "accuracy": acc(pred), "accuracy_delta": round(acc(pred) - full_acc, 6),
                     "exit_fractions": [round(float(c) / len(where), 6) for c in counts],
                     "mean_macs": round(mean_macs, 1), "macs_ratio": round(facts.total_macs / mean_macs, 4)})
    within = [r for r in rows if r["accuracy"] >= full_acc - spec.max_accuracy_drop - 1e-9]
    best = min(within, key=lambda r: (r["mean_macs"], -r["threshold"])) if within else None
    recommended = best["threshold"] if best else None
    if spec.threshold == "auto":
        default = recommended if recommended is not None else max(grid)
        if recommended is None:
            notes.append(f"no measured threshold kept accuracy within {spec.max_accuracy_drop}: "
                         f"the gated model defaults to the largest, {default}")
    else:
        default = spec.threshold
    gated = build_gated(trained, layout, criterion=spec.criterion, threshold=float(default))
    onnx.checker.check_model(gated)

    ctx.progress("benchmarking", 0.9, "timing the gated model at batch 1")
    n = min(spec.latency_samples, hold.samples)
    inputs = {k: hold.inputs[k] for k in names}
    gsess = session(gated, ctx.threads, quiet=True)
    configs = [(session(model, ctx.threads, quiet=True), {})]
    configs += [(gsess, {"threshold": np.array(r["threshold"], np.float32)}) for r in rows]
    full_ms, *gated_ms = batch1_latency_ms(configs, inputs, n, spec.latency_rounds)
    for r, ms in zip(rows, gated_ms):
        r["latency_ms"] = round(ms, 5)
        r["latency_speedup"] = round(full_ms / ms, 4)
    # The gated graph must pick the exit the simulation picks: check it on the timed samples.
    where = simulate([e[:n] for e in exit_logits], float(default), spec.criterion)
    got = np.array([int(gsess.run(None, {**{k: v[i:i + 1] for k, v in inputs.items()}})[1][0]) for i in range(n)])
    agreement = round(float((got == where).mean()), 6)
    if agreement < 1.0:
        notes.append(f"gated model chose the simulated exit on {agreement:.2%} of samples (confidence ties at "
                     "the threshold in float32)")
    exits_report = [{"name": name, "after_node": c.node, "value": c.value, "shape": list(c.shape),
                     "backbone_macs": c.macs, "head_macs": hm, "macs_fraction": round(cost / facts.total_macs, 4),
                     "holdout_accuracy": acc(e)}
                    for name, c, hm, cost, e in zip(layout.outputs, cuts, layout.head_macs, costs, exit_logits)]
    report = {
        "exits": exits_report,
        "segment_macs": np.diff([0, *(c.macs for c in cuts), facts.total_macs]).tolist(),
        "candidates": [c.node for c in facts.cuts],
        "classes": facts.classes,
        "criterion": spec.criterion,
        "metric": "accuracy" if labels is not None else "agreement with the final head (no labels)",
        "full": {"accuracy": full_acc, "macs": facts.total_macs, "latency_ms": round(full_ms, 5),
                 **({} if before is None else {"accuracy_before_training": before})},
        "thresholds": rows,
        "recommended_threshold": recommended,
        "max_accuracy_drop": spec.max_accuracy_drop,
        "gated_model": GATED_NAME,
        "gated_default_threshold": float(default),
        "gated_matches_simulation": agreement,
        "latency_samples": n,
        "freeze_backbone": spec.freeze_backbone,
        "distill": spec.distill or data.train.labels is None, "teacher": spec.teacher,
        "epochs": spec.epochs, "loss_per_epoch": [round(h, 6) for h in history], "training": history.summary(),
        "notes": notes + ["the step's model runs every head (outputs exit_1…): it is slower than the original; "
                          f"{GATED_NAME} is the fast one (batch 1, input 'threshold')"],
    }
    return StepResult(trained, report, {GATED_NAME: gated})
