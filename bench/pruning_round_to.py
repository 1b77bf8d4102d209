"""Issue 13: a default channel prune is never slower than the original where MACs fall — channel counts
rounded to multiples of 8 (``round_to``'s default) against unrounded (``round_to: 1``).

A 50% channel prune of a small BN CNN (SmallCNN, trained on MNIST) and of the zoo's ResNet-18, no
recovery (speed does not depend on it): MACs, and ONNX Runtime latency (1 thread, best of 5 medians) at
batch 1 and batch 32, original vs ``round_to: 1`` vs the default.

    python -m bench.pruning_round_to
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from bench.pruning_common import apply, latency_ms, mnist_split
from bench.report import write_section
from compression.analysis import macs
from compression.data import Arrays, split
from testkit import real_zoo
from testkit.refdata import fit
from testkit.zoo import SmallCNN, export_onnx


def _models(work: Path) -> list[tuple[str, onnx.ModelProto, dict[str, np.ndarray], object]]:
    Xtr, ytr, Xte, _, data = mnist_split(flatten=False)
    torch.manual_seed(0)
    net = fit(SmallCNN(), Xtr[:2000], ytr[:2000], epochs=2, lr=2e-3)
    cnn = onnx.load(str(export_onnx(net, torch.zeros(2, 1, 28, 28), work / "cnn.onnx", dynamo=False)))
    built = real_zoo.build("resnet18", "legacy17", work)
    zoo = split(Arrays(dict(built.inputs), built.labels), holdout=0.25, seed=0, max_eval=2000)
    return [("SmallCNN (BN, 16+32 conv channels)", cnn, {"input": Xte[:32]}, data),
            ("ResNet-18 (zoo, width 16)", onnx.load(str(built.path)), {"input": built.inputs["input"][:32]}, zoo)]


def _channels(model: onnx.ModelProto) -> int:
    inits = {t.name: t for t in model.graph.initializer}
    return sum(int(inits[n.input[1]].dims[0]) for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits)


def main() -> None:
    rows = ["| model | variant | conv channels | MACs | latency b1 (ms) | × | latency b32 (ms) | × |",
            "|---|---|---|---|---|---|---|---|"]
    misses = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, batch, data in _models(Path(tmp)):
            one = {k: v[:1] for k, v in batch.items()}
            base1, base32 = latency_ms(model, one, 200), latency_ms(model, batch, 40)
            rows.append(f"| {name} | original | {_channels(model)} | {macs(model, one):,} | {base1:.3f} | 1.00 | "
                        f"{base32:.3f} | 1.00 |")
            for label, extra in (("50% prune, round_to: 1", {"round_to": 1}), ("50% prune, default (round_to 8)", {})):
                spec = {"method": "prune", "granularity": "channel", "sparsity": 0.5, **extra}
                pruned = apply(spec, model, data).model
                l1, l32 = latency_ms(pruned, one, 200), latency_ms(pruned, batch, 40)
                rows.append(f"| {name} | {label} | {_channels(pruned)} | {macs(pruned, one):,} | {l1:.3f} | "
                            f"{base1 / l1:.2f} | {l32:.3f} | {base32 / l32:.2f} |")
                if not extra and (l1 > base1 or l32 > base32):
                    misses.append(f"{name}: the default prune is slower than the original "
                                  f"(b1 {base1 / l1:.2f}×, b32 {base32 / l32:.2f}×)")
    body = "\n".join(["### Channel counts and speed: round_to 8 by default (issue 13)", "",
                      "`python -m bench.pruning_round_to`. 50% channel prune, no recovery, ONNX Runtime 1 thread, "
                      "best of 5 medians; × = original latency / pruned latency (> 1 is faster).", "", *rows, "",
                      "Misses: " + ("; ".join(misses) if misses else "none — the default prune is faster than the "
                                    "original at batch 1 and batch 32 on both models.")])
    write_section("pruning_round_to", body)
    print(body)


if __name__ == "__main__":
    main()
