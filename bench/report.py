"""Write a benchmark's markdown section into BENCHMARKS.md between markers (re-runs replace it)."""
from __future__ import annotations

import os
import platform
import re
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILE = ROOT / "BENCHMARKS.md"


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    cores = os.cpu_count()  # not ``nproc``: it reports OMP_NUM_THREADS, which benches set to 1
    return f"{cpu}, {cores} cores, Linux {platform.release()}, Python {platform.python_version()}"


def write_section(name: str, body: str) -> None:
    header = f"<!-- bench:{name} -->"
    footer = f"<!-- /bench:{name} -->"
    section = f"{header}\n_Measured {date.today().isoformat()} on {machine()}._\n\n{body.strip()}\n{footer}"
    text = FILE.read_text() if FILE.exists() else "# Benchmarks\n\nEvery table is written by a script in `bench/`.\n"
    pattern = re.compile(re.escape(header) + ".*?" + re.escape(footer), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    FILE.write_text(text)


def fmt(v, nd: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)
