"""Run every benchmark in ``bench/`` in turn; each writes its own section of BENCHMARKS.md."""
from __future__ import annotations

import importlib

BENCHES = ["bench.service_baseline"]


def main() -> None:
    for name in BENCHES:
        print(f"== {name}", flush=True)
        importlib.import_module(name).main()


if __name__ == "__main__":
    main()
