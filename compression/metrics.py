"""Measured metrics of an ONNX model (DESIGN §5): sizes, params, MACs, ORT latency, accuracy/fidelity.

Nothing here is estimated from the spec: the file is written, re-loaded in ONNX Runtime and run.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort

from compression.analysis import fixed_batch, macs, param_counts

if TYPE_CHECKING:
    from compression.context import StepContext

THROUGHPUT_BATCH = 32
# zlib level 9 deflates float weights at ~15 MB/s here (measured on float32 N(0, 0.02)): a 2 GiB model would
# spend minutes on one number. Above this the metric is skipped, with the reason in ``not_measured``.
ZIP_MAX_BYTES = 1024**3
ZIP_CHUNK = 1 << 20


@dataclass
class EvalData:
    """Held-out inputs (first axis = samples), optional labels, and the original model's outputs on them."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    reference: list[np.ndarray] | None = None


def session(model: onnx.ModelProto | Path | bytes, threads: int = 0, *, quiet: bool = False) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (0: ORT's default) and one inter-op thread.

    ``quiet`` drops ORT's warnings: a model with an overridable initializer (the early-exit gated model's
    ``threshold``) makes ORT warn on every load, by design.
    """
    opts = ort.SessionOptions()
    if quiet:
        opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


def run_batched(sess: ort.InferenceSession, inputs: dict[str, np.ndarray], batch: int = 256, *,
                fixed: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """All outputs over all samples, in batches (a batch size the graph fixes is honoured). ``fixed`` feeds
    are passed whole to every batch (an overridable initializer: lowrank's sensitivity scan swaps weights)."""
    n = len(next(iter(inputs.values())))
    batch = session_batch(sess) or batch
    outs: list[list[np.ndarray]] = []
    for s in range(0, n, batch):
        res = sess.run(None, {**{k: v[s:s + batch] for k, v in inputs.items()}, **(fixed or {})})
        outs.append(res)
    return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]


def session_batch(sess: ort.InferenceSession) -> int | None:
    """The batch size the session's graph inputs fix (a batch-1 detector: 1), or None when it is free."""
    return fixed_batch([i.shape for i in sess.get_inputs()])


def _percentiles(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms)
    return {"p50": round(float(np.percentile(a, 50)), 4), "p90": round(float(np.percentile(a, 90)), 4)}


def latency(sess: ort.InferenceSession, sample: dict[str, np.ndarray], runs: int, warmup: int = 5) -> dict[str, float]:
    for _ in range(warmup):
        sess.run(None, sample)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, sample)
        times.append((time.perf_counter() - t) * 1000)
    return _percentiles(times)


def throughput(sess: ort.InferenceSession, inputs: dict[str, np.ndarray], runs: int = 5) -> float | None:
    """Samples per second at batch 32, or at the batch size the graph fixes (a batch-1 model: one per run)."""
    batch = session_batch(sess) or THROUGHPUT_BATCH
    n = len(next(iter(inputs.values())))
    idx = np.arange(batch) % n
    feed = {k: v[idx] for k, v in inputs.items()}
    sess.run(None, feed)
    t = time.perf_counter()
    for _ in range(runs):
        sess.run(None, feed)
    return round(batch * runs / (time.perf_counter() - t), 2)


def fidelity(outputs: list[np.ndarray], reference: list[np.ndarray], labels: np.ndarray | None) -> dict[str, Any]:
    """Accuracy (labels), top-1 agreement, mean per-sample cosine, centred cosine and max abs error on the
    first output.

    ``centered_cosine`` is the cosine between the two outputs' deviations from the original's mean output
    (per element, over the held-out samples): a detector's decoded boxes carry the anchor grid, a mask
    head its bias, and against such a constant part the plain cosine stays near 1.0 for a model that no
    longer responds to its input (measured: a YOLOv8-style head at 0.99999 after a prune that broke it).
    Without several samples it is not defined and left out."""
    out, ref = outputs[0].astype(np.float64), reference[0].astype(np.float64)
    res: dict[str, Any] = {}
    if out.shape != ref.shape:
        return {"output_shape_mismatch": [list(out.shape), list(ref.shape)]}
    a, b = out.reshape(len(out), -1), ref.reshape(len(ref), -1)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(denom > 0, (a * b).sum(1) / np.maximum(denom, 1e-30), 1.0)
    res["output_cosine"] = round(float(cos.mean()), 6)
    if len(b) > 1:
        mu = b.mean(0, keepdims=True)
        da, db = (a - mu).ravel(), (b - mu).ravel()
        norm = float(np.linalg.norm(da) * np.linalg.norm(db))
        res["centered_cosine"] = round(float(da @ db) / norm, 6) if norm > 0 else (1.0 if not da.any() else 0.0)
    res["max_abs_error"] = float(np.abs(out - ref).max())
    if out.ndim == 2 and out.shape[1] > 1:
        res["agreement"] = round(float((out.argmax(1) == ref.argmax(1)).mean()), 6)
    return res


# Float64 bytes of one chunk of [samples, T, V] logits the language-model metrics work on at a time (the
# held-out logits are float32 already; their float64 log-softmax for a 50k vocabulary would be 400 KB a token).
LM_CHUNK_BYTES = 64 << 20
IDS_INPUT = "input_ids"
MASK_INPUT = "attention_mask"


def lm_ids_input(first_output: np.ndarray, inputs: dict[str, np.ndarray]) -> str | None:
    """The name of the token-id input when the model is a language model here, else None.

    A language model's first output is float ``[N, T, V]`` (``V >= 2``) and the dataset has an integer
    ``[N, T]`` input: ``input_ids`` by name, else the only 2-D integer input, with the same ``N`` and ``T``,
    and ids inside ``[0, V)``: a per-token classifier (``V`` tags over a larger vocabulary) is not one.

    Example:
        >>> lm_ids_input(np.zeros((2, 5, 7), np.float32), {"input_ids": np.zeros((2, 5), np.int64)})
        'input_ids'
    """
    out = first_output
    if out.ndim != 3 or out.shape[2] < 2 or out.dtype.kind != "f":
        return None
    ints = {k: v for k, v in inputs.items() if v.ndim == 2 and v.dtype.kind in "iu"}
    name = IDS_INPUT if IDS_INPUT in ints else next(iter(ints)) if len(ints) == 1 else None
    if name is None or ints[name].shape != out.shape[:2]:
        return None
    ids = ints[name]
    if ids.size and (ids.min() < 0 or ids.max() >= out.shape[2]):  # ids past the "vocabulary": a token tagger
        return None
    return name


def _log_softmax64(x: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis in float64, shifted by the maximum (no overflow for any float32 logit)."""
    x = x.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    x -= np.log(np.exp(x).sum(-1, keepdims=True))
    return x


def lm_metrics(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray | None = None,
               reference: np.ndarray | None = None, *, chunk_bytes: int = LM_CHUNK_BYTES) -> dict[str, Any]:
    """Language-model metrics of logits ``[N, T, V]`` on token ids ``[N, T]`` (DESIGN §5).

    - ``perplexity``: ``exp`` of the mean next-token cross-entropy of ``logits[:, :-1]`` against
      ``ids[:, 1:]``, in nats, over the pairs whose input and target positions are both real
      (``mask[:, t] and mask[:, t + 1]``: padding neither predicts nor is predicted);
    - with ``reference`` (the original's logits), over the real positions (``mask[:, t]``; the last position
      predicts a token too): ``token_agreement``, the fraction where the argmax equals the original's, and
      ``kl``, the mean ``KL(original ‖ model)`` per position in nats;
    - ``sequence_length``: ``T``, what one sequence is in the latency (batch 1 = one sequence of ``T`` tokens).

    Computed over chunks of samples (about ``chunk_bytes`` of float64 each): the sums are the same, the memory
    is bounded.

    Example:
        >>> lm_metrics(np.zeros((1, 3, 4), np.float32), np.array([[0, 1, 2]]))["perplexity"]  # uniform over 4
        4.0
    """
    n, t, v = logits.shape
    if t < 2:
        raise ValueError("perplexity needs sequences of at least 2 tokens")
    real = np.ones((n, t), bool) if mask is None else np.asarray(mask) != 0
    per = max(1, int(chunk_bytes // max(1, t * v * 8)))
    nll, pairs, agree, kl, positions = 0.0, 0, 0, 0.0, 0
    for s in range(0, n, per):
        lp = _log_softmax64(logits[s:s + per])
        r = real[s:s + per]
        tgt = ids[s:s + per, 1:].astype(np.int64)
        pair = r[:, :-1] & r[:, 1:]
        picked = np.take_along_axis(lp[:, :-1], tgt[..., None], axis=-1)[..., 0]
        nll -= float(picked[pair].sum())
        pairs += int(pair.sum())
        if reference is not None:
            lq = _log_softmax64(reference[s:s + per])
            agree += int(((lp.argmax(-1) == lq.argmax(-1)) & r).sum())
            kl += float((np.exp(lq) * (lq - lp)).sum(-1)[r].sum())
            positions += int(r.sum())
        del lp
    res: dict[str, Any] = {"perplexity": round(float(np.exp(nll / pairs)), 6) if pairs else None,
                           "sequence_length": int(t)}
    if reference is not None and positions:
        res["token_agreement"] = round(agree / positions, 6)
        res["kl"] = float(f"{max(kl / positions, 0.0):.6g}")  # 6 significant digits: fp16's is ~5e-8
    return res


def top1_accuracy(scores: np.ndarray, labels: np.ndarray | None) -> float | None:
    """Top-1 accuracy of class scores ``[N, C]`` (``C >= 2``) against ``labels``, to 6 decimals; None without
    labels, for outputs that are not class scores, or when the counts differ. Every held-out accuracy a
    report or the metrics give is this.

    Example:
        >>> top1_accuracy(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1]))
        0.5
    """
    if labels is None or scores.ndim != 2 or scores.shape[1] < 2 or len(scores) != len(labels):
        return None
    return round(float((scores.argmax(1) == labels).mean()), 6)


def accuracy(outputs: list[np.ndarray], labels: np.ndarray | None) -> float | None:
    """:func:`top1_accuracy` of a model's first output."""
    return top1_accuracy(outputs[0], labels)


def holdout_accuracy(model: onnx.ModelProto, ctx: StepContext) -> float | None:
    """Top-1 accuracy of ``model`` on the step's held-out split, run in ONNX Runtime (None without a
    dataset, labels or class scores). A torch module between training rounds:
    :func:`compression.training.module_holdout_accuracy`."""
    data = ctx.data
    if data is None or data.holdout.labels is None:
        return None
    return top1_accuracy(run_batched(session(model, ctx.threads), data.holdout.inputs)[0], data.holdout.labels)


def measure(model: onnx.ModelProto, files: list[Path], data: EvalData, *, latency_runs: int = 50,
            threads: int = 0, zip_max_bytes: int = ZIP_MAX_BYTES) -> dict[str, Any]:
    """Measure a written model.

    Args:
        model: the model (for static counts).
        files: what was written for it (the .onnx, plus its .data file if any): sizes come from disk, and
            ONNX Runtime loads the model from them (never from bytes: a model over 2 GiB has none).
        data: held-out inputs/labels and the original's outputs on them.
        zip_max_bytes: above this size ``zip_bytes`` is not measured (deflate's time, see ``ZIP_MAX_BYTES``).

    Returns:
        ``file_bytes, zip_bytes, compressed_bytes, params, nonzero_params, macs, latency_ms{p50,p90}, throughput``
        and, with data, ``accuracy, agreement, output_cosine, max_abs_error``; a language model
        (:func:`lm_ids_input`) adds :func:`lm_metrics`' ``perplexity, sequence_length`` and, against the
        original, ``token_agreement, kl``. ``latency_ms`` runs one sample: for a language model, one sequence
        of ``sequence_length`` tokens. ``not_measured`` says why a size is None when it was skipped for the
        model's size.
    """
    from compression.xz_artifact import MAX_COMPRESS_BYTES, compressed_size

    files = [Path(f) for f in files]
    file_bytes = sum(f.stat().st_size for f in files)
    params, nonzero = param_counts(model)  # as describe() counts: packed low-bit weights count as weights
    sample = {k: v[:1] for k, v in data.inputs.items()}
    # a model written with external data is probed from its files: copying or serializing it would cost a
    # second (and, over 2 GiB, an impossible) copy in memory; the probe's session is gone before the next
    external = files[0] if len(files) > 1 else None
    mac_count = macs(model, sample, path=external)
    not_measured: dict[str, str] = {}
    zip_bytes = deflated_size(files) if file_bytes <= zip_max_bytes else None
    if zip_bytes is None:
        not_measured["zip_bytes"] = (f"{file_bytes} bytes, over the {zip_max_bytes} deflate measures here "
                                     f"(~15 MB/s at level 9)")
    blob = b"".join(f.read_bytes() for f in files) if file_bytes <= MAX_COMPRESS_BYTES else None
    if blob is None:
        not_measured["compressed_bytes"] = f"{file_bytes} bytes, over the {MAX_COMPRESS_BYTES} xz measures"
    sess = session(files[0], threads)
    res: dict[str, Any] = {
        "file_bytes": file_bytes,
        "zip_bytes": zip_bytes,
        "compressed_bytes": compressed_size(blob) if blob is not None else None,  # the model.onnx.xz artifact's
        "params": params,
        "nonzero_params": nonzero,
        "macs": mac_count,
        "latency_ms": latency(sess, sample, latency_runs),
        "throughput": throughput(sess, data.inputs),
    }
    if not_measured:
        res["not_measured"] = not_measured
    outputs = run_batched(sess, data.inputs)
    res["accuracy"] = accuracy(outputs, data.labels)
    if data.reference is not None:
        res.update(fidelity(outputs, data.reference, data.labels))
    ids = lm_ids_input(outputs[0], data.inputs)
    if ids is not None:
        ref = data.reference[0] if data.reference is not None else None
        res.update(lm_metrics(outputs[0], data.inputs[ids], data.inputs.get(MASK_INPUT),
                              ref if ref is not None and ref.shape == outputs[0].shape else None))
    return res


def deflated_size(files: list[Path], level: int = 9) -> int:
    """Bytes of ``files`` deflated together (``zip_bytes``), streamed in chunks: never the whole model in memory.

    Example:
        >>> deflated_size([Path("model.onnx")]) < Path("model.onnx").stat().st_size  # doctest: +SKIP
        True
    """
    z = zlib.compressobj(level)
    total = 0
    for path in files:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(ZIP_CHUNK), b""):
                total += len(z.compress(chunk))
    return total + len(z.flush())


_RATIO_KEYS = ("file_bytes", "zip_bytes", "compressed_bytes", "params", "nonzero_params", "macs")


def ratios(metrics: dict[str, Any], original: dict[str, Any]) -> dict[str, Any]:
    """How many times smaller/faster than the original (>1 is better), the accuracy change, and for a language
    model ``perplexity_ratio``: the model's perplexity over the original's (>1 is worse)."""
    r: dict[str, Any] = {}
    for k in _RATIO_KEYS:
        if metrics.get(k) and original.get(k):
            r[k] = round(original[k] / metrics[k], 4)
    if metrics.get("compressed_bytes") and original.get("file_bytes"):
        # the entropy-coded download against the original ONNX as uploaded (Deep Compression's ratio)
        r["file_to_compressed"] = round(original["file_bytes"] / metrics["compressed_bytes"], 4)
    lat, olat = metrics.get("latency_ms"), original.get("latency_ms")
    if lat and olat and lat.get("p50"):
        r["latency_p50_speedup"] = round(olat["p50"] / lat["p50"], 4)
    if metrics.get("throughput") and original.get("throughput"):
        r["throughput"] = round(metrics["throughput"] / original["throughput"], 4)
    if metrics.get("accuracy") is not None and original.get("accuracy") is not None:
        r["accuracy_delta"] = round(metrics["accuracy"] - original["accuracy"], 6)
    if metrics.get("perplexity") and original.get("perplexity"):
        # the other way round: the model's over the original's, so > 1 is WORSE (the sense of
        # eval.max_perplexity_ratio, which bounds it)
        r["perplexity_ratio"] = round(metrics["perplexity"] / original["perplexity"], 6)
    return r
