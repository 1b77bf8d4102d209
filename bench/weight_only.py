"""Issue 15, benchmark 1: weight-only int4 on a byte-level GPT trained here — ours beside ONNX Runtime's
``MatMulNBitsQuantizer`` called directly and NNCF's ``nncf.compress_weights``, in one run.

The model is :class:`testkit.architectures.GPT` (6 pre-norm blocks, width 128, 1.27 M parameters) trained
for 300 steps on the training part of Python's help text and Debian's license texts (:mod:`testkit.lm`),
exported by torch's default (dynamo) exporter. Every variant is measured on the same held-out windows
(128 bytes each, text the model has not seen): file bytes, perplexity, next-byte top-1 agreement with the
float model, mean KL(float ‖ variant) per position, and ONNX Runtime latency per sequence (batch 1, one
thread, best of paired rounds).

    python -m bench.weight_only
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx

from bench.int8_cnn import apply_step, paired_latency
from bench.report import fmt, write_section
from compression.data import Arrays, DataSplit
from compression.metrics import run_batched, session
from testkit.lm import GPTConfig, byte_windows, export_gpt, lm_fidelity, perplexity, trained_gpt

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "var" / "bench-cache"
EVAL, CALIB, SEQ = 128, 128, 128


class _Reader:
    """A CalibrationDataReader over the calibration windows (what ORT's GPTQ wants)."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids, self.i = ids, 0

    def get_next(self):
        if self.i >= len(self.ids):
            return None
        self.i += 1
        return {"input_ids": self.ids[self.i - 1:self.i]}

    def rewind(self) -> None:
        self.i = 0

    def __iter__(self):  # ORT's GPTQ (its neural_compressor code) iterates the reader
        return iter({"input_ids": self.ids[i:i + 1]} for i in range(len(self.ids)))


def _ort(model: onnx.ModelProto, algo: str, block: int, calib: np.ndarray) -> onnx.ModelProto:
    """ONNX Runtime's quantizer as its docs show it: symmetric int4, MatMul only (its default op set)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as m

    config = {"rtn": lambda: m.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True),
              "hqq": lambda: m.HQQWeightOnlyQuantConfig(block_size=block),
              "gptq": lambda: m.GPTQWeightOnlyQuantConfig(_Reader(calib), block_size=block)}[algo]()
    q = m.MatMulNBitsQuantizer(onnx.ModelProto.FromString(model.SerializeToString()), block_size=block,
                               is_symmetric=True, algo_config=config)
    q.process()
    return q.model.model


def _nncf(model: onnx.ModelProto, mode: str, group: int, calib: np.ndarray | None) -> onnx.ModelProto:
    """NNCF's ``compress_weights`` on the ONNX model (its defaults keep the embeddings and the last layer at
    8 bits); with a dataset, AWQ and scale estimation on."""
    import nncf

    kwargs = {}
    if calib is not None:
        kwargs = {"dataset": nncf.Dataset([{"input_ids": calib[i:i + 1]} for i in range(len(calib))]),
                  "awq": True, "scale_estimation": True, "subset_size": len(calib)}
    mode_enum = getattr(nncf.CompressWeightsMode, mode)
    return nncf.compress_weights(onnx.ModelProto.FromString(model.SerializeToString()), mode=mode_enum,
                                 group_size=group, ratio=1.0, **kwargs)


def _ours(raw: dict, model: onnx.ModelProto, data: DataSplit, work: Path) -> onnx.ModelProto:
    return apply_step({"method": "quantize", **raw}, model, data, work)[0]


def _saved_bytes(model: onnx.ModelProto, path: Path) -> int:
    onnx.save(model, str(path))
    return path.stat().st_size


def run() -> str:
    cfg = GPTConfig()
    torch_model = trained_gpt(cfg, CACHE)
    calib = byte_windows(CALIB, SEQ, seed=2, part="train")
    held = byte_windows(EVAL, SEQ, seed=1, part="heldout")
    data = DataSplit(Arrays({"input_ids": calib}), Arrays({"input_ids": held}))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        original = onnx.load(str(export_gpt(torch_model, work / "gpt.onnx", seq=SEQ)))
        ref = run_batched(session(original, threads=1), {"input_ids": held})[0]
        variants: dict[str, Callable[[], onnx.ModelProto]] = {"float32": lambda: original}
        for block in (32, 128):
            for algo in ("rtn", "hqq", "gptq"):
                variants[f"ours int4 {algo} b{block} (defaults: 8-bit head and tables)"] = (
                    lambda a=algo, b=block: _ours({"scheme": "int4", "algorithm": a, "block_size": b},
                                                  original, data, work))
                variants[f"ours int4 {algo} b{block}, 8-bit head, 4-bit tables"] = (
                    lambda a=algo, b=block: _ours({"scheme": "int4", "algorithm": a, "block_size": b,
                                                   "embedding_bits": 4}, original, data, work))
                variants[f"ours int4 {algo} b{block}, int4 head, float embeddings"] = (
                    lambda a=algo, b=block: _ours({"scheme": "int4", "algorithm": a, "block_size": b,
                                                   "keep_8bit": [], "embeddings": False}, original, data, work))
                variants[f"ORT MatMulNBitsQuantizer {algo} b{block}"] = (
                    lambda a=algo, b=block: _ort(original, a, b, calib))
            for mode in ("INT4_SYM", "INT4_ASYM"):
                variants[f"NNCF {mode} g{block}"] = lambda m=mode, b=block: _nncf(original, m, b, None)
                variants[f"NNCF {mode} g{block} + AWQ + scale estimation"] = (
                    lambda m=mode, b=block: _nncf(original, m, b, calib))
        rows, models = [], {}
        for i, (name, make) in enumerate(variants.items()):
            t, stage = time.time(), "quantize"
            try:
                model = make()
                seconds, stage = time.time() - t, "load in ORT"
                size = _saved_bytes(model, work / f"v{i}.onnx")
                out = run_batched(session(work / f"v{i}.onnx", threads=1), {"input_ids": held})[0]
            except Exception as e:  # a variant that cannot be made or does not load is a result, not a crash
                rows.append((name, None, None, None, None, None, f"failed ({stage}): {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160]}"))
                continue
            fid = lm_fidelity(out, ref, held)
            models[name] = work / f"v{i}.onnx"
            rows.append((name, size, perplexity(out, held), fid["token_agreement"], fid["kl"], seconds, ""))
        lat = paired_latency({k: onnx.load(str(p)) for k, p in models.items()}, {"input_ids": held[:1]},
                             runs=30, rounds=3)
    base = rows[0][1]
    lines = ["| variant | file bytes | × smaller | perplexity | next-byte agreement | KL (nats) | latency ms/seq | "
             "quantize s | note |", "|---|---|---|---|---|---|---|---|---|"]
    for name, size, ppl, agree, kl, secs, note in rows:
        ratio = fmt(base / size, 3) if size else "–"
        lines.append(f"| {name} | {fmt(size)} | {ratio} | {fmt(ppl, 5)} | {fmt(agree, 4)} | {fmt(kl, 3)} | "
                     f"{fmt(lat.get(name), 3)} | {fmt(secs, 3)} | {note} |")
    intro = (f"Byte-level GPT ({sum(int(np.prod(t.dims)) for t in original.graph.initializer):,} stored values), "
             f"trained {cfg.steps} steps, dynamo export; {EVAL} held-out windows of {SEQ} bytes, {CALIB} "
             f"calibration windows from the training text. onnxruntime {version('onnxruntime')}, nncf "
             f"{version('nncf')}. Latency: one ORT thread, batch 1, one {SEQ}-byte sequence.")
    return intro + "\n\n" + "\n".join(lines)


def main() -> None:
    body = run()
    print(body)
    write_section("weight_only_gpt", body)


if __name__ == "__main__":
    main()
