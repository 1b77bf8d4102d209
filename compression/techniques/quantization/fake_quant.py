"""Torch parametrizations of layer weights for the training-based schemes, and activation fake-quant.

They are registered with ``torch.nn.utils.parametrize`` on the converter's ``nn.Linear``/``nn.Conv*d``
weights, so the module computes with the quantized weight while the optimizer updates what the scheme
trains (latent float weights, or the centroids). ``OnnxModule.write_back`` reads ``layer.weight``, i.e.
the parametrized value: what is written back is exactly what the model computed with.
"""
from __future__ import annotations

import torch
from torch import nn


def _reduce_dims(w: torch.Tensor, channel_dim: int) -> tuple[int, ...]:
    return tuple(d for d in range(w.dim()) if d != channel_dim)


class ClusterWeight(nn.Module):
    """``weight = codebook[codes]``; the centroids train (their gradient is the sum over their cluster).

    With ``zero_centroid`` the first entry is a constant 0.0 that never moves, so pruned weights stay 0.
    """

    def __init__(self, codebook: torch.Tensor, codes: torch.Tensor, zero_centroid: bool) -> None:
        super().__init__()
        self.zero_centroid = zero_centroid
        free = codebook[1:] if zero_centroid else codebook
        self.centroids = nn.Parameter(free.clone().float())
        self.register_buffer("codes", codes.long())

    def codebook(self) -> torch.Tensor:
        if self.zero_centroid:
            return torch.cat([self.centroids.new_zeros(1), self.centroids])
        return self.centroids

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.codebook()[self.codes].to(latent.dtype)


class SignWeight(nn.Module):
    """BinaryConnect / TWN weights with a per-channel scale α and a straight-through estimator.

    binary: ``α·sign(W)``, α = mean |W| per output channel (sign(0) = +1).
    ternary: ``α·sign(W)·[|W| > Δ]``, Δ = ``threshold``·mean |W| and α = mean |W| above Δ, per channel;
    ``mask`` (pruned zeros) forces weights to 0 for good.
    The gradient passes straight through to the latent float weights, which the trainer clips.
    """

    def __init__(self, kind: str, channel_dim: int, threshold: float = 0.7, mask: torch.Tensor | None = None) -> None:
        super().__init__()
        if kind not in ("binary", "ternary"):
            raise ValueError(kind)
        self.kind, self.channel_dim, self.threshold = kind, channel_dim, threshold
        self.register_buffer("mask", mask if mask is not None else torch.ones(0))

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        dims = _reduce_dims(w, self.channel_dim)
        a = w.abs()
        sign = torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
        if self.kind == "binary":
            alpha = a.mean(dims, keepdim=True)
            return alpha * sign
        m = self.mask if self.mask.numel() else torch.ones_like(w)
        n = m.sum(dims, keepdim=True).clamp(min=1)
        delta = self.threshold * (a * m).sum(dims, keepdim=True) / n
        keep = (a > delta).to(w.dtype) * m
        alpha = (a * keep).sum(dims, keepdim=True) / keep.sum(dims, keepdim=True).clamp(min=1)
        return alpha * sign * keep

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        q = self.quantize(latent.detach())
        # straight-through: dL/dW = dL/dq, and the value is exactly q (W - W.detach() is exactly 0)
        return q + (latent - latent.detach())


class FakeQuantWeight(nn.Module):
    """Per-channel symmetric int8 fake quantization (scale = max|W| / 127), as ORT's QDQ weights are."""

    def __init__(self, channel_dim: int | None) -> None:
        super().__init__()
        self.channel_dim = channel_dim  # None: one scale for the whole tensor

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.channel_dim is None:
            scale = max(float(w.detach().abs().max()) / 127.0, 1e-12)
            return torch.fake_quantize_per_tensor_affine(w, scale, 0, -127, 127)
        dims = _reduce_dims(w, self.channel_dim)
        scale = (w.detach().abs().amax(dims) / 127.0).clamp(min=1e-12).float()
        zp = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zp, self.channel_dim, -127, 127)


class ActivationFakeQuant(nn.Module):
    """Asymmetric uint8 fake quantization of a layer's input with a moving-average min/max (range holds 0).

    This is what ONNX Runtime's static QDQ does to the activations feeding Conv/Gemm/MatMul.
    """

    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            return x
        if self.training:
            with torch.no_grad():
                lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
                if bool(self.seen):
                    self.lo.mul_(self.momentum).add_((1 - self.momentum) * lo)
                    self.hi.mul_(self.momentum).add_((1 - self.momentum) * hi)
                else:
                    self.lo.copy_(lo)
                    self.hi.copy_(hi)
                    self.seen.fill_(True)
        if not bool(self.seen):
            return x
        scale = float(((self.hi - self.lo) / 255.0).clamp(min=1e-8))
        zp = int(round(float(-self.lo) / scale))
        return torch.fake_quantize_per_tensor_affine(x, scale, max(0, min(255, zp)), 0, 255)
