"""Recovery training of a factored graph, shared by ``lowrank`` (optional) and ``depthwise_separable`` (default).

The rewrite keeps the graph's structure fixed; training moves only the values of its initializers (the
factors included), which are written back into the same ONNX graph.
"""
from __future__ import annotations

import onnx

from compression.context import StepContext
from compression.errors import InvalidSpec, NotTrainable
from compression.spec import FinetuneSpec
from compression.training import loss_config, teacher_outputs, train


def recover(factored: onnx.ModelProto, ft: FinetuneSpec, ctx: StepContext, phase: str) -> tuple[onnx.ModelProto, dict]:
    """Fine-tune the rewritten graph in torch (labels and/or distillation from the original) and write the
    trained values back into it. Returns the model and ``{loss_per_epoch, notes, distill}``.

    Raises:
        InvalidSpec: no dataset.
        NotTrainable: the graph cannot be converted to torch.
    """
    from compression.converter import UnsupportedOp, to_torch

    data = ctx.data
    if data is None:
        raise InvalidSpec("fine-tuning needs a dataset", [{"loc": ["finetune"], "msg": "needs a dataset"}])
    try:
        module = to_torch(factored)
    except UnsupportedOp as e:
        raise NotTrainable(f"fine-tuning needs a trainable model; unsupported ops: {e.op_types}") from None
    cfg, notes = loss_config(ft, data.train.labels is not None)
    teacher = teacher_outputs(ctx.original, data.train, ctx.threads) if cfg.distill else None

    def on_epoch(epoch: int, loss: float) -> None:
        ctx.progress(phase, (epoch + 1) / ft.epochs, f"fine-tune epoch {epoch + 1}/{ft.epochs}: loss {loss:.4f}")

    history = train(module, list(module.input_names), data.train, epochs=ft.epochs, lr=ft.lr,
                    batch_size=ft.batch_size, loss=cfg, teacher=teacher, seed=ctx.seed, device=ctx.device,
                    on_epoch=on_epoch)
    module.cpu()
    return module.write_back(factored), {"loss_per_epoch": [round(h, 6) for h in history], "notes": notes,
                                         "distill": cfg.distill}
