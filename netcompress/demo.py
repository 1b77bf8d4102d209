"""``netcompress demo``: a real model, compressed by the running service, with a result worth showing.

It trains a small BatchNorm CNN for a few seconds on handwritten digits (UCI's "Optical Recognition of
Handwritten Digits" test set, the copy scikit-learn ships as ``load_digits``; 1,797 8×8 images, CC BY 4.0,
shipped in this package as ``netcompress/data/digits.csv.gz`` so the demo needs nothing beyond netcompress),
exports it to ONNX, uploads it with the digits, and runs :data:`RECIPE` — halve every conv's channels,
recover by distillation from the original, then static int8 — and prints the service's verdict and metrics
table, with every artifact downloaded into ``./demo/``.

The original is trained only on the part of the data the service trains on: :func:`compression.data.split`
with the service's default seed gives the same held-out fifth, which neither model has seen, so the
accuracy the table reports for both is honest.
"""
from __future__ import annotations

import argparse
import gzip
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

SIZE = 32  # the 8×8 digits are upsampled ×4: a CNN with real work per image (latency well above ORT's
# per-run overhead, so the speed-up measured is the model's), still seconds to train
INPUT = "image"
# The recipe: channel pruning is what makes a CNN faster (fewer MACs in dense kernels); distillation from
# the original recovers the accuracy; static int8 then makes the file ~4× smaller again.
RECIPE: dict[str, Any] = {"steps": [
    {"method": "prune", "granularity": "channel", "sparsity": 0.5, "finetune": {"epochs": 8, "distill": True}},
    {"method": "quantize", "scheme": "int8", "mode": "static"},
]}


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)``: X float32 in [0, 1], shape [1797, 1, SIZE, SIZE] (bilinear ×2); y int64 labels 0–9."""
    raw = resources.files("netcompress").joinpath("data/digits.csv.gz").read_bytes()
    table = np.loadtxt(gzip.decompress(raw).decode().splitlines(), delimiter=",", dtype=np.float32)
    x = torch.from_numpy(table[:, :64].reshape(-1, 1, 8, 8) / 16.0)
    x = nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return np.ascontiguousarray(x.numpy()), table[:, 64].astype(np.int64)


class DigitsCNN(nn.Module):
    """Four 3×3 conv + BatchNorm + ReLU layers (32→64 channels, two strided), global pooling, a linear head:
    the shape of a small production CNN, ~29M MACs per 32×32 image."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        w = width
        self.features = nn.Sequential(*block(1, w, 1), *block(w, 2 * w, 2), *block(2 * w, 2 * w, 1),
                                      *block(2 * w, 4 * w, 2), *block(4 * w, 4 * w, 1))
        self.head = nn.Linear(4 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def train(x: np.ndarray, y: np.ndarray, *, epochs: int = 12, seed: int = 0) -> DigitsCNN:
    """Adam with a one-cycle schedule and small random shifts; a few seconds on two CPU cores."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    steps = epochs * ((len(x) + 63) // 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xs), generator=gen).split(64):
            batch = xs[idx]
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            batch = torch.roll(batch, shifts=(dx, dy), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(batch), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def export(model: nn.Module, path: Path) -> Path:
    """The legacy TorchScript exporter (what most models in the wild came from), dynamic batch."""
    torch.onnx.export(model, (torch.zeros(2, 1, SIZE, SIZE),), str(path), dynamo=False, input_names=[INPUT],
                      output_names=["logits"], dynamic_axes={INPUT: {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17)
    return path


def build(out: Path) -> tuple[Path, Path, float]:
    """Train and export the demo model; write the dataset the service gets. Returns (model, data, accuracy
    of the torch model on the held-out part). The split is the service's own under the default ``eval``."""
    from compression.data import Arrays, split
    from compression.spec import EvalSpec

    x, y = load_digits()
    ev = EvalSpec()
    parts = split(Arrays({INPUT: x}, y), holdout=ev.holdout, seed=ev.seed, max_eval=ev.max_eval_samples)
    model = train(parts.train.inputs[INPUT], parts.train.labels)
    acc = accuracy(model, parts.holdout.inputs[INPUT], parts.holdout.labels)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = export(model, out / "digits_cnn.onnx")
    data_path = out / "digits.npz"
    np.savez_compressed(data_path, **{INPUT: x, "labels": y})
    return onnx_path, data_path, acc


def cmd_demo(args: argparse.Namespace) -> int:
    """Build, upload, compress, report, download."""
    from client.cli import _client, _console, print_job

    out = Path(args.out)
    console = _console()
    t0 = time.monotonic()
    with _client(args) as nc:
        nc.models(limit=1)  # an unreachable service or a wrong key fails now, not after the training
        console.print("demo: training a small BatchNorm CNN on handwritten digits (a few seconds) ...")
        onnx_path, data_path, acc = build(out)
        console.print(f"demo: trained, {acc:.1%} on the held-out fifth; model in {onnx_path}")
        model = nc.upload_model(onnx_path, name="demo digits CNN")
        data = nc.upload_dataset(data_path, name="demo digits")
        job = nc.submit(model, RECIPE, data, name="demo: channel prune 50% + distill + int8")
        console.print(f"demo: job {job.id}: prune half the channels, distill from the original, int8")
        job.wait(progress=True, check=False)
        print_job(job)
        if job.status == "succeeded":
            job.download(out)
            console.print(f"demo: artifacts in {out}/ ({time.monotonic() - t0:.0f} s in all)")
            recipe = out / "recipe.yaml"
            recipe.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
            console.print(f"now your own model:  netcompress submit model.onnx --images DIR --spec {recipe} "
                          "--wait --out out/")
    return 0 if job.status == "succeeded" else 1
