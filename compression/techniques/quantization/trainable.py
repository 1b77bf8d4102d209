"""The ONNX → torch → ONNX round trip shared by QAT, centroid fine-tuning and binary/ternary training."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx
import torch
from torch import nn

from compression.context import StepContext
from compression.errors import InvalidSpec, NotTrainable
from compression.spec import FinetuneSpec
from compression.techniques.quantization.layers import WeightLayer
from compression.training import loss_config, teacher_outputs, train


@dataclass
class Trainable:
    """A converted module and, per ONNX weight, the live torch layer that holds it (torch layout)."""

    module: nn.Module
    layers: dict[str, nn.Module]  # weight initializer -> nn.Linear / nn.Conv*d
    untrainable: list[str]

    def channel_dim(self, weight: str) -> int:
        return 1 if isinstance(self.layers[weight], nn.modules.conv._ConvTransposeNd) else 0


def to_trainable(model: onnx.ModelProto, layers: list[WeightLayer]) -> Trainable:
    """Convert ``model`` and find the layer of each weight; weights not held by a layer are listed apart."""
    from compression.converter import UnsupportedOp, to_torch

    try:
        module = to_torch(model)
    except UnsupportedOp as e:
        raise NotTrainable(f"training needs a trainable model; unsupported ops: {e.op_types}") from None
    found, missing = {}, []
    for wl in layers:
        try:
            path, attr = module.tensor_name(wl.weight).rsplit(".", 1)
            layer = module.get_submodule(path)
        except (KeyError, AttributeError, ValueError):
            missing.append(wl.weight)
            continue
        if attr != "weight" or not isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)):
            missing.append(wl.weight)
            continue
        found[wl.weight] = layer
    return Trainable(module, found, missing)


def finetune(tr: Trainable, ft: FinetuneSpec, ctx: StepContext, *, phase: str,
             after_step: Callable[[], None] | None = None) -> tuple[list[float], list[str]]:
    """Train ``tr.module`` on the training split (CE and/or KD from the original); returns losses and notes.

    Raises:
        InvalidSpec: no dataset.
    """
    if ctx.data is None:
        raise InvalidSpec("this scheme trains: it needs a dataset", [{"loc": ["finetune"], "msg": "needs a dataset"}])
    data = ctx.data
    cfg, notes = loss_config(ft, data.train.labels is not None)
    teacher = teacher_outputs(ctx.original, data.train, ctx.threads) if cfg.distill else None

    def on_epoch(epoch: int, loss: float) -> None:
        ctx.progress(phase, 0.1 + 0.8 * (epoch + 1) / max(ft.epochs, 1), f"epoch {epoch + 1}/{ft.epochs}: loss {loss:.4f}")

    if ft.epochs == 0:
        return [], notes
    losses = train(tr.module, list(tr.module.input_names), data.train, epochs=ft.epochs, lr=ft.lr,
                   batch_size=ft.batch_size, loss=cfg, teacher=teacher, seed=ctx.seed, device=ctx.device,
                   after_step=after_step, on_epoch=on_epoch)
    tr.module.cpu()
    return losses, notes


def freeze_latent(layer: nn.Module) -> None:
    """Stop the optimizer from moving a parametrized weight's latent tensor (it is not used)."""
    layer.parametrizations.weight.original.requires_grad_(False)


def latent(layer: nn.Module) -> torch.Tensor:
    return layer.parametrizations.weight.original
