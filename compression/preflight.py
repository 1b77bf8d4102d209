"""Preflight's analysis: what a job would do on a model, without running it.

Per step: whether it applies to this model, whether it trains, whether it needs the ONNX graph converted to
torch (and so which ops block it), whether it needs data, the layers it can act on, and a rough cost from
the model's MACs (a batch-1 forward, or its parameters when that could not run) and the dataset's size.
Every step answers for itself (:class:`~compression.step_spec.StepSpec`); the facts about the model come
from a sandboxed probe (``sandbox_tasks.preflight_probe``, given :data:`PRUNABLE_OPS` and
:data:`QUANTIZABLE_OPS`), the caller's to run.

Example:
    >>> from compression.spec import parse_spec
    >>> facts = ModelFacts(op_types={"Gemm": 2}, unsupported_ops=[], prunable=2, quantizable=2, macs=1000)
    >>> report = analyse(parse_spec({"steps": [{"method": "prune"}]}), facts, model_params=1000,
    ...                  dataset_samples=None)
    >>> report["steps"][0]["applies"], report["cost"]["size"]
    (True, 'small')
"""
from __future__ import annotations

from typing import Any

from compression.gate import describe_budget
from compression.registry import get_technique
from compression.step_spec import ModelFacts

__all__ = ["PRUNABLE_OPS", "QUANTIZABLE_OPS", "ModelFacts", "analyse", "model_structure", "model_facts", "zero_sample"]

# Orders of magnitude, not benchmarks: effective multiply-accumulates per second of small-batch work.
CPU_TRAIN_MACS_S = 2e9
GPU_TRAIN_MACS_S = 1e11
CPU_INFER_MACS_S = 1e10
STEP_OVERHEAD_S = 2.0  # export, re-load in ONNX Runtime, file writes
PRUNABLE_OPS = frozenset({"Conv", "Gemm", "MatMul", "ConvTranspose"})
QUANTIZABLE_OPS = frozenset({"Conv", "Gemm", "MatMul", "ConvTranspose", "Gather", "Attention", "LSTM"})
# measurement of the original and every step's model: warm-up runs, and 32-sample batches for throughput
WARMUP_RUNS = 5
THROUGHPUT_PASSES = 32 * 5


def model_structure(model: Any, prunable_ops: frozenset[str] = PRUNABLE_OPS,
                    quantizable_ops: frozenset[str] = QUANTIZABLE_OPS) -> dict[str, Any]:
    """What preflight knows of a model without running it: op histogram, ops the converter lacks, weighted
    layers (nodes of ``prunable_ops`` whose weight is a constant) and nodes quantization acts on.

    Weights held in ``Constant`` nodes (paddle2onnx's form) count as weights: every step lifts them into
    initializers first (:func:`compression.graph_prep.lift_constants`), so preflight must see them as the
    steps do. Runs in the sandbox (it parses an uploaded graph); imports torch through the converter.
    """
    from compression.analysis import graph_io, op_histogram
    from compression.converter import unsupported_ops
    from compression.graph_prep import lift_constants
    from compression.techniques.quantization.weight_only import weight_summary

    model, _ = lift_constants(model)
    inits = {t.name for t in model.graph.initializer}
    hist = op_histogram(model)
    weighted = sum(1 for n in model.graph.node if n.op_type in prunable_ops and any(i in inits for i in n.input[:2]))
    return {"op_types": hist, "unsupported_ops": unsupported_ops(model), "prunable": weighted,
            "quantizable": sum(hist.get(op, 0) for op in quantizable_ops),
            "outputs": [o["shape"] for o in graph_io(model)["outputs"]], "weight_only": weight_summary(model)}


def zero_sample(model: Any) -> dict[str, Any]:
    """One all-zeros sample per graph input (symbolic dims → 1): what the MAC probe runs."""
    import numpy as np

    from compression.modelio import describe

    sample = {}
    for inp in describe(model)["inputs"]:
        dims = [d if isinstance(d, int) and d > 0 and axis > 0 else 1 for axis, d in enumerate(inp["shape"])]
        sample[inp["name"]] = np.zeros(dims, dtype=np.dtype(inp["dtype"]) if inp["dtype"] != "unknown" else np.float32)
    return sample


def model_facts(model: Any) -> ModelFacts:
    """:func:`model_structure` and the batch-1 MACs in one :class:`ModelFacts`, in this process (tests, bench;
    the service probes in the sandbox)."""
    from compression.analysis import macs

    try:
        value: int | None = int(macs(model, zero_sample(model)))
    except Exception:
        value = None
    return ModelFacts(**model_structure(model), macs=value)


def analyse(spec: Any, facts: ModelFacts, model_params: int, dataset_samples: int | None,
            *, probe_note: str | None = None, labels: bool | None = None) -> dict[str, Any]:
    """The preflight report of a parsed spec on a model, less what the service adds (ids, queue, rejection).

    Args:
        spec: a :class:`~compression.spec.ParsedSpec`.
        facts: what the probe measured on the uploaded model (``macs`` None or 0: estimated from params).
        model_params: the model's parameter count.
        dataset_samples: the dataset's size, None without a dataset.
        probe_note: why the probe fell short (a limit it hit), noted on the first step.
        labels: whether the dataset has labels (None: unknown), for the quality gate's rule.

    Returns:
        ``model`` (params, macs, macs_source, op_types, unsupported_ops), ``dataset_samples``, ``steps``
        (one dict per step: index, method, phase, applies, trains, needs_torch, needs_data, blocking_ops,
        targets, forward_passes, notes), ``runnable`` (every step applies), ``cost`` and ``quality_gate``
        (``enabled, max_drop_pt, min_cosine, max_perplexity_ratio, summary``: the budget every step's model is
        held to).

    Example:
        >>> analyse(spec, facts, model_params=5000, dataset_samples=1000)["cost"]["seconds_cpu"]  # doctest: +SKIP
        10.1
    """
    macs, source = facts.macs, "measured"
    if not macs:
        macs, source = model_params, "estimated"  # dense layers: one MAC per weight per sample
    has_data = dataset_samples is not None
    samples = dataset_samples or 0
    train_n = int(samples * (1 - spec.eval.holdout))
    eval_n = min(int(samples * spec.eval.holdout), spec.eval.max_eval_samples) if samples else 64

    steps, train_passes, infer_passes = [], 0, 0
    for i, step in enumerate(spec.steps):
        row = _step(i, step, facts, has_data)
        if probe_note and i == 0:
            row["notes"].append(probe_note)
        passes = step.forward_passes(train_n)
        train_passes += passes.train
        infer_passes += passes.infer
        row["forward_passes"] = passes.train + passes.infer
        steps.append(row)

    # measurement: the original and every step's model on the held-out split, latency and throughput runs
    infer_passes += (len(spec.steps) + 1) * (eval_n + spec.eval.latency_runs + WARMUP_RUNS + THROUGHPUT_PASSES)
    overhead = STEP_OVERHEAD_S * (len(spec.steps) + 1)
    infer_s = macs * infer_passes / CPU_INFER_MACS_S
    cpu_s = macs * train_passes / CPU_TRAIN_MACS_S + infer_s + overhead
    gpu_s = macs * train_passes / GPU_TRAIN_MACS_S + infer_s + overhead
    return {
        "model": {"params": model_params, "macs": macs, "macs_source": source, "op_types": facts.op_types,
                  "unsupported_ops": facts.unsupported_ops},
        "dataset_samples": samples if has_data else None,
        "steps": steps,
        "runnable": all(s["applies"] for s in steps),
        "quality_gate": {"enabled": spec.eval.gate, "max_drop_pt": spec.eval.max_drop,
                         "min_cosine": spec.eval.min_cosine, "max_perplexity_ratio": spec.eval.max_perplexity_ratio,
                         "summary": describe_budget(spec.eval, labels=labels)},
        "cost": {"macs_total": int(macs * (train_passes + infer_passes)), "seconds_cpu": round(cpu_s, 1),
                 "seconds_gpu": round(gpu_s, 1),
                 "size": "small" if cpu_s < 60 else "medium" if cpu_s < 600 else "large",
                 "basis": f"{source} MACs/sample × forward passes (training 3× per sample-epoch); "
                          "order of magnitude only"},
    }


def _step(i: int, step: Any, facts: ModelFacts, has_data: bool) -> dict[str, Any]:
    """One step's row, less its forward passes: what it needs, against what the model and request give."""
    check = step.preflight(facts)
    blocking = list(facts.unsupported_ops) if step.needs_torch else []
    no_data = step.needs_data and not has_data
    notes = []
    if blocking:
        notes.append("the ONNX→torch converter lacks these ops: training/structured steps cannot run")
    if no_data:
        notes.append("needs a dataset (dataset_id)")
    notes += check.notes
    if i > 0:
        notes.append("checked against the uploaded model; earlier steps change the graph this step sees")
    return {"index": i, "method": step.method, "phase": get_technique(step.method).phase,
            "applies": not blocking and not no_data and check.applies,
            "trains": step.trains, "needs_torch": step.needs_torch, "needs_data": step.needs_data,
            "blocking_ops": blocking, "targets": check.targets, "notes": notes}
