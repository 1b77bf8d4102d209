"""Factorization: one trained layer becomes two smaller ones (``lowrank``, ``depthwise_separable``).

- :mod:`.lowrank` — ``LowRankSpec`` and ``method: lowrank``: truncated SVD of Linear/MatMul weights, spatial
  SVD of k×k convs, optional fine-tune.
- :mod:`.depthwise` — ``DepthwiseSpec`` and ``method: depthwise_separable``: MobileNet's block from a dense
  conv, rank-1 initialised, recovered by distillation.
- :mod:`.svd` the factor math, :mod:`.layers` which nodes can be factored, :mod:`.surgery` the graph rewrites,
  :mod:`.measure` per-layer MACs and held-out accuracy, :mod:`.recovery` the fine-tune of a factored graph,
  :mod:`.sensitivity` ``lowrank``'s default ranks (a per-layer scan on a slice of the training split).

Importing the package registers both techniques.
"""
from compression.techniques.factorization import depthwise, lowrank

__all__ = ["depthwise", "lowrank"]
