"""The quality gate and the plain verdict (DESIGN §5 "Quality gate and verdict").

Every step's model is measured against the original (:func:`compression.metrics.measure`); the gate reads
those numbers and fails the job with :class:`~compression.errors.QualityGateFailed` when they fall past the
budget, so a broken model is never published as ``succeeded``. The budget depends on what can be measured:

- with labels: accuracy may fall at most ``eval.max_drop`` percentage points below the original's;
- without labels, class scores (``[N, C]`` first output): top-1 agreement with the original at least
  ``100 − eval.max_drop`` %;
- a language model (:func:`compression.metrics.lm_ids_input`: logits ``[N, T, vocab]`` on ids ``[N, T]``,
  ``perplexity`` measured): perplexity at most ``eval.max_perplexity_ratio`` times the original's, and
  nothing else (a per-token cosine or top-1 over a vocabulary says less about a language model than its
  perplexity does, and a second bar would fail models whose text is as good);
- otherwise (detector maps, embeddings, anything else): output cosine at least ``eval.min_cosine`` —
  the *centred* cosine (:func:`compression.metrics.fidelity`: deviations from the original's mean output)
  where several samples allow it, because a decoded detector output carries its anchor grid and a plain
  cosine stays near 1.0 for a model that no longer sees its input (measured on the zoo's YOLOv8: a 50%
  unstructured prune without recovery, plain cosine 0.90, centred 0.12).

A first output whose shape differs from the original's fails whatever the budget. The gate compares a
model's *first* output with the original's first output: the techniques that add outputs keep the original
ones first (early exit's main model is ``[logits, exit_1, …]``; slimmable's main model is the full width),
so like is compared with like.

:func:`verdict` says the same in words for people: smaller? faster at batch 1 / batch N? within budget?
"""
from __future__ import annotations

from typing import Any

from compression.errors import QualityGateFailed
from compression.metrics import THROUGHPUT_BATCH

# Speed ratios inside [SLOWER, FASTER] read as "same speed": latency p50 and batch throughput move by a few
# percent between two runs of the same model on a shared CPU (other processes, frequency scaling, the cache),
# so a 1.02× "speed-up" is noise, not a result. Sizes are exact and need no margin.
FASTER = 1.05
SLOWER = 0.95


def budget(eval_spec: Any, original: dict[str, Any], *, target: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the gate checks for this model and data, from the original's metrics.

    Args:
        eval_spec: the job's :class:`~compression.spec.EvalSpec` (``gate``, ``max_drop``, ``min_cosine``).
        original: the original's measured metrics (``accuracy`` is set with labels, ``agreement`` for class
            scores).
        target: a search's target (``metric``, ``max_accuracy_drop``, ``max_perplexity_ratio``), asked for
            explicitly: where it allows more than the gate, it wins. An agreement target widens an accuracy gate
            too: accuracy cannot fall by more than agreement does (a sample the original got right and the model
            agrees on stays right).

    Returns:
        ``{"metric": "accuracy"|"agreement"|"perplexity"|"output_cosine",
        "max_drop_pt"|"max_ratio"|"min_cosine": …, "enabled": bool}``.

    Example:
        >>> from compression.spec import EvalSpec
        >>> budget(EvalSpec(), {"accuracy": 0.93, "agreement": 1.0})
        {'metric': 'accuracy', 'max_drop_pt': 5.0, 'enabled': True}
    """
    t_metric, t_drop = (target or {}).get("metric"), float((target or {}).get("max_accuracy_drop") or 0.0)
    drop = max(eval_spec.max_drop, t_drop * 100 if t_metric in ("accuracy", "agreement") else 0.0)
    if original.get("perplexity") is not None:
        ratio = float(eval_spec.max_perplexity_ratio)
        if t_metric == "perplexity":
            ratio = max(ratio, float((target or {}).get("max_perplexity_ratio") or 0.0))
        out: dict[str, Any] = {"metric": "perplexity", "max_ratio": ratio}
    elif original.get("accuracy") is not None:
        out = {"metric": "accuracy", "max_drop_pt": drop}
    elif original.get("agreement") is not None:
        out = {"metric": "agreement", "max_drop_pt": drop}
    else:
        least = eval_spec.min_cosine
        if t_metric == "output_cosine":
            least = min(least, float(original.get("output_cosine", 1.0)) - t_drop)
        out = {"metric": "output_cosine", "min_cosine": round(least, 6)}
    out["enabled"] = bool(eval_spec.gate)
    return out


def describe_budget(eval_spec: Any, *, labels: bool | None) -> str:
    """The gate's budget in one line, before anything is measured (preflight): ``labels`` None when unknown."""
    if not eval_spec.gate:
        return "quality gate off (eval.gate: false): every step's model is published whatever its fidelity"
    acc = f"accuracy may fall at most {eval_spec.max_drop:g} pt below the original's"
    agree = f"top-1 agreement with the original at least {100 - eval_spec.max_drop:g}%"
    cos = f"output cosine at least {eval_spec.min_cosine:g} for outputs that are not class scores"
    lm = (f"language models: perplexity at most ×{eval_spec.max_perplexity_ratio:.2f} the original's")
    rule = acc if labels else agree if labels is False else f"{acc} (with labels; else {agree})"
    return (f"quality gate: {rule}; {cos}; {lm}; a step past it fails the job (quality_gate) — "
            "eval.max_drop / eval.min_cosine / eval.max_perplexity_ratio / eval.gate: false change it")


def _measured(m: dict[str, Any], original: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The gated numbers of one model: value, original value, drop (points) or cosine, within."""
    if "output_shape_mismatch" in m:
        got, want = m["output_shape_mismatch"]
        return {"metric": "output_shape", "value": got, "original": want, "within": False}
    metric = b["metric"]
    value = m.get(metric)
    if metric == "output_cosine":
        if m.get("centered_cosine") is not None:
            metric, value = "centered_cosine", m["centered_cosine"]
        within = value is not None and value >= b["min_cosine"] - 1e-9
        return {"metric": metric, "value": value, "min_cosine": b["min_cosine"], "within": within}
    ref = original[metric]
    if metric == "perplexity":
        ratio = None if value is None else round(float(value) / float(ref), 6)
        within = ratio is not None and ratio <= b["max_ratio"] + 1e-9
        return {"metric": metric, "value": value, "original": ref, "ratio": ratio, "max_ratio": b["max_ratio"],
                "within": within}
    drop = None if value is None else round((float(ref) - float(value)) * 100, 4)
    within = drop is not None and drop <= b["max_drop_pt"] + 1e-9
    return {"metric": metric, "value": value, "original": ref, "drop_pt": drop, "max_drop_pt": b["max_drop_pt"],
            "within": within}


def check_gate(step: int, method: str, m: dict[str, Any], original: dict[str, Any], eval_spec: Any, *,
               target: dict[str, Any] | None = None) -> dict[str, Any]:
    """Gate one step's model.

    Args:
        step: the step's index (0-based; messages count from 1).
        method: the step's method, for the message.
        m: the step's measured metrics; original: the original's.
        eval_spec: the job's eval options; ``gate: false`` never raises.
        target: a search's target, see :func:`budget`.

    Returns:
        The gated numbers (``metric, value, original, drop_pt, max_drop_pt | ratio, max_ratio | min_cosine,
        within``).

    Raises:
        QualityGateFailed: the model is past the budget (and the gate is on); ``details`` = the numbers plus
            ``step`` and ``method``.

    Example:
        >>> check_gate(0, "prune", {"accuracy": 0.61}, {"accuracy": 0.93}, EvalSpec())  # doctest: +SKIP
        QualityGateFailed: step 1 (prune): accuracy 0.61 vs 0.93 original (drop 32.0 pt > max_drop 5.0 pt); …
    """
    b = budget(eval_spec, original, target=target)
    res = _measured(m, original, b)
    if res["within"] or not b["enabled"]:
        return res
    where = f"step {step + 1} ({method})"
    how = "set eval.max_drop or eval.gate: false to publish anyway"
    if res["metric"] == "output_shape":
        text = f"{where}: first output has shape {res['value']}, the original's {res['original']}"
        how = "set eval.gate: false to publish anyway"
    elif res["metric"] in ("output_cosine", "centered_cosine"):
        value = "not measurable" if res["value"] is None else f"{res['value']:.4f}"
        what = "output cosine" if res["metric"] == "output_cosine" else "output cosine (centred on the original's mean)"
        text = f"{where}: {what} to the original {value} < min_cosine {res['min_cosine']:g}"
        how = "set eval.min_cosine or eval.gate: false to publish anyway"
    elif res["metric"] == "perplexity":
        if res["value"] is None:
            text = f"{where}: perplexity is not measurable on its output (the original's: {res['original']:.4g})"
        else:
            text = (f"{where}: perplexity {res['value']:.4g} vs {res['original']:.4g} original "
                    f"(×{res['ratio']:.3f} > max_perplexity_ratio ×{res['max_ratio']:.2f})")
        how = "set eval.max_perplexity_ratio or eval.gate: false to publish anyway"
    else:
        name = "accuracy" if res["metric"] == "accuracy" else "top-1 agreement with the original"
        if res["value"] is None:
            text = f"{where}: {name} is not measurable on its output (the original's: {res['original']:.3f})"
        elif res["metric"] == "accuracy":
            text = (f"{where}: accuracy {res['value']:.3f} vs {res['original']:.3f} original "
                    f"(drop {res['drop_pt']:.1f} pt > max_drop {res['max_drop_pt']:g} pt)")
        else:
            text = (f"{where}: {name} {res['value']:.3f} (drop {res['drop_pt']:.1f} pt from 1.0 "
                    f"> max_drop {res['max_drop_pt']:g} pt; no labels)")
    raise QualityGateFailed(f"{text}; {how}", details={"step": step, "method": method, **res})


def _times(r: float) -> str:
    return f"{r:.1f}×" if r >= 1.95 else f"{r:.2f}×"


def _speed(r: float | None) -> bool | None:
    return None if r is None else r > FASTER


def _speed_text(r: float | None, where: str) -> str | None:
    if r is None:
        return None
    if r > FASTER:
        return f"{_times(r)} faster {where}"
    if r < SLOWER:
        return f"{_times(1 / r)} slower {where}"
    return f"same speed {where} ({r:.2f}×)"


def verdict(m: dict[str, Any], original: dict[str, Any], eval_spec: Any, *,
            target: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plain verdict of one model against the original, from ``m["ratios"]`` and the gated numbers.

    Speeds count as faster only past :data:`FASTER` (1.05×) and as slower under :data:`SLOWER` (0.95×):
    between them is run-to-run noise on a shared CPU, reported as "same speed" (``faster_*`` False).

    Returns:
        ``{"smaller", "faster_batch1", "faster_batchN", "within_budget", "summary"}``; a speed is None when it
        was not measured (a fixed batch size), ``within_budget`` None when nothing could be compared.

    Example:
        >>> verdict(m, m_orig, EvalSpec())["summary"]  # doctest: +SKIP
        '3.9× smaller, 1.2× faster at batch 1, same speed at batch 32 (1.01×), accuracy −0.4 pt (budget 5 pt)'
    """
    r = m.get("ratios") or {}
    size = r.get("file_bytes")
    b1, bn = r.get("latency_p50_speedup"), r.get("throughput")
    gated = _measured(m, original, budget(eval_spec, original, target=target))
    parts = []
    if size is not None:
        if abs(size - 1) < 0.005:  # weight zeros are stored dense: the same file, not "1.00× smaller"
            parts.append("same size")
        else:
            parts.append(f"{_times(size)} smaller" if size > 1 else f"{_times(1 / size)} larger")
    parts += [t for t in (_speed_text(b1, "at batch 1"), _speed_text(bn, f"at batch {THROUGHPUT_BATCH}")) if t]
    within: bool | None = gated["within"]
    if gated["metric"] == "output_shape":
        parts.append(f"output shape changed ({gated['value']} vs {gated['original']})")
    elif gated["value"] is None:
        within = None
    elif gated["metric"] in ("output_cosine", "centered_cosine"):
        parts.append(f"output cosine {gated['value']:.3f} (min {gated['min_cosine']:g})")
    elif gated["metric"] == "perplexity":
        bound = f"within ×{gated['max_ratio']:.2f}" if gated["within"] else f"over budget ×{gated['max_ratio']:.2f}"
        parts.append(f"perplexity {gated['value']:.2f} vs {gated['original']:.2f} (×{gated['ratio']:.3f}, {bound})")
    else:
        name = "accuracy" if gated["metric"] == "accuracy" else "agreement"
        delta = -gated["drop_pt"]
        sign = "−" if delta < 0 else "+" if delta > 0 else "±"
        over = "" if gated["within"] else ", over budget"
        parts.append(f"{name} {sign}{abs(delta):.1f} pt (budget {gated['max_drop_pt']:g} pt{over})")
    return {"smaller": size is not None and size > 1, "faster_batch1": _speed(b1), "faster_batchN": _speed(bn),
            "within_budget": within, "summary": ", ".join(parts)}
