"""Per-layer sensitivity: a quick scan of how much each weight layer's pruning moves the output, and a
sparsity per layer allocated from it — what the search's ``prune.allocation: sensitivity`` means.

The search (:mod:`compression.search`) scans once per job and checkpoints the scan; every
``sensitivity`` candidate then gets ``scope: layer`` and a ``layers`` map from :func:`allocate`, so layers
that barely affect the output are pruned harder and the fragile ones are spared. The search space
(:mod:`compression.search_space`) asks here where the pseudo-field applies and which values it takes.

Example:
    >>> sens = layer_sensitivity(model, ev)                 # doctest: +SKIP
    >>> layers = allocate(sens, 0.8)   # weight -> sparsity, parameter-weighted mean 0.8  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from compression.metrics import EvalData, run_batched, session
from compression.techniques.pruning.weight import prunable_initializers

SENSITIVITY_LEVELS = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
SCAN_SAMPLES = 512
ALLOCATIONS = ("uniform", "sensitivity")  # the values of the search's ``allocation`` pseudo-field

Sensitivity = dict[str, dict[str, Any]]  # weight -> {node, params, levels, relative_error}


def layer_sensitivity(model: onnx.ModelProto, ev: EvalData, threads: int = 0) -> Sensitivity:
    """Per prunable weight: the output's relative L2 error when that layer alone is magnitude-pruned to
    each of SENSITIVITY_LEVELS (the other layers intact), on up to SCAN_SAMPLES held-out inputs.

    A smooth, label-free measure: small prunings move agreement or accuracy by nothing, but they move
    the outputs, which is what ranks layers.
    """
    inputs = {k: v[:SCAN_SAMPLES] for k, v in ev.inputs.items()}
    ref = run_batched(session(model, threads), inputs)[0].astype(np.float64)
    norm = float(np.linalg.norm(ref)) or 1.0
    inits = {t.name: i for i, t in enumerate(model.graph.initializer)}
    out: Sensitivity = {}
    for init_name, node_name in prunable_initializers(model).items():
        w = onnx.numpy_helper.to_array(model.graph.initializer[inits[init_name]])
        if not np.issubdtype(w.dtype, np.floating) or w.size < 2:
            continue
        order = np.sort(np.abs(w).ravel())
        errors = []
        for level in SENSITIVITY_LEVELS:
            if level == 0.0:
                errors.append(0.0)
                continue
            cut = order[min(int(level * w.size), w.size - 1)]
            pruned = np.where(np.abs(w) < cut, 0, w).astype(w.dtype)
            trial = onnx.ModelProto()
            trial.CopyFrom(model)
            trial.graph.initializer[inits[init_name]].CopyFrom(onnx.numpy_helper.from_array(pruned, init_name))
            y = run_batched(session(trial, threads), inputs)[0].astype(np.float64)
            errors.append(round(float(np.linalg.norm(y - ref)) / norm, 6))
        out[init_name] = {"node": node_name, "params": int(w.size), "levels": list(SENSITIVITY_LEVELS),
                          "relative_error": errors}
    return out


def allocate(sens: Sensitivity, target: float) -> dict[str, float]:
    """Per-layer sparsities whose parameter-weighted mean reaches ``target`` at the least summed error.

    Greedy on the scanned curves: repeatedly raise the layer whose next level costs the least error per
    weight removed (Han et al.'s sensitivity analysis, made automatic).
    """
    total = sum(s["params"] for s in sens.values())
    level = {k: 0 for k in sens}
    removed = 0.0
    while removed < target * total - 1e-9:
        best, best_cost = None, float("inf")
        for k, s in sens.items():
            i = level[k]
            if i + 1 >= len(s["levels"]):
                continue
            gain = (s["levels"][i + 1] - s["levels"][i]) * s["params"]
            cost = max(s["relative_error"][i + 1] - s["relative_error"][i], 0.0) / gain
            if cost < best_cost:
                best, best_cost = k, cost
        if best is None:
            break
        s = sens[best]
        removed += (s["levels"][level[best] + 1] - s["levels"][level[best]]) * s["params"]
        level[best] += 1
    return {k: float(sens[k]["levels"][i]) for k, i in level.items()}


def allocate_step(step: dict[str, Any], sens: Sensitivity) -> None:
    """Give a prune step (a raw spec dict) the per-layer sparsities of :func:`allocate` for its ``sparsity``;
    an empty scan (nothing prunable) leaves the step as written."""
    if sens:
        step["scope"] = "layer"
        step["layers"] = allocate(sens, step["sparsity"])


# ------------------------------------------------------------------------ the search's pseudo-field
def allocation_refusal(steps: list[dict[str, Any]], values: list[Any]) -> str | None:
    """Why a searched ``allocation`` with ``values`` cannot apply to the steps its key selects (None: it can)."""
    if not all(s.get("method") == "prune" for s in steps):
        return "allocation applies to prune steps"
    if any(v not in ALLOCATIONS for v in values):
        return "allocation values: " + ", ".join(ALLOCATIONS)
    return None


def allocation_applies(step: dict[str, Any]) -> bool:
    """A per-layer allocation of zeros means something for weight pruning only (channel pruning plans its own)."""
    return step.get("granularity", "weight") == "weight"


def allocation_searchable(step: dict[str, Any]) -> bool:
    """Whether ``search: auto`` searches the allocation of this step: not when the step names its own
    per-layer sparsities (``layers``) or is a lottery ticket (``rewind``)."""
    return step.get("rewind", "none") == "none" and not step.get("layers")
