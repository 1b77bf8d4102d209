"""Issue 15, benchmark 2: all-MiniLM-L6-v2 with weight-only int4 — file size and sentence-embedding cosine vs
float32 (target: ≥ 0.98 at ≥ 5× smaller, with the embedding tables at 4 bits), int8 dynamic beside it.

Same model, sentences and measurement as :mod:`bench.minilm_int8` (each sentence alone at its own length,
mean pooling over real tokens), so the two tables read together.

    python -m bench.minilm_int4
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from bench.int8_cnn import apply_step, paired_latency
from bench.minilm_int8 import SEQ, _cos, embeddings, sentences
from bench.report import fmt, write_section
from compression.data import Arrays, DataSplit
from testkit.zoo import export_minilm, minilm_example_inputs

SENTENCES, CALIBRATION = 200, 64
SENSITIVE = "int4 rtn, block 32, tables 4-bit, value and FFN-up projections at 8 bits"
VARIANTS = {
    "int4 (defaults: rtn, block 32, tables 8-bit)": {"scheme": "int4"},
    "int4 rtn, block 32, tables 4-bit": {"scheme": "int4", "embedding_bits": 4},
    "int4 hqq, block 32, tables 4-bit": {"scheme": "int4", "algorithm": "hqq", "embedding_bits": 4},
    "int4 gptq, block 32, tables 4-bit": {"scheme": "int4", "algorithm": "gptq", "embedding_bits": 4},
    "int4 rtn, block 16, tables 4-bit": {"scheme": "int4", "block_size": 16, "embedding_bits": 4},
    "int4 rtn, block 128, tables 4-bit": {"scheme": "int4", "block_size": 128, "embedding_bits": 4},
    "int4 rtn, block 32, tables float": {"scheme": "int4", "embeddings": False},
    SENSITIVE: {"scheme": "int4", "embedding_bits": 4},  # + keep_8bit, filled in from the model's layers
    "int8 weight-only (MatMulNBits 8-bit)": {"scheme": "int8", "mode": "weight_only"},
    "int8 dynamic (per-channel, embeddings int8)": {"scheme": "int8", "mode": "dynamic"},
}


def sensitive_layers(report: dict) -> list[str]:
    """The value projection and the FFN up-projection of every encoder layer (the 3rd and 5th of its six
    MatMuls in graph order: q, k, v, out, up, down): what a per-role sweep found most sensitive to 4 bits
    (one role at 8 bits at a time, 120 sentences: v 0.975 and up 0.977 mean cosine, the other four ≤ 0.970)."""
    mats = [row["name"] for row in report["layers"] if row["op"] == "MatMul"]
    return mats[2::6] + mats[4::6]


def main() -> None:
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-minilm4-"))
    original = onnx.load(str(export_minilm(work / "minilm.onnx", dynamo=True)))
    texts = sentences(SENTENCES + CALIBRATION)
    texts, calib_texts = texts[:SENTENCES], texts[SENTENCES:]
    inputs = minilm_example_inputs(texts, seq_len=SEQ)
    calib = minilm_example_inputs(calib_texts, seq_len=32)
    data = DataSplit(Arrays(calib), Arrays(calib))
    models, secs, notes = {"float32": original}, {"float32": 0.0}, {}
    layers: list[str] = []
    for name, raw in VARIANTS.items():
        t = time.time()
        if name == SENSITIVE:
            raw = {**raw, "keep_8bit": layers}
        try:
            models[name], report, _ = apply_step({"method": "quantize", **raw}, original, data, work)
            layers = layers or sensitive_layers(report)
        except Exception as e:  # a variant that fails is a row, not a crash
            notes[name] = f"failed: {type(e).__name__}: {str(e)[:100]}"
        secs[name] = time.time() - t
    ref_pooled, _ = embeddings(original, inputs)
    lengths = inputs["attention_mask"].sum(1)
    long_idx = int(np.argmax(lengths))
    lat = paired_latency(models, {k: v[long_idx:long_idx + 1] for k, v in inputs.items()}, runs=30, rounds=3)
    size0 = len(original.SerializeToString())
    rows, verdict = [], ""
    for name in ["float32", *VARIANTS]:
        if name in notes:
            rows.append(f"| {name} | – | – | – | – | – | – | {notes[name]} |")
            continue
        m = models[name]
        pooled = ref_pooled if name == "float32" else embeddings(m, inputs)[0]
        sent = _cos(pooled, ref_pooled)
        size = len(m.SerializeToString())
        rows.append(f"| {name} | {fmt(size)} | {size0 / size:.2f}× | {sent.mean():.4f} | {sent.min():.4f} | "
                    f"{lat[name]:.2f} | {secs[name]:.1f} | |")
        if name in ("int4 rtn, block 32, tables 4-bit", SENSITIVE):
            ok = size0 / size >= 5 and sent.mean() >= 0.98
            verdict += (f"**Target: ≥ 0.98 sentence cosine at ≥ 5× smaller with 4-bit embeddings — {name}: "
                        f"{sent.mean():.4f} at {size0 / size:.2f}× ({'met' if ok else 'missed'}).** ")
    body = (
        f"all-MiniLM-L6-v2 exported with torch's dynamo exporter; {SENTENCES} sentences from the standard library's "
        f"docstrings ({lengths.mean():.0f} tokens on average), each run alone; GPTQ calibrates on {CALIBRATION} other "
        f"sentences. Latency: one sentence padded to {SEQ} tokens, batch 1, one ORT thread, best of 3 rounds.\n\n"
        f"{verdict}\n\n"
        "| model | file bytes | × smaller | sentence cosine (mean) | sentence cosine (min) | latency @128 (ms) | "
        "step time (s) | note |\n|---|---:|---:|---:|---:|---:|---:|---|\n" + "\n".join(rows))
    write_section("minilm_int4", body)
    print(body)


if __name__ == "__main__":
    main()
