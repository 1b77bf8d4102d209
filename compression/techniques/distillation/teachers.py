"""The teachers of a distillation step: model ids resolved in the team's store, and their outputs on the data.

Several teachers are an ensemble; :func:`run_teachers` refuses one that does not run on the dataset or whose
output shape differs from the others', naming it, before anything is trained.
"""
from __future__ import annotations

import numpy as np
import onnx

from compression.context import StepContext
from compression.data import DataSplit
from compression.errors import InvalidSpec
from compression.training import teacher_targets


def resolve_model(ctx: StepContext, model_id: str, loc: list) -> onnx.ModelProto:
    """The model a spec names by id (a teacher or the student), refused at ``loc`` when it cannot be found.

    Raises:
        InvalidSpec: no model store in this context, or no such model in the team.
    """
    if ctx.load_model is None:
        raise InvalidSpec(f"model id {model_id!r} cannot be resolved here (no model store)",
                          [{"loc": loc, "msg": "cannot resolve model ids"}])
    try:
        return ctx.load_model(model_id)
    except KeyError:
        raise InvalidSpec(f"no model {model_id!r} in this team", [{"loc": loc, "msg": "model not found"}]) from None


def run_teachers(teachers: list[onnx.ModelProto], names: list[str], data: DataSplit,
                 threads: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each teacher's first output on the training and on the held-out split (probabilities as
    log-probabilities: :func:`compression.training.teacher_targets`).

    Args:
        teachers: the teacher models.
        names: how the spec names them (``"original"`` or ids), for the error messages.
        data: the dataset.
        threads: ONNX Runtime intra-op threads.

    Returns:
        ``(train_outputs, holdout_outputs)``, one array per teacher each.

    Raises:
        InvalidSpec: a teacher does not run on the dataset, or the teachers disagree on the output shape.
    """
    train_outs, hold_outs = [], []
    for i, t in enumerate(teachers):
        try:
            train_outs.append(teacher_targets(t, data.train, threads))
            hold_outs.append(teacher_targets(t, data.holdout, threads))
        except Exception as e:
            raise InvalidSpec(f"teacher {names[i]!r} does not run on the dataset: {str(e)[:300]}",
                              [{"loc": ["teachers", i], "msg": "does not run on the dataset"}]) from None
    shapes = {o.shape[1:] for o in train_outs}
    if len(shapes) != 1:
        raise InvalidSpec(f"teachers disagree on the output shape: {sorted(map(list, shapes))}",
                          [{"loc": ["teachers"], "msg": "output shapes differ"}])
    return train_outs, hold_outs
