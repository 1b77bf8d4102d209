"""The converted module that QAT, centroid fine-tuning and binary/ternary training train, and the live
layer of each weight they quantize. The conversion and the fine-tuning are :mod:`compression.training`'s
(:func:`~compression.training.to_trainable`, :func:`~compression.training.finetune_onnx`)."""
from __future__ import annotations

from dataclasses import dataclass

import onnx
import torch
from torch import nn

from compression.techniques.quantization.layers import WeightLayer
from compression.training import to_trainable

WHY = "quantization training"  # what the errors say needs a dataset / a trainable model


@dataclass
class Trainable:
    """A converted module and, per ONNX weight, the live torch layer that holds it (torch layout)."""

    module: nn.Module
    layers: dict[str, nn.Module]  # weight initializer -> nn.Linear / nn.Conv*d
    untrainable: list[str]

    def channel_dim(self, weight: str) -> int:
        return 1 if isinstance(self.layers[weight], nn.modules.conv._ConvTransposeNd) else 0


def trainable_layers(model: onnx.ModelProto, layers: list[WeightLayer]) -> Trainable:
    """Convert ``model`` and find the layer of each weight; weights not held by a layer are listed apart.

    Raises:
        NotTrainable: the graph cannot be converted to torch.
    """
    module = to_trainable(model, WHY)
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


def freeze_latent(layer: nn.Module) -> None:
    """Stop the optimizer from moving a parametrized weight's latent tensor (it is not used)."""
    layer.parametrizations.weight.original.requires_grad_(False)


def latent(layer: nn.Module) -> torch.Tensor:
    return layer.parametrizations.weight.original
