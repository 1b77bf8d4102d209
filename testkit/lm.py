"""A byte-level GPT trained here on text that ships with Python and Debian, for language-model tests and benches.

No tokenizer and no hub: the vocabulary is the 256 byte values, the architecture is
:class:`testkit.architectures.GPT` (plain ``nn.Linear``, ``LayerNorm``, causal attention), and the text is
Python's help topics (``pydoc_data.topics``, ~465k characters) with Debian's license texts as a second
source (:func:`testkit.real_zoo.text_corpus`). Training is seeded and one-threaded, so a given config gives
the same model on every run; :func:`trained_gpt` caches the weights under the folder given.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from testkit.architectures import GPT
from testkit.real_zoo import text_corpus
from testkit.refdata import torch_threads
from testkit.zoo import export_onnx


@dataclass(frozen=True)
class GPTConfig:
    """Model size and training budget (steps of ``batch`` windows of ``seq`` bytes, AdamW, cosine decay)."""

    dim: int = 128
    depth: int = 6
    heads: int = 4
    seq: int = 128
    steps: int = 300
    batch: int = 32
    lr: float = 3e-3
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def byte_windows(n: int, length: int, *, seed: int, sources: tuple[int, ...] = (0, 1, 2, 3),
                 part: str = "train") -> np.ndarray:
    """``n`` windows of ``length`` bytes (int64 ids) drawn from the given corpus sources.

    Each source is cut in two: the first 90% is ``part="train"``, the last 10% ``"heldout"``, so a model
    trained on one part is measured on text it has not seen."""
    corpus = [text_corpus()[s] for s in sources]
    rng = np.random.default_rng(seed)
    out = np.empty((n, length), np.int64)
    for i in range(n):
        text = corpus[i % len(corpus)]
        cut = int(len(text) * 0.9)
        lo, hi = (0, cut) if part == "train" else (cut, len(text))
        start = int(rng.integers(lo, hi - length))
        out[i] = np.frombuffer(text[start:start + length], np.uint8)
    return out


def train_gpt(cfg: GPTConfig) -> GPT:
    """Train a byte-level GPT on the training part of the corpus (one thread: deterministic)."""
    torch.manual_seed(cfg.seed)
    model = GPT(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, max_len=cfg.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    data = torch.from_numpy(byte_windows(cfg.steps * cfg.batch, cfg.seq + 1, seed=cfg.seed))
    model.train()
    with torch_threads(1):
        for step in range(cfg.steps):
            ids = data[step * cfg.batch:(step + 1) * cfg.batch]
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    return model.eval()


def trained_gpt(cfg: GPTConfig, cache: Path) -> GPT:
    """:func:`train_gpt`, with the weights cached under ``cache`` by the config's hash."""
    path = Path(cache) / f"gpt-{cfg.key()}.pt"
    model = GPT(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, max_len=cfg.seq)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = train_gpt(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def export_gpt(model: GPT, path: Path, *, dynamo: bool = True, seq: int = 128) -> Path:
    """The GPT as ONNX (``input_ids [N, T]`` int64 → ``logits [N, T, 256]``), dynamic batch."""
    example = torch.zeros((2, seq), dtype=torch.int64)
    return export_onnx(model, example, path, dynamo=dynamo, input_names=["input_ids"], output_names=["logits"])


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp of the mean next-token cross-entropy of ``logits[:, :-1]`` against ``ids[:, 1:]`` (float64)."""
    logp = _log_softmax(logits[:, :-1])
    nll = -np.take_along_axis(logp, ids[:, 1:, None], -1)
    return float(np.exp(nll.mean()))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def lm_fidelity(logits: np.ndarray, reference: np.ndarray, ids: np.ndarray) -> dict[str, float]:
    """What a test or bench computes itself, to check the service's numbers: next-token top-1 agreement
    with the reference model (every position) and mean KL(reference ‖ model) per position, in nats."""
    agree = float((logits.argmax(-1) == reference.argmax(-1)).mean())
    lp, lq = _log_softmax(reference), _log_softmax(logits)
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    return {"token_agreement": agree, "kl": kl, "perplexity": perplexity(logits, ids)}
