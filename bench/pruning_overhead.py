"""Issue 3, benchmark 5 — the service's overhead: torch-pruning called directly vs through the service.

Same model (the SmallCNN, trained), same data split, same budget (50% of channels per layer, 2 rounds, each
fine-tuned 2 epochs with distillation from the original). *Direct*: torch-pruning's MetaPruner on the
PyTorch module, a plain training loop, ``torch.onnx.export``. *Service*: ``POST /v1/jobs`` on
``netcompress serve`` (SQLite, filesystem broker, one worker), which also converts the ONNX upload,
proves each layer prunable, exports, and measures original, step and result.

    python -m bench.pruning_overhead
"""
from __future__ import annotations

import copy
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from bench.pruning_common import accuracy
from bench.report import write_section
from compression.analysis import count_params, macs
from compression.data import Arrays, split
from testkit.refdata import fit, mnist
from testkit.zoo import SmallCNN, export_onnx
from testkit.stack import start_embedded, wait_job

SPARSITY, ROUNDS, EPOCHS, LR, BATCH, T, ALPHA = 0.5, 2, 2, 1e-3, 64, 4.0, 0.5


def _direct(net: torch.nn.Module, Xtr: np.ndarray, ytr: np.ndarray, work: Path) -> tuple[float, onnx.ModelProto]:
    import torch_pruning as tp

    t0 = time.perf_counter()
    teacher = copy.deepcopy(net).eval()
    model = copy.deepcopy(net)
    ex = torch.zeros(2, 1, 28, 28)
    pruner = tp.pruner.MetaPruner(model, ex, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                  pruning_ratio=SPARSITY, iterative_steps=ROUNDS,
                                  ignored_layers=[model.classifier[-1]])
    Xt, yt = torch.from_numpy(Xtr), torch.from_numpy(ytr)
    with torch.no_grad():
        soft = teacher(Xt)
    rng = np.random.default_rng(0)
    for r in range(ROUNDS):
        pruner.step()
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        model.train()
        for _ in range(EPOCHS):
            order = torch.from_numpy(rng.permutation(len(Xt)))
            for s in range(0, len(Xt), BATCH):
                idx = order[s:s + BATCH]
                out = model(Xt[idx])
                kd = F.kl_div(F.log_softmax(out / T, 1), F.softmax(soft[idx] / T, 1), reduction="batchmean") * T * T
                loss = ALPHA * F.cross_entropy(out, yt[idx]) + (1 - ALPHA) * kd
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
    path = export_onnx(model, ex, work / "direct.onnx", dynamo=True)
    return time.perf_counter() - t0, onnx.load(str(path))


def main() -> None:
    torch.set_num_threads(1)  # the worker runs with 1 thread too (NETCOMPRESS_WORKER_THREADS=1 in testkit.stack)
    work = Path(tempfile.mkdtemp(prefix="bench-ovh-"))
    X, y = mnist()
    torch.manual_seed(0)
    net = fit(SmallCNN(), X[:1000], y[:1000], epochs=4, lr=2e-3)
    path = export_onnx(net, torch.zeros(2, 1, 28, 28), work / "cnn.onnx", dynamo=True)
    Xd, yd = X[1000:], y[1000:]
    sp = split(Arrays({"input": Xd}, yd), holdout=0.25, seed=0, max_eval=2000)
    Xtr, ytr = sp.train.inputs["input"], sp.train.labels
    Xte, yte = sp.holdout.inputs["input"], sp.holdout.labels
    direct_s, direct_model = _direct(net, Xtr, ytr, work)
    npz = work / "data.npz"
    np.savez(npz, input=Xd, labels=yd)
    spec = {"steps": [{"method": "prune", "granularity": "channel", "sparsity": SPARSITY, "iterations": ROUNDS,
                       "scope": "layer", "finetune": {"epochs": EPOCHS, "lr": LR, "batch_size": BATCH,
                                                      "distill": True, "temperature": T, "alpha": ALPHA}}],
            "eval": {"holdout": 0.25, "seed": 0, "latency_runs": 50}}
    stack = start_embedded(work / "serve")
    try:
        c = stack.client()
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            mid = c.post("/v1/models", files={"file": ("cnn.onnx", f)}).json()["id"]
        with open(npz, "rb") as f:
            did = c.post("/v1/datasets", files={"file": ("data.npz", f)}).json()["id"]
        t1 = time.perf_counter()
        job = wait_job(c, c.post("/v1/jobs", json={"model_id": mid, "dataset_id": did, "spec": spec}).json()["id"],
                       timeout=900)
        t2 = time.perf_counter()
        assert job["status"] == "succeeded", job["error"]
        service_model = onnx.load_from_string(c.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").content)
    finally:
        stack.stop()
    run_s = (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()
    one = {"input": Xte[:1]}
    rows = []
    for label, m in (("original", onnx.load(str(path))), ("direct torch-pruning", direct_model),
                     ("through the service", service_model)):
        rows.append(f"| {label} | {count_params(m)[0]:,} | {macs(m, one):,} | {accuracy(m, Xte, yte):.4f} |")
    body = (
        "**5. Service overhead — torch-pruning directly vs through the service** (SmallCNN trained on 1,000 "
        "images; 3,000 fine-tune / 1,000 held out from the other 4,000, the service's own split reproduced; "
        f"{SPARSITY:.0%} of channels per layer, {ROUNDS} rounds × {EPOCHS} epochs of fine-tuning with KD "
        f"(T={T:g}, alpha {ALPHA}); 1 torch thread on both sides).\n\n"
        "| model | params | MACs | held-out accuracy |\n|---|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        "| path | wall time (s) | × direct |\n|---|---:|---:|\n"
        f"| direct: prune + fine-tune + `torch.onnx.export` | {direct_s:.1f} | 1.00 |\n"
        f"| service job running (`started_at` → `finished_at`: convert, probe, prune, fine-tune, export, "
        f"measure 3 models) | {run_s:.1f} | {run_s / direct_s:.2f} |\n"
        f"| service end to end (`POST /v1/jobs` → succeeded, polled) | {t2 - t1:.1f} | {(t2 - t1) / direct_s:.2f} |\n"
        f"| uploads (model + dataset) | {t1 - t0:.1f} | – |\n\n"
        "Same channel counts, params and MACs on both paths. Both fine-tune with BatchNorm: the direct path has "
        "the original `nn.Module`'s; the uploaded ONNX has it folded into the convs by the exporter, and the "
        "service re-inserts it for training and folds it back (`finetune.batchnorm: auto`, issue 14). On this "
        "model that did not close the gap: the service held out 0.931 without it (2026-11-28) and 0.927 with it, "
        "against the direct path's 0.949 (section 3's TinyResNet is where it matters: +1.0 pt with, −10.4 pt "
        "without)."
    )
    write_section("pruning_overhead", body)
    print(body)


if __name__ == "__main__":
    main()
