"""Issue 4, benchmark 5: our int8 static side by side with the peers, in one run — same model, same
calibration samples, same machine: ONNX Runtime's ``quantize_static`` called directly (its defaults, and
per-channel) and NNCF's ``nncf.quantize`` on the ONNX model.

    python -m bench.quant_peers
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from bench.int8_cnn import CALIBRATION, accuracy, apply_step, cnn_setup, paired_latency, weight_bytes
from bench.report import fmt, write_section


def _calibration(data, n: int = CALIBRATION) -> list[dict[str, np.ndarray]]:
    """The same first ``n`` training images for everyone, in batches of 16."""
    x = data.train.inputs["input"][:n]
    return [{"input": x[s:s + 16]} for s in range(0, n, 16)]


class _Reader:
    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self.batches, self.i = batches, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        self.i += 1
        return self.batches[self.i - 1] if self.i <= len(self.batches) else None


def _ort_direct(model: onnx.ModelProto, batches, work: Path, **kwargs) -> onnx.ModelProto:
    from onnxruntime.quantization import quantize_static

    src, dst = work / "peer_src.onnx", work / "peer_dst.onnx"
    onnx.save_model(model, str(src))
    quantize_static(str(src), str(dst), _Reader(batches), **kwargs)
    return onnx.load(str(dst))


def _nncf(model: onnx.ModelProto, batches) -> onnx.ModelProto:
    os.environ.setdefault("OPENVINO_TELEMETRY", "0")
    import nncf

    samples = [{"input": b["input"][i:i + 1]} for b in batches for i in range(len(b["input"]))]
    return nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples))


def main() -> None:
    torch.set_num_threads(1)  # tiny models on a shared 2-core box: two threads spin-wait (measured 15× slower)
    from importlib.metadata import version

    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    original, data = cnn_setup(work)
    batches = _calibration(data)
    runs = {
        "netcompress `quantize int8 static` (defaults)": lambda: apply_step(
            {"method": "quantize", "scheme": "int8", "mode": "static", "calibration_samples": CALIBRATION},
            original, data, work)[0],
        "ORT `quantize_static`, its defaults": lambda: _ort_direct(original, batches, work),
        "ORT `quantize_static`, per_channel=True": lambda: _ort_direct(original, batches, work, per_channel=True),
        "NNCF `nncf.quantize` (defaults)": lambda: _nncf(original, batches),
    }
    models, secs = {"float32": original}, {"float32": 0.0}
    for name, fn in runs.items():
        t = time.time()
        models[name] = fn()
        secs[name] = time.time() - t
    x = data.holdout.inputs["input"]
    lat1 = paired_latency(models, {"input": x[:1]}, runs=300)
    lat32 = paired_latency(models, {"input": x[:32]}, runs=40)
    acc = {k: accuracy(m, data) for k, m in models.items()}
    size = {k: len(m.SerializeToString()) for k, m in models.items()}
    rows = [f"| {k} | {acc[k]:.3f} | {100 * (acc[k] - acc['float32']):+.1f} | {fmt(size[k])} | "
            f"{fmt(weight_bytes(m))} | {lat1[k]:.3f} | {lat32[k]:.3f} | {secs[k]:.1f} |" for k, m in models.items()]
    ours = "netcompress `quantize int8 static` (defaults)"
    peers = [k for k in models if k not in ("float32", ours)]
    worse_acc = [k for k in peers if acc[k] > acc[ours]]
    bigger = [k for k in peers if size[k] < size[ours]]
    verdict = [
        "at least as accurate as every peer" if not worse_acc else
        "less accurate than " + "; ".join(f"{k} ({acc[k]:.3f} vs {acc[ours]:.3f})" for k in worse_acc),
        "at least as small as every peer" if not bigger else
        "larger than " + "; ".join(f"{k} ({fmt(size[k])} vs {fmt(size[ours])} bytes, accuracy {acc[k]:.3f})"
                                   for k in bigger),
    ]
    body = (
        f"SmallCNN as in `int8_cnn` (1,000 held-out images); every quantizer gets the same {CALIBRATION} training "
        f"images for calibration. onnxruntime {version('onnxruntime')}, nncf {version('nncf')} (ONNX "
        "backend, no torch). Latency: ORT CPU EP, 1 intra-op thread, p50 at batch 1 (300 runs) and 32 (40 runs), best of 5 "
        "interleaved rounds.\n\n"
        f"**Ours is {verdict[0]}, and {verdict[1]}.**\n\n"
        "| quantizer | accuracy | Δ pt | file bytes | tensor bytes | latency b1 (ms) | latency b32 (ms) | time (s) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
        + "\n\nOurs = ORT's quantizer after `quant_pre_process` (BatchNorm folded), per-channel symmetric int8 "
        "weights, uint8 asymmetric activations, MinMax calibration. ORT's own defaults are per-tensor int8 "
        "weights and int8 activations without pre-processing; NNCF's default preset is symmetric int8 with "
        "per-channel weights and fast bias correction."
    )
    write_section("quant_peers", body)
    print(body)


if __name__ == "__main__":
    main()
