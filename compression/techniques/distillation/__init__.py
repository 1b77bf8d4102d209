"""Knowledge distillation (Hinton et al. 2015): a student learns from one or more teachers' outputs.

Class scores: ``(1 - alpha)·KL(softmax(t/T) ‖ softmax(s/T))·T² + alpha·CE(s, y)`` (CE only when the
dataset has labels). Models that end in a Softmax are distilled on log-probabilities, never on their
probabilities as if they were logits (:mod:`compression.training`); Sigmoid outputs use MSE.
Several teachers are an ensemble: the target is the *average of their softened
distributions*. Outputs that are not class scores (embeddings, regressions) use MSE or cosine to the
(mean) teacher output. The student is the current model of the pipeline (prune → distill recovers a
pruned model) or an uploaded one (``student_model_id``); teachers are ``"original"`` and/or model ids
(:mod:`.teachers`). The losses and the training loop are :mod:`compression.training`'s, which the recovery
training of other families shares.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import ClassVar, Literal

import numpy as np
import onnx
from pydantic import Field, field_validator, model_validator

from compression.batchnorm import Reinserted, reinserted_batchnorm
from compression.context import StepContext, StepResult
from compression.converter import OnnxModule
from compression.data import Arrays
from compression.errors import InvalidSpec
from compression.metrics import top1_accuracy
from compression.registry import register_technique
from compression.spec import AUTO_EPOCHS, AUTO_STEPS, RecoveryOptions, auto_epochs
from compression.step_spec import Passes, StepSpec
from compression.techniques.distillation.teachers import resolve_model, run_teachers
from compression.augment import augmenter_for
from compression.training import (LossConfig, Recipe, Teacher, Validation, as_log_probs, carve_validation,
                                  ensemble_targets, output_kind, predict, to_trainable, train)

ORIGINAL = "original"


class DistillSpec(RecoveryOptions, StepSpec):
    model_ref_fields: ClassVar[dict[str, frozenset[str]]] = {"teachers": frozenset({ORIGINAL}),
                                                              "student_model_id": frozenset()}
    method: Literal["distill"] = "distill"
    teachers: list[str] = Field(default_factory=lambda: [ORIGINAL], min_length=1, max_length=8,
                                description='"original" and/or model ids; several = an ensemble')
    student_model_id: str | None = Field(None, description="an uploaded student; default: the pipeline's current model")
    temperature: float = Field(4.0, gt=0, le=100)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of CE on labels (when the dataset has labels)")
    epochs: int | Literal["auto"] = Field("auto", description="the most epochs (early stopping on the validation "
                                          f"slice may end sooner); auto: about {AUTO_STEPS} optimizer steps, "
                                          f"{AUTO_EPOCHS[0]}–{AUTO_EPOCHS[1]} epochs by the dataset's size")

    @field_validator("epochs")
    @classmethod
    def _epochs(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 1000:
            raise ValueError("epochs must be between 1 and 1000, or 'auto'")
        return v

    def planned_epochs(self, train_n: int | None) -> int:
        """The epoch count for a training split of ``train_n`` samples (:func:`~compression.spec.auto_epochs`)."""
        return auto_epochs(train_n, self.batch_size) if self.epochs == "auto" else int(self.epochs)
    lr: float = Field(1e-3, gt=0, le=10)
    batch_size: int = Field(64, ge=1, le=65536)
    loss: Literal["auto", "kl", "mse", "cosine"] = Field(
        "auto", description="distillation term: auto = KL·T² for class scores, MSE for other outputs"
    )
    batchnorm: Literal["auto", "off"] = Field(
        "auto", description="re-insert BatchNorm after the student's convs that come without it, for training only, "
                            "folded back on export (the student's graph keeps its nodes)")

    @model_validator(mode="after")
    def _check(self) -> "DistillSpec":
        if len(set(self.teachers)) != len(self.teachers):
            raise ValueError("teachers must be distinct")
        if any(not t.strip() for t in self.teachers):
            raise ValueError("teacher ids must not be empty")
        return self

    @property
    def trains(self) -> bool:
        return True  # the student, for ``epochs`` (at least 1)

    @property
    def needs_data(self) -> bool:
        return True  # inputs to run the teachers on; labels are optional

    def forward_passes(self, train_n: int) -> Passes:
        epochs = self.planned_epochs(train_n)
        return Passes(train=3 * epochs * train_n, infer=epochs * train_n * len(self.teachers))


@register_technique("distill", DistillSpec, phase="distilling")
def distill(model: onnx.ModelProto, spec: DistillSpec, ctx: StepContext) -> StepResult:
    """Train a student on its teachers' (softened, averaged) outputs, plus labels when there are any.

    Args:
        model: the current model of the pipeline (the student unless ``student_model_id``).
        spec: teachers, student, temperature, alpha, epochs, lr, batch_size, loss.
        ctx: the dataset (labels optional), the original model, ``load_model`` for ids, progress.

    Returns:
        StepResult with the trained student; the report holds each teacher's and the ensemble's held-out
        accuracy, the student's before and after, and the loss per epoch.

    Raises:
        InvalidSpec: no dataset, an unknown model id, a student whose inputs/outputs do not match the
            teachers', or ``loss: kl`` on outputs that are not class scores.
        NotTrainable: the student's graph cannot be made trainable.

    Example:
        >>> distill(model, DistillSpec(teachers=["original"], temperature=4), ctx).report["teachers"]  # doctest: +SKIP
    """
    data = ctx.data
    if data is None:
        raise InvalidSpec("distillation needs a dataset (labels optional)", [{"loc": ["method"], "msg": "needs a dataset"}])
    student_model = model
    if spec.student_model_id:
        student_model = resolve_model(ctx, spec.student_model_id, ["student_model_id"])
    teachers = [ctx.original if t == ORIGINAL else resolve_model(ctx, t, ["teachers", i]) for i, t in enumerate(spec.teachers)]
    student = to_trainable(student_model, "distilling into the student")
    names = list(student.input_names)
    missing = [n for n in names if n not in data.train.inputs]
    if missing:
        raise InvalidSpec(f"the student's inputs {missing} are not in the dataset",
                          [{"loc": ["student_model_id"], "msg": "inputs do not match the dataset"}])
    ctx.progress("distilling", 0.0, f"running {len(teachers)} teacher(s)")
    train_outs, hold_outs = run_teachers(teachers, spec.teachers, data, ctx.threads)
    kind = output_kind(student_model)
    class_scores = train_outs[0].ndim == 2 and train_outs[0].shape[1] > 1 and kind != "sigmoid"
    if spec.loss == "kl" and not class_scores:
        raise InvalidSpec(f"loss 'kl' needs class scores [N, C]; the output is {list(train_outs[0].shape[1:])}: "
                          "use mse or cosine", [{"loc": ["loss"], "msg": "output is not class scores"}])
    before = predict(student, names, data.holdout, device=ctx.device)
    if before.shape[1:] != train_outs[0].shape[1:]:
        raise InvalidSpec(f"student output shape {list(before.shape[1:])} differs from the teachers' "
                          f"{list(train_outs[0].shape[1:])}", [{"loc": ["student_model_id"], "msg": "output shape differs"}])
    hold_target = ensemble_targets(hold_outs, spec.temperature, class_scores)
    labels = data.train.labels if class_scores else None
    cfg = LossConfig(use_labels=labels is not None, distill=True, temperature=spec.temperature, alpha=spec.alpha,
                     kd_loss=spec.loss, output=kind)
    train_split, val = carve_validation(data.train, spec.validation, ctx.seed)
    teacher = Teacher(teachers, spec.temperature, ctx.threads)
    epochs = spec.planned_epochs(train_split.samples)
    augment = augmenter_for(spec.augment, train_split, distilling=True, epochs=epochs)
    recipe = Recipe.of(spec, epochs=epochs, lr=spec.lr, batch_size=spec.batch_size, augment=augment)
    validation = Validation(val, teacher(val.inputs)) if val is not None else None

    def on_epoch(epoch: int, loss: float) -> None:
        ctx.progress("distilling", (epoch + 1) / epochs, f"epoch {epoch + 1}/{epochs}: loss {loss:.4f}")

    with _batchnorm(student, train_split, spec.batchnorm, ctx.device) as bn:  # folded back on exit
        history = train(student, names, train_split, epochs=epochs, lr=spec.lr, batch_size=spec.batch_size,
                        loss=cfg, teacher=teacher, seed=ctx.seed, device=ctx.device, on_epoch=on_epoch,
                        recipe=recipe, validation=validation)
    student.cpu()
    after = predict(student, names, data.holdout)
    out = student.write_back(student_model)
    hl = data.holdout.labels
    notes = [bn.note()] if bn.note() else []
    if val is None and spec.validation > 0:
        notes.append(f"no validation slice ({data.train.samples} training samples are too few): the last epoch is kept")
    if data.train.labels is None:
        notes.append("dataset has no labels: the student learned from the teachers alone")
    elif not class_scores:
        notes.append("outputs are not class scores: labels unused")
    report = {
        "teachers": [{"teacher": name, "holdout_accuracy": top1_accuracy(o, hl)} for name, o in zip(spec.teachers, hold_outs)],
        "ensemble": len(teachers) > 1,
        "ensemble_holdout_accuracy": top1_accuracy(hold_target, hl) if len(teachers) > 1 else None,
        "student": spec.student_model_id or "pipeline model",
        "student_holdout_accuracy_before": top1_accuracy(before, hl),
        "student_holdout_accuracy_after": top1_accuracy(after, hl),
        "loss": ("kl" if class_scores else "mse") if spec.loss == "auto" else spec.loss,
        "class_scores": class_scores, "labels_used": cfg.use_labels, "output": kind,
        "temperature": spec.temperature, "alpha": spec.alpha if cfg.use_labels else 0.0,
        "epochs": epochs, "loss_per_epoch": [round(h, 6) for h in history], "notes": notes,
        "training": history.summary(),
    }
    if not class_scores:  # the teachers' probabilities are log-probabilities here: compare like with like
        a, b = as_log_probs(after, kind).reshape(len(after), -1), hold_target.reshape(len(hold_target), -1)
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        report["student_teacher_cosine"] = round(float(cos.mean()), 6)
    return StepResult(out, report)


def _batchnorm(student: OnnxModule, train_split: Arrays, mode: str, device: str) -> AbstractContextManager[Reinserted]:
    """:func:`compression.batchnorm.reinserted_batchnorm` for ``auto``; an empty report for ``off``."""
    return reinserted_batchnorm(student, train_split, device=device) if mode == "auto" else nullcontext(Reinserted())
