"""Issue 16 — ``netcompress demo``: under 2 minutes, ≥ 2× smaller and faster, ≤ 1 pt accuracy drop.

Starts ``netcompress serve`` (SQLite, filesystem broker, one worker) in a temporary folder and runs the demo
command as a user would, a subprocess in an empty folder, ``RUNS`` times. Each row: the wall time of the whole
command (training the original, uploads, the job, downloads) and what the service measured. About 2 minutes.

    python -m bench.demo
"""
from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

from bench.report import write_section
from testkit.stack import NC, start_embedded

RUNS = 3


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        stack = start_embedded(Path(tmp) / "serve")
        try:
            env = {**stack.env, "NETCOMPRESS_URL": stack.url, "NETCOMPRESS_API_KEY": stack.key}
            env.pop("PYTHONPATH", None)
            rows = []
            for run in range(RUNS):
                cwd = Path(tmp) / f"user{run}"
                cwd.mkdir()
                t0 = time.monotonic()
                r = subprocess.run(NC + ["demo"], env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
                seconds = time.monotonic() - t0
                job = stack.client().get("/v1/jobs", params={"limit": 1}).json()["items"][0]
                res, orig = job["metrics"]["result"], job["metrics"]["original"]
                ra = res["ratios"]
                rows.append(
                    f"| {run + 1} | {r.returncode} | {seconds:.0f} | {ra['file_bytes']:.1f}× | "
                    f"{ra['latency_p50_speedup']:.1f}× | {ra['throughput']:.1f}× | {orig['accuracy']:.4f} | "
                    f"{res['accuracy']:.4f} | {100 * ra['accuracy_delta']:+.1f} | "
                    f"{'yes' if seconds < 120 and ra['file_bytes'] >= 2 and ra['latency_p50_speedup'] >= 2 and ra['accuracy_delta'] >= -0.01 else 'MISS'} |")
                print(rows[-1], flush=True)
        finally:
            stack.stop()
    body = ("`netcompress demo` run as a user runs it (a subprocess in an empty folder) against `netcompress serve`; "
            "the recipe is channel prune 50% + distillation (8 epochs) + static int8 on a BatchNorm CNN trained "
            "in the command on UCI's handwritten digits (upsampled to 32×32; 1,438 train / 359 held out). "
            "Target: < 120 s, ≥ 2× smaller, ≥ 2× faster at batch 1, accuracy drop ≤ 1 pt.\n\n"
            "| run | exit | seconds | smaller (file) | faster batch 1 | faster batch 32 | accuracy original | "
            "accuracy result | Δ pt | target met |\n|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    write_section("demo", body)


if __name__ == "__main__":
    main()
