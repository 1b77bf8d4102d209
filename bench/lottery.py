"""Issue 3, benchmark 4 — lottery tickets (Frankle & Carbin 2019) on LeNet-300-100.

Iterative magnitude pruning, 20% of the surviving weights per round; after each round the survivors are
reset to the *uploaded initial weights* (``rewind: init``) or to a *fresh random init* with the same mask
(``rewind: random``, the control of Liu et al. 2019), then retrained. Accuracy at 51%, 21%, 8% and 3.6%
of the weights kept (rounds 3, 7, 11, 15).

    python -m bench.lottery
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import onnx
import torch

from bench.pruning_common import accuracy, apply, mnist_split
from bench.report import write_section
from testkit.refdata import fit
from testkit.zoo import LeNet300100, export_onnx

ROUNDS = 15  # 0.8 ** 15 = 3.5% kept
TRAIN = dict(epochs=6, lr=1.2e-3, batch_size=64)
MARKS = {3: "51%", 7: "21%", 11: "8.6%", 15: "3.5%"}


def main() -> None:
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="bench-lt-"))
    Xtr, ytr, Xte, yte, data = mnist_split(flatten=True)
    torch.manual_seed(0)
    net = LeNet300100()
    init = onnx.load(str(export_onnx(net, torch.zeros(2, 784), work / "init.onnx", dynamo=False)))
    fit(net, Xtr, ytr, epochs=TRAIN["epochs"], lr=TRAIN["lr"])
    trained = onnx.load(str(export_onnx(net, torch.zeros(2, 784), work / "trained.onnx", dynamo=False)))
    dense = accuracy(trained, Xte, yte)
    sparsity = 1 - 0.8 ** ROUNDS
    results, times = {}, {}
    for rewind in ("init", "random"):
        step = {"method": "prune", "granularity": "weight", "sparsity": sparsity, "iterations": ROUNDS,
                "scope": "layer", "rewind": rewind, "finetune": TRAIN}
        if rewind == "init":
            step["rewind_model_id"] = "init"
        t = time.perf_counter()
        res = apply(step, trained, data, models={"init": init})
        times[rewind] = time.perf_counter() - t
        results[rewind] = {r["round"]: r for r in res.report["rounds"]}
    rows = [f"| dense (trained {TRAIN['epochs']} epochs) | 100% | {dense:.4f} | {dense:.4f} | – |"]
    wins = 0
    for rnd in range(1, ROUNDS + 1):
        a, b = results["init"][rnd], results["random"][rnd]
        mark = f" ({MARKS[rnd]})" if rnd in MARKS else ""
        rows.append(f"| round {rnd}{mark} | {a['kept']:.1%} | {a['accuracy']:.4f} | {b['accuracy']:.4f} | "
                    f"{100 * (a['accuracy'] - b['accuracy']):+.2f} |")
        wins += rnd in MARKS and a["accuracy"] > b["accuracy"]
    at = {k: results["init"][k]["accuracy"] for k in MARKS}
    body = (
        "**4. Lottery tickets — LeNet-300-100** (`prune granularity=weight rewind=init|random`, in-process). "
        f"20% of the surviving weights per layer pruned per round, {ROUNDS} rounds; every round retrains "
        f"{TRAIN['epochs']} epochs (Adam, lr {TRAIN['lr']}) on 4,000 MNIST images from the rewound weights; "
        "accuracy on the 1,000 unseen (the held-out split the step reports per round).\n\n"
        "| round | weights kept | winning ticket (rewind to init) | random re-init, same mask | Δ pt |\n"
        "|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        f"Tickets beat the random re-init at {wins} of the 4 marked sparsities. Tickets vs dense "
        f"({dense:.4f}): " + ", ".join(f"{MARKS[k]}: {v - dense:+.4f}" for k, v in at.items())
        + f". Paper: tickets at 10–20% kept match or beat the dense net. Wall time: {times['init']:.0f} s (init), "
        f"{times['random']:.0f} s (random)."
    )
    write_section("lottery", body)
    print(body)


if __name__ == "__main__":
    main()
