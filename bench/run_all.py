"""Run every benchmark in ``bench/`` in turn; each writes its own section of BENCHMARKS.md."""
from __future__ import annotations

import importlib

BENCHES = ["bench.service_baseline", "bench.service_load", "bench.pruning_weight", "bench.distillation",
           "bench.pruning_channel", "bench.lottery", "bench.pruning_overhead",
           "bench.deep_compression", "bench.int8_cnn", "bench.minilm_int8", "bench.binary_mlp", "bench.quant_peers",
           "bench.early_exit_cnn", "bench.search"]
BENCHES += ["bench.slimmable_cnn"]
BENCHES += ["bench.lowrank_lenet", "bench.depthwise_cnn"]
BENCHES += ["bench.pruning_round_to", "bench.matrix"]
BENCHES += ["bench.recovery_service"]


def main() -> None:
    for name in BENCHES:
        print(f"== {name}", flush=True)
        importlib.import_module(name).main()


if __name__ == "__main__":
    main()
