"""Issue 13: the technique × model matrix on the zoo of real architectures — status (succeeded, refused with
its reason, stopped by the quality gate), size ×, ONNX Runtime latency × at batch 1 and 8, fidelity.

    python -m bench.matrix                  # every technique × every model (legacy17), foreign forms for int8/fp16/prune
    python -m bench.matrix resnet18 yolov8  # only these models
    python -m bench.matrix --rerun crashed  # re-run the cells of var/bench-matrix.json with that status

Each cell is one job through :func:`compression.pipeline.run_pipeline` (what the worker runs), via
:func:`testkit.matrix.run_cell`; latency here is re-measured on both files with more runs than the job's own.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from bench.report import fmt, write_section
from testkit import real_zoo
from testkit.matrix import TECHNIQUES, run_cell

FOREIGN = ("dynamo", "legacy12", "fixed1", "constants", "int32")
FOREIGN_TECHNIQUES = ("int8", "fp16", "prune_channel")


def cells_for(names: list[str]) -> list[tuple[str, str, str]]:
    out = [(n, "legacy17", t) for n in names for t in TECHNIQUES]
    out += [(n, f, t) for n in names for f in FOREIGN if f in real_zoo.forms(n) for t in FOREIGN_TECHNIQUES]
    return out


RESULTS = Path("var/bench-matrix.json")


def main(names: list[str] | None = None, rerun: str | None = None) -> None:
    if rerun:
        rows = json.loads(RESULTS.read_text())
        todo = [(r["model"], r["form"], r["technique"]) for r in rows if r["status"] == rerun]
    else:
        rows, todo = [], cells_for(names or list(real_zoo.ZOO))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, form, tech in todo:
            cell = run_cell(name, form, tech, folder, latency_runs=20, batch8=True)
            row = cell.row()
            print(json.dumps({k: row[k] for k in ("model", "form", "technique", "status", "reason", "seconds")}),
                  flush=True)
            key = (name, form, tech)
            rows = [r for r in rows if (r["model"], r["form"], r["technique"]) != key] + [row] if rerun else [*rows, row]
    order = {c: i for i, c in enumerate(cells_for(list(real_zoo.ZOO)))}
    rows.sort(key=lambda r: order.get((r["model"], r["form"], r["technique"]), len(order)))
    write_section("matrix", _table(rows))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=1))


def _table(rows: list[dict]) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("succeeded", "refused", "quality_gate", "crashed")}
    lines = [
        "### Technique × model matrix (issue 13)",
        "",
        "`python -m bench.matrix`. Every cell is one job (`run_pipeline`, as the worker runs it) with the spec a user "
        "writes for that technique (`testkit/matrix.py`): defaults, plus `finetune: {epochs: 1}` on the channel "
        "prune. Models: `testkit/architectures.py`, trained a few steps on shipped data (`testkit/real_zoo.py`); "
        "form `legacy17` unless named. size × = original file bytes / result; latency × = original p50 / result "
        "p50 at batch 1 (the job's measurement), median at batch 8 (30 runs, 2 threads), throughput × at batch 32; fidelity against the original on "
        "the held-out split (acc = accuracy with labels, agr = top-1 agreement, cos = output cosine, "
        "ccos = cosine of outputs centred on the original's mean); preflight = what `POST /v1/jobs/preflight` "
        "said before the job ran. Statuses: "
        + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".",
        "",
        "| model | form | technique | status | preflight | size × | latency × b1 | latency × b8 | throughput × b32 | fidelity | reason |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r["fidelity"]
        fid = " ".join(f"{short}={fmt(f[k], 3)}" for k, short in (("accuracy", "acc"), ("agreement", "agr"),
                                                                  ("output_cosine", "cos"), ("centered_cosine", "ccos"))
                       if k in f)
        reason = (r["reason"] or "").replace("|", "/").replace("\n", " ")[:160]
        pre = "applies" if r["preflight_applies"] else "does not apply"
        lines.append(f"| {r['model']} | {r['form']} | {r['technique']} | {r['status']} | {pre} | {fmt(r['size_x'], 3)} | "
                     f"{fmt(r['latency_b1_x'], 3)} | {fmt(r['latency_b8_x'], 3)} | {fmt(r['throughput_x'], 3)} | {fid} | {reason} |")
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--rerun"]:
        main(rerun=args[1])
    else:
        main(args or None)
