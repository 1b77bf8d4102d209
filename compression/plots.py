"""Small self-contained SVG charts for reports (no plotting library on a worker; opens in any browser)."""
from __future__ import annotations

from html import escape
from typing import Any

_W, _H, _PAD = 640, 420, 60
_LABELS = {"latency": "latency p50 (ms)", "file_bytes": "file size (bytes)", "compressed_bytes": "compressed size (bytes)",
           "macs": "MACs", "params": "parameters"}


def _scale(lo: float, hi: float, a: float, b: float):
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def pareto_svg(summary: dict[str, Any]) -> str:
    """Every finished candidate as (metric drop, objective); the Pareto front joined; the best ringed;
    the target's bound as a dashed line; the original as a square."""
    target = summary["target"]
    limit = summary.get("allowed_drop", target["max_accuracy_drop"])  # a summary written before perplexity
    done = [c for c in summary["candidates"] if c.get("status") == "done"]
    xs = [c["drop"] for c in done] + [0.0, limit]
    ys = [c["objective"] for c in done] + [summary["original"]["objective"]]
    sx = _scale(min(xs), max(xs), _PAD, _W - 20)
    sy = _scale(min(ys), max(ys), _H - _PAD, 20)
    front = {pid: i for i, pid in enumerate(summary["front"])}
    xlabel = ("perplexity rise vs original (model / original − 1)" if target["metric"] == "perplexity"
              else f'{target["metric"]} drop vs original')
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" font-family="sans-serif" font-size="12">',
             '<rect width="100%" height="100%" fill="white"/>',
             f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - 20}" y2="{_H - _PAD}" stroke="#333"/>',
             f'<line x1="{_PAD}" y1="20" x2="{_PAD}" y2="{_H - _PAD}" stroke="#333"/>',
             f'<text x="{(_W + _PAD) / 2}" y="{_H - 20}" text-anchor="middle">{escape(xlabel)}</text>',
             f'<text x="16" y="{_H / 2}" transform="rotate(-90 16 {_H / 2})" text-anchor="middle">'
             f'{escape(_LABELS.get(target["optimize"], target["optimize"]))}</text>']
    bound = sx(limit)
    parts.append(f'<line x1="{bound:.1f}" y1="20" x2="{bound:.1f}" y2="{_H - _PAD}" stroke="#c00" stroke-dasharray="4 3"/>')
    for v, anchor in ((min(xs), "start"), (max(xs), "end")):
        parts.append(f'<text x="{sx(v):.1f}" y="{_H - _PAD + 16}" text-anchor="{anchor}">{v:.4g}</text>')
    for v in (min(ys), max(ys)):
        parts.append(f'<text x="{_PAD - 4}" y="{sy(v):.1f}" text-anchor="end">{v:.4g}</text>')
    pts = sorted((c["drop"], c["objective"]) for c in done if c["id"] in front)
    if len(pts) > 1:
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>')
    for c in done:
        color = "#1f77b4" if c["id"] in front else "#999"
        title = escape(", ".join(f"{k}={v}" for k, v in (c.get("values") or {}).items()) or c["id"])
        parts.append(f'<circle cx="{sx(c["drop"]):.1f}" cy="{sy(c["objective"]):.1f}" r="4" fill="{color}">'
                     f'<title>{title}: drop {c["drop"]:.4g}, {c["objective"]:.4g}</title></circle>')
    best = summary.get("best")
    if best:
        parts.append(f'<circle cx="{sx(best["drop"]):.1f}" cy="{sy(best["objective"]):.1f}" r="8" fill="none" '
                     f'stroke="#d62728" stroke-width="2"><title>best</title></circle>')
    ox, oy = sx(0.0), sy(summary["original"]["objective"])
    parts.append(f'<rect x="{ox - 4:.1f}" y="{oy - 4:.1f}" width="8" height="8" fill="#2ca02c"><title>original</title></rect>')
    parts.append("</svg>")
    return "\n".join(parts)
