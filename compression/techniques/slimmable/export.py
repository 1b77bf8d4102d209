"""Each width's ONNX, proved and measured: the exported graph must compute what the masked full-size
network computes at that width, and its params, MACs, latency and accuracy are measured in ONNX Runtime.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch

from compression.channels import check_export
from compression.data import Arrays
from compression.techniques.slimmable.network import SlimmableNet


@dataclass
class Exported:
    """One width's ONNX and how far it is from the network it was cut from (the report shows it)."""

    model: onnx.ModelProto
    max_abs_error: float  # exported graph in ONNX Runtime vs the masked full-size network, same inputs


def export_checked(net: SlimmableNet, width: float, model: onnx.ModelProto, example: tuple[torch.Tensor, ...],
                   check: Arrays, threads: int = 0, samples: int = 64) -> Exported:
    """Export ``width`` and prove it: ``onnx.checker`` passes, ONNX Runtime runs it, and on ``samples`` of
    ``check`` it computes what the masked full-size network computes at that width.

    Raises:
        ExportMismatch: (a RuntimeError) the exported graph disagrees with the masked network (a channel the
            masks could not silence, e.g. a bias added outside the layer): the export would not be that width.
    """
    out = net.export(width, model, example)
    onnx.checker.check_model(out)
    names = list(net.module.input_names)
    take = check.take(np.arange(min(samples, check.samples)))
    feeds = {n: take.inputs[n] for n in names}
    previous = net.width
    net.select(width)
    net.eval()
    try:
        err = check_export(out, net, feeds, what=f"width {width}: the exported graph disagrees with the masked network",
                           threads=threads)
    finally:
        net.select(previous)
    return Exported(out, err)


def width_metrics(model: onnx.ModelProto, holdout: Arrays, reference: np.ndarray | None, threads: int = 0,
                  latency_runs: int = 30) -> dict:
    """Measured facts of one width's ONNX: params, MACs and ONNX Runtime latency at batch 1, held-out
    accuracy (with labels) and agreement / output cosine with the original's ``reference`` outputs."""
    from compression.analysis import macs, param_counts
    from compression.metrics import accuracy, fidelity, latency, run_batched, session

    sess = session(model, threads)
    sample = {k: v[:1] for k, v in holdout.inputs.items()}
    outputs = run_batched(sess, holdout.inputs)
    res = {"params": int(param_counts(model)[0]), "macs": int(macs(model, sample)),
           "latency_ms": latency(sess, sample, latency_runs), "accuracy": accuracy(outputs, holdout.labels)}
    if reference is not None:
        fid = fidelity(outputs, [reference], holdout.labels)
        res.update({k: fid[k] for k in ("agreement", "output_cosine") if k in fid})
    return res
