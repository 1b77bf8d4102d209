"""Ranks from a per-layer sensitivity scan: what ``lowrank`` does by default when it has data.

A spectrum-only rule (``energy 0.9``) cannot know that a layer's small singular values matter for the
output: LeNet-300-100 at a uniform ``rank_ratio 0.2`` fell from 93% to 61%. Measuring is cheap instead:
each factorable layer alone is truncated to a few candidate ranks (one SVD per layer; the truncated weight
``U_K Σ_K V_Kᵀ`` has the weight's own shape, so a candidate is tried by feeding it in place of the weight
to one ONNX Runtime session of the unchanged graph — one inference pass per candidate) and the drop on a
**validation slice carved from the training split** is recorded. The held-out split stays for the metrics:
choosing ranks on it would make the reported accuracy an optimistic one.

The drop is ``100·(1 − top-1 agreement)`` with the original for class scores (with or without labels: it
bounds the accuracy drop and is far less noisy on a small slice, see :class:`DropMeter`), else
``100·(1 − cosine)`` (centred on the original's mean output where there are several samples), as the quality
gate (:mod:`compression.gate`) measures outputs that are not class scores. The step's ``max_drop`` is then spent greedily
(Han et al.'s sensitivity analysis, made automatic as in the pruning family's
:mod:`compression.techniques.pruning.sensitivity`): repeatedly lower the layer whose next candidate costs the
least drop per parameter saved, while the summed single-layer drops stay within ``max_drop``. Single-layer
drops are not exactly additive, so the chosen ranks are measured together on the slice and the latest
lowerings are backed off, one candidate rank at a time, while the joint drop exceeds the budget.

Example:
    >>> val = validation_slice(data.train, seed=0)                       # doctest: +SKIP
    >>> scan = scan_layers(model, layers, val, max_drop=1.0, min_rank=8)  # doctest: +SKIP
    >>> choose(scan, max_drop=1.0)["ranks"]                             # doctest: +SKIP
    {'node_linear': 38, 'node_linear_1': 25}
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from compression.data import Arrays
from compression.metrics import fidelity, run_batched, session, top1_accuracy
from compression.techniques.factorization.layers import Layer

# Candidate ranks as fractions of min(M, N): halving steps from "half the rank" down to 1/16, each a ~2×
# step in the layer's parameters. Finer steps cost one pass each; these already span 2×–16× per layer.
SCAN_FRACTIONS = (1 / 2, 1 / 3, 1 / 4, 1 / 6, 1 / 8, 1 / 12, 1 / 16)
VALIDATION_FRACTION = 0.2  # the tail of the (already shuffled) training split the scan measures on
VALIDATION_MAX = 1000  # enough for 0.1-pt resolution; more only slows the scan
# A graph that fixes its batch (a detector exported at batch 1) runs one sample per call: fewer samples keep
# the scan at minutes, not hours, for a few hundred candidates.
VALIDATION_MAX_FIXED_BATCH = 128
DEFAULT_MAX_DROP = 1.0


def validation_slice(train: Arrays, seed: int, cap: int = VALIDATION_MAX) -> tuple[Arrays, dict[str, int]]:
    """The samples the scan measures on: the last ``VALIDATION_FRACTION`` of the training split (at least one
    sample), at most ``cap`` of them picked by ``seed``. Never the held-out split.

    Returns:
        the slice and where it came from (``{"train_samples", "from", "samples"}``, indices into train).
    """
    n = train.samples
    start = n - max(1, int(round(n * VALIDATION_FRACTION)))
    idx = np.arange(start, n)
    if len(idx) > cap:
        idx = np.sort(np.random.default_rng(seed).choice(idx, cap, replace=False))
    return train.take(idx), {"train_samples": n, "from": int(start), "samples": int(len(idx))}


def candidate_ranks(m: int, n: int, min_rank: int) -> list[int]:
    """Ranks worth trying for an ``m × n`` matrix, decreasing: ``⌈f · min(m, n)⌉`` for each scan fraction,
    floored at ``min_rank`` (clipped to ``min(m, n)``), only those that save parameters (``K·(m+n) < m·n``)."""
    full = min(m, n)
    floor = min(min_rank, full)
    ranks = {max(floor, math.ceil(f * full - 1e-9)) for f in SCAN_FRACTIONS}
    return sorted((k for k in ranks if k * (m + n) < m * n), reverse=True)


class DropMeter:
    """The drop (percentage points) of a model's outputs against the original's on the slice: for class scores
    ``100·(1 − top-1 agreement)``, labels or not, else ``100·(1 − cosine)`` (centred where there are several
    samples, as the gate measures outputs that are not class scores).

    Agreement rather than accuracy even with labels: accuracy cannot fall by more than agreement does (a sample
    the original got right and the model agrees on stays right, :func:`compression.gate.budget`), so an
    agreement budget bounds the accuracy drop; and it is paired — on a slice of a few hundred samples a
    truncation that flips five right answers wrong and five wrong ones right scores an accuracy drop of 0,
    and noise alone made single-layer "drops" of −10 pt on the zoo's ResNet-18 (77 samples), which a greedy
    allocation reads as free compression (that ResNet-18 then lost 11 pt on the held-out split).
    """

    def __init__(self, reference: list[np.ndarray], labels: np.ndarray | None) -> None:
        self.reference = reference
        scores = reference[0]
        self.base = top1_accuracy(scores, labels)  # reported: what the original scores on the slice
        if scores.ndim == 2 and scores.shape[1] > 1:
            self.metric = "agreement"
        else:
            self.metric = "centered_cosine" if len(scores) > 1 else "output_cosine"

    def drop(self, outputs: list[np.ndarray]) -> float:
        value = fidelity(outputs, self.reference, None).get(self.metric)
        return round(100 * (1 - float(value if value is not None else 0.0)), 4)


@dataclass
class _Trial:
    """One session of the graph in which every scanned weight can be fed: trying a rank is one run."""

    run: Callable[[dict[str, np.ndarray]], list[np.ndarray]]
    meter: DropMeter

    def drop(self, weights: dict[str, np.ndarray]) -> float:
        return self.meter.drop(self.run(weights))


def _trial(model: onnx.ModelProto, weights: list[Layer], val: Arrays, threads: int) -> _Trial:
    """Make the scanned weights overridable (graph inputs with their initializer as default) in one session."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inputs = {i.name for i in m.graph.input}
    inits = {t.name: t for t in m.graph.initializer}
    for la in weights:
        if la.weight not in inputs:
            t = inits[la.weight]
            m.graph.input.append(helper.make_tensor_value_info(la.weight, t.data_type, list(t.dims)))
            inputs.add(la.weight)
    if m.ir_version < 4:
        m.ir_version = 4
    sess = session(m, threads, quiet=True)

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return run_batched(sess, val.inputs, fixed=feed)

    reference = run({})
    return _Trial(run, DropMeter(reference, val.labels))


def scan_layers(model: onnx.ModelProto, layers: list[tuple[Layer, np.ndarray]], val: Arrays, *, max_drop: float,
                min_rank: int, threads: int = 0,
                progress: Callable[[float, str], None] | None = None) -> dict[str, Any]:
    """Each layer alone at each of its candidate ranks (decreasing; a layer's scan stops at the first rank
    whose drop exceeds ``max_drop``, which no allocation could afford).

    Args:
        model: the graph (named nodes), unchanged.
        layers: the layers to scan with their SVD matrices (``Layer.matrix``).
        val: the validation slice (inputs by graph input name, labels or None).

    Returns:
        ``{"metric", "base", "layers": {name: {"shape", "params", "ranks", "drops"}}, "trial"}`` — ``trial``
        is the session (for :func:`choose`), dropped from reports.
    """
    trial = _trial(model, [la for la, _ in layers], val, threads)
    out: dict[str, dict[str, Any]] = {}
    for i, (la, matrix) in enumerate(layers):
        mm, nn = matrix.shape
        u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
        ranks, drops = [], []
        for k in candidate_ranks(mm, nn, min_rank):
            d = trial.drop({la.weight: _truncated(la, (u, s, vt, matrix.dtype), k)})
            ranks.append(k)
            drops.append(d)
            if d > max_drop:
                break
        out[la.name] = {"weight": la.weight, "shape": [int(mm), int(nn)], "params": int(mm * nn),
                        "ranks": ranks, "drops": drops, "_layer": la, "_svd": (u, s, vt, matrix.dtype)}
        if progress is not None:
            progress((i + 1) / len(layers), f"sensitivity scan: {i + 1}/{len(layers)} layers")
    return {"metric": trial.meter.metric, "base": trial.meter.base, "layers": out, "trial": trial}


def _truncated(la: Layer, svd: tuple[np.ndarray, np.ndarray, np.ndarray, np.dtype], k: int) -> np.ndarray:
    """The rank-``k`` truncation ``U_K Σ_K V_Kᵀ`` in the weight's layout and dtype: what the factored pair computes."""
    u, s, vt, dtype = svd
    return la.weight_from_matrix((u[:, :k] * s[:k]) @ vt[:k]).astype(dtype)


def _cost(entry: dict[str, Any], j: int) -> tuple[float, int]:
    """(drop, params) of a layer at candidate ``j`` (-1: dense); drops made non-increasing in the rank (a
    lower rank never counts as better than a higher one: that would be the slice's noise)."""
    if j < 0:
        return 0.0, entry["params"]
    mm, nn = entry["shape"]
    return max([0.0, *entry["drops"][:j + 1]]), entry["ranks"][j] * (mm + nn)


def choose(scan: dict[str, Any], max_drop: float) -> dict[str, Any]:
    """Spend ``max_drop`` over the layers (see the module docstring), then check the joint drop.

    Returns:
        ``{"ranks": {name: rank} (layers kept dense are absent), "shares": {name: drop spent},
        "joint_drop": measured drop of all chosen ranks together, "undone": candidate steps backed off for it}``.
    """
    entries = scan["layers"]
    level = {name: -1 for name in entries}
    spent = 0.0
    moves: list[tuple[str, int]] = []  # (layer, its previous level), in the order taken
    while True:
        best: tuple[float, int, str, int] | None = None  # (drop per parameter saved, -saving, layer, level)
        for name, e in entries.items():
            d0, p0 = _cost(e, level[name])
            for j in range(level[name] + 1, len(e["ranks"])):
                d, p = _cost(e, j)
                if spent - d0 + d > max_drop + 1e-9 or p >= p0:
                    continue
                move = ((d - d0) / (p0 - p), p - p0, name, j)  # ties: the bigger saving first
                if best is None or move[:2] < best[:2]:
                    best = move
        if best is None:
            break
        _, _, name, j = best
        moves.append((name, level[name]))
        spent += _cost(entries[name], j)[0] - _cost(entries[name], level[name])[0]
        level[name] = j

    def weights() -> dict[str, np.ndarray]:
        feed = {}
        for name, j in level.items():
            if j >= 0:
                e = entries[name]
                feed[e["weight"]] = _truncated(e["_layer"], e["_svd"], e["ranks"][j])
        return feed

    trial: _Trial = scan["trial"]
    joint = trial.drop(weights()) if moves else 0.0
    undone = 0
    while moves and joint > max_drop + 1e-9:  # back off one candidate of the latest lowering at a time
        name, previous = moves[-1]
        level[name] -= 1
        if level[name] <= previous:
            level[name] = previous
            moves.pop()
        undone += 1
        joint = trial.drop(weights()) if any(j >= 0 for j in level.values()) else 0.0
    ranks = {name: entries[name]["ranks"][j] for name, j in level.items() if j >= 0}
    shares = {name: _cost(entries[name], j)[0] for name, j in level.items() if j >= 0}
    return {"ranks": ranks, "shares": shares, "joint_drop": round(joint, 4), "undone": undone}


def report(scan: dict[str, Any], chosen: dict[str, Any], val_info: dict[str, int], max_drop: float) -> dict[str, Any]:
    """The scan as the step report shows it: per layer the ranks tried, the drop at each, the rank chosen."""
    rows = []
    for name, e in scan["layers"].items():
        rows.append({"layer": name, "shape": e["shape"], "ranks_tried": e["ranks"], "drop_pt": e["drops"],
                     "chosen_rank": chosen["ranks"].get(name), "budget_spent_pt": chosen["shares"].get(name, 0.0)})
    return {"metric": scan["metric"], "max_drop_pt": max_drop, "validation": val_info,
            "base": scan["base"], "layers": rows, "summed_drop_pt": round(sum(chosen["shares"].values()), 4),
            "joint_drop_pt": chosen["joint_drop"], "steps_backed_off": chosen["undone"]}
