"""The architectures ML teams bring, written in plain torch (no torchvision, no timm, no downloads).

Each is the real topology at a CI-sized width: the blocks a converter, a dependency graph or a quantizer
must get through are the ones the famous models have (basic and bottleneck residuals, inverted residuals
with depthwise convs, hard-swish and squeeze-excite, SiLU MBConv, ConvNeXt's 7×7 depthwise + LayerNorm +
GELU, ViT attention, YOLOv8's C2f/SPPF/FPN-PAN/decoupled head with DFL, UNet's skip concats and
ConvTranspose, a CRNN's BiLSTM over a conv feature map, BERT and GPT blocks). What makes each one
*small* is width and resolution, never a missing block.

:mod:`testkit.real_zoo` builds them, trains the cheap ones on shipped data and exports them the ways
other tools do.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU
            ) -> nn.Sequential:
    """Conv (no bias) → BatchNorm → activation: the unit every CNN here is built from."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# -------------------------------------------------------------------- ResNet-18 / ResNet-50

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, width, 3, stride), conv_bn(width, width, 3, 1, act=None))
        self.short = (nn.Identity() if stride == 1 and cin == width
                      else conv_bn(cin, width, 1, stride, act=None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.short(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * 4
        self.body = nn.Sequential(conv_bn(cin, width, 1), conv_bn(width, width, 3, stride),
                                  conv_bn(width, out, 1, act=None))
        self.short = nn.Identity() if stride == 1 and cin == out else conv_bn(cin, out, 1, stride, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.short(x))


class ResNet(nn.Module):
    """ResNet (He et al.) for small (16×16 or 32×32) inputs: a 3×3 stem, four stages, global pool, one Linear."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], depths: list[int], width: int = 16,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, width, 3, 1)
        stages, cin = [], width
        for i, n in enumerate(depths):
            w = width * 2 ** i
            for j in range(n):
                stages.append(block(cin, w, 2 if j == 0 and i > 0 else 1))
                cin = w * block.expansion
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1))


def resnet18(num_classes: int = 10) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], 16, num_classes)


def resnet50(num_classes: int = 10) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], 8, num_classes)


# -------------------------------------------------------------------- MobileNetV2 / V3, EfficientNet

class SqueezeExcite(nn.Module):
    """Global pool → 1×1 reduce → act → 1×1 expand → gate → multiply (MobileNetV3, EfficientNet)."""

    def __init__(self, c: int, squeeze: int, act: type[nn.Module], gate: type[nn.Module]) -> None:
        super().__init__()
        self.reduce, self.act = nn.Conv2d(c, squeeze, 1), act()
        self.expand, self.gate = nn.Conv2d(squeeze, c, 1), gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


class InvertedResidual(nn.Module):
    """Expand 1×1 → depthwise k×k → (SE) → project 1×1 (linear), residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, k: int = 3,
                 act: type[nn.Module] = nn.ReLU6, se: tuple[type[nn.Module], type[nn.Module]] | None = None) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1, act=act))
        layers.append(conv_bn(hidden, hidden, k, stride, groups=hidden, act=act))
        if se is not None:
            layers.append(SqueezeExcite(hidden, max(8, cin // 4), *se))
        layers.append(conv_bn(hidden, cout, 1, act=None))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNet(nn.Module):
    """MobileNetV2 (ReLU6), V3-style (hard-swish, SE with hard-sigmoid) or EfficientNet-style (SiLU, SE)."""

    def __init__(self, kind: str = "v2", num_classes: int = 10) -> None:
        super().__init__()
        act: type[nn.Module] = {"v2": nn.ReLU6, "v3": nn.Hardswish, "efficientnet": nn.SiLU}[kind]
        se = {"v2": None, "v3": (nn.ReLU, nn.Hardsigmoid), "efficientnet": (nn.SiLU, nn.Sigmoid)}[kind]
        k = 5 if kind != "v2" else 3
        # (expand, cout, repeats, stride): MobileNetV2's table at width 0.25, fewer repeats
        table = [(1, 8, 1, 1), (6, 16, 2, 2), (6, 24, 2, 2), (6, 32, 2, 2), (6, 48, 1, 1)]
        self.stem = conv_bn(3, 16, 3, 1, act=act)
        blocks, cin = [], 16
        for expand, cout, n, s in table:
            for j in range(n):
                blocks.append(InvertedResidual(cin, cout, s if j == 0 else 1, expand, k if expand != 1 else 3,
                                               act, se if expand != 1 else None))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn(cin, 128, 1, act=act)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


# -------------------------------------------------------------------- ConvNeXt, ViT

class ConvNeXtBlock(nn.Module):
    """7×7 depthwise → LayerNorm (channels last) → Linear ×4 → GELU → Linear → layer scale → residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.up, self.down = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.down(F.gelu(self.up(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, dims: tuple[int, ...] = (16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dims[0], 2, 2)
        layers: list[nn.Module] = []
        for i, d in enumerate(dims):
            if i:
                layers += [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], d, 2, 2)]
            layers += [ConvNeXtBlock(d), ConvNeXtBlock(d)]
        self.stages = nn.Sequential(*layers)
        self.norm, self.fc = nn.LayerNorm(dims[-1]), nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.stages(self.stem(x)).mean((2, 3))))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (ConvNeXt's downsampling norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Attention(nn.Module):
    """Multi-head self-attention written out (qkv Linear, per-head reshape, softmax, proj), as HF/timm do."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.dk = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, self.dk).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.dk)
        if bias is not None:
            scores = scores + bias
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, t, d)
        return self.proj(y)


class TransformerBlock(nn.Module):
    """Pre-norm (ViT, GPT) or post-norm (BERT) attention + GELU MLP block."""

    def __init__(self, dim: int, heads: int, pre_norm: bool = True) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.attn, self.n1, self.n2 = Attention(dim, heads), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.n1(x), bias)
            return x + self.fc2(F.gelu(self.fc1(self.n2(x))))
        x = self.n1(x + self.attn(x, bias))
        return self.n2(x + self.fc2(F.gelu(self.fc1(x))))


class ViT(nn.Module):
    """ViT-tiny-style: 4×4 patches of a 16×16 image, a class token, learned positions, pre-norm blocks."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, num_classes: int = 10, size: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (size // 4) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.patch(x).flatten(2).transpose(1, 2)
        y = torch.cat([self.cls.expand(y.shape[0], -1, -1), y], 1) + self.pos
        for b in self.blocks:
            y = b(y)
        return self.head(self.norm(y[:, 0]))


# -------------------------------------------------------------------- YOLOv8

def yolo_conv(cin: int, cout: int, k: int = 1, s: int = 1) -> nn.Sequential:
    """Ultralytics' ``Conv``: Conv → BN → SiLU."""
    return conv_bn(cin, cout, k, s, act=nn.SiLU)


class YoloBottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1, self.cv2, self.add = yolo_conv(c, c, 3), yolo_conv(c, c, 3), shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """Conv → Split in two → n bottlenecks on the second half, each output kept → Concat → Conv."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        self.c = cout // 2
        self.cv1 = yolo_conv(cin, 2 * self.c)
        self.m = nn.ModuleList(YoloBottleneck(self.c, shortcut) for _ in range(n))
        self.cv2 = yolo_conv((2 + n) * self.c, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).split((self.c, self.c), 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """Conv → three chained 5×5 max pools → Concat of all four → Conv."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.cv1, self.cv2 = yolo_conv(cin, cin // 2), yolo_conv(cin * 2, cout)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.pool(y[-1]))
        return self.cv2(torch.cat(y, 1))


class DFL(nn.Module):
    """Distribution focal loss decoding: softmax over ``reg_max`` bins, expectation by a fixed 1×1 conv."""

    def __init__(self, reg_max: int = 16) -> None:
        super().__init__()
        self.reg_max = reg_max
        self.conv = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(reg_max, dtype=torch.float32).view(1, reg_max, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.reg_max, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class YOLOv8(nn.Module):
    """YOLOv8-style detector for 64×64 images: backbone (C2f, SPPF), Upsample+Concat FPN/PAN neck,
    decoupled box (DFL) / class heads at strides 8, 16, 32, boxes decoded against the anchor grid, one
    output ``[N, 4 + classes, anchors]`` (xywh in pixels, class sigmoid) as Ultralytics exports it."""

    def __init__(self, num_classes: int = 4, w: int = 8, reg_max: int = 16, size: int = 64) -> None:
        super().__init__()
        self.nc, self.reg_max = num_classes, reg_max
        self.b0 = nn.Sequential(yolo_conv(3, w, 3, 2), yolo_conv(w, 2 * w, 3, 2), C2f(2 * w, 2 * w, 1))
        self.b1 = nn.Sequential(yolo_conv(2 * w, 4 * w, 3, 2), C2f(4 * w, 4 * w, 2))               # stride 8
        self.b2 = nn.Sequential(yolo_conv(4 * w, 8 * w, 3, 2), C2f(8 * w, 8 * w, 2))               # stride 16
        self.b3 = nn.Sequential(yolo_conv(8 * w, 16 * w, 3, 2), C2f(16 * w, 16 * w, 1), SPPF(16 * w, 16 * w))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n1, self.n2 = C2f(24 * w, 8 * w, 1, False), C2f(12 * w, 4 * w, 1, False)
        self.d1, self.n3 = yolo_conv(4 * w, 4 * w, 3, 2), C2f(12 * w, 8 * w, 1, False)
        self.d2, self.n4 = yolo_conv(8 * w, 8 * w, 3, 2), C2f(24 * w, 16 * w, 1, False)
        chans, c2, c3 = (4 * w, 8 * w, 16 * w), max(16, 4 * w // 4, reg_max * 4), max(4 * w, num_classes)
        self.box = nn.ModuleList(nn.Sequential(yolo_conv(c, c2, 3), yolo_conv(c2, c2, 3),
                                               nn.Conv2d(c2, 4 * reg_max, 1)) for c in chans)
        self.cls = nn.ModuleList(nn.Sequential(yolo_conv(c, c3, 3), yolo_conv(c3, c3, 3),
                                               nn.Conv2d(c3, num_classes, 1)) for c in chans)
        self.dfl = DFL(reg_max)
        anchors, strides = [], []
        for s in (8, 16, 32):
            g = size // s
            ys, xs = torch.meshgrid(torch.arange(g) + 0.5, torch.arange(g) + 0.5, indexing="ij")
            anchors.append(torch.stack([xs.flatten(), ys.flatten()], 0))
            strides.append(torch.full((1, g * g), float(s)))
        self.register_buffer("anchors", torch.cat(anchors, 1).unsqueeze(0))
        self.register_buffer("strides", torch.cat(strides, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.b1(self.b0(x))
        p4 = self.b2(p3)
        p5 = self.b3(p4)
        f4 = self.n1(torch.cat([self.up(p5), p4], 1))
        f3 = self.n2(torch.cat([self.up(f4), p3], 1))
        g4 = self.n3(torch.cat([self.d1(f3), f4], 1))
        g5 = self.n4(torch.cat([self.d2(g4), p5], 1))
        feats = [torch.cat([b(f), c(f)], 1) for f, b, c in zip((f3, g4, g5), self.box, self.cls)]
        y = torch.cat([f.flatten(2) for f in feats], 2)
        box, cls = y.split((4 * self.reg_max, self.nc), 1)
        lt, rb = self.dfl(box).chunk(2, 1)
        x1y1, x2y2 = self.anchors - lt, self.anchors + rb
        xywh = torch.cat([(x1y1 + x2y2) / 2, x2y2 - x1y1], 1) * self.strides
        return torch.cat([xywh, cls.sigmoid()], 1)


# -------------------------------------------------------------------- UNet, CRNN

class UNet(nn.Module):
    """Three-level UNet: double-conv encoder, ConvTranspose up, skip Concat, 1×1 head (mask logits)."""

    def __init__(self, w: int = 8, out_channels: int = 1) -> None:
        super().__init__()
        self.e1 = nn.Sequential(conv_bn(3, w), conv_bn(w, w))
        self.e2 = nn.Sequential(conv_bn(w, 2 * w), conv_bn(2 * w, 2 * w))
        self.mid = nn.Sequential(conv_bn(2 * w, 4 * w), conv_bn(4 * w, 4 * w))
        self.u2, self.d2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, 2), nn.Sequential(conv_bn(4 * w, 2 * w), conv_bn(2 * w, 2 * w))
        self.u1, self.d1 = nn.ConvTranspose2d(2 * w, w, 2, 2), nn.Sequential(conv_bn(2 * w, w), conv_bn(w, w))
        self.out = nn.Conv2d(w, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.e1(x)
        b = self.e2(F.max_pool2d(a, 2))
        c = self.mid(F.max_pool2d(b, 2))
        b = self.d2(torch.cat([self.u2(c), b], 1))
        return self.out(self.d1(torch.cat([self.u1(b), a], 1)))


class CRNN(nn.Module):
    """Text-line recogniser: conv backbone on ``[N, 1, 16, W]`` → height collapsed → BiLSTM → Linear →
    softmax over characters per time step, ``[N, T, classes]`` (CTC, blank = 0), as paddle2onnx writes it."""

    def __init__(self, classes: int = 11, w: int = 16, hidden: int = 32, rnn: str = "lstm") -> None:
        super().__init__()
        self.cnn = nn.Sequential(conv_bn(1, w), nn.MaxPool2d(2), conv_bn(w, 2 * w), nn.MaxPool2d(2),
                                 conv_bn(2 * w, 4 * w), nn.MaxPool2d((2, 1)), conv_bn(4 * w, 4 * w),
                                 nn.MaxPool2d((2, 1)))
        cell = nn.LSTM if rnn == "lstm" else nn.GRU
        self.rnn = cell(4 * w, hidden, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.cnn(x).squeeze(2).transpose(1, 2)  # [N, T, C]
        y, _ = self.rnn(f)
        return self.fc(y).softmax(-1)


# -------------------------------------------------------------------- BERT, GPT, a byte classifier

class BertClassifier(nn.Module):
    """BERT-style encoder (token + position embeddings, post-norm blocks, padding mask) with a [CLS] head."""

    def __init__(self, vocab: int = 256, dim: int = 64, depth: int = 2, heads: int = 4, max_len: int = 64,
                 num_classes: int = 4) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, pre_norm=False) for _ in range(depth))
        self.pool, self.head = nn.Linear(dim, dim), nn.Linear(dim, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.norm(self.tok(input_ids) + self.pos(positions))
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for b in self.blocks:
            x = b(x, bias)
        return self.head(torch.tanh(self.pool(x[:, 0])))


class GPT(nn.Module):
    """GPT-style byte-level decoder: causal pre-norm blocks, tied embeddings, logits ``[N, T, vocab]``."""

    def __init__(self, vocab: int = 256, dim: int = 64, depth: int = 2, heads: int = 4, max_len: int = 64) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("causal", torch.triu(torch.full((max_len, max_len), -10000.0), 1))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        x = self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device).unsqueeze(0))
        bias = self.causal[:t, :t]
        for b in self.blocks:
            x = b(x, bias)
        return self.head(self.norm(x))


class ByteClassifier(nn.Module):
    """File-type classifier over the first bytes of a file (tf2onnx's kind: integer inputs → embedding →
    Conv1d → global max → Linear)."""

    def __init__(self, num_classes: int = 4, dim: int = 16, length: int = 256) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, dim)
        self.conv1, self.conv2 = nn.Conv1d(dim, 32, 5, padding=2), nn.Conv1d(32, 32, 5, padding=2, stride=2)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, data: torch.Tensor) -> torch.Tensor:
        x = self.emb(data.long()).transpose(1, 2)
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.amax(2))
