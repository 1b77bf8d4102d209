"""Recovery training of a factored graph, shared by ``lowrank`` (optional) and ``depthwise_separable`` (default).

The rewrite keeps the graph's structure fixed; training moves only the values of its initializers (the
factors included), which are written back into the same ONNX graph (:func:`compression.training.finetune_onnx`).
"""
from __future__ import annotations

import onnx

from compression.context import StepContext
from compression.spec import FinetuneSpec
from compression.training import finetune_onnx


def recover(factored: onnx.ModelProto, ft: FinetuneSpec, ctx: StepContext, phase: str) -> tuple[onnx.ModelProto, dict]:
    """Fine-tune the rewritten graph in torch (labels and/or distillation from the original) and write the
    trained values back into it. Returns the model and ``{loss_per_epoch, notes, distill}``.

    Raises:
        InvalidSpec: no dataset.
        NotTrainable: the graph cannot be converted to torch.
    """
    done = finetune_onnx(factored, ft, ctx, why="fine-tuning", phase=phase)
    return done.model, {"loss_per_epoch": [round(h, 6) for h in done.losses], "notes": done.notes,
                        "distill": done.distill}
