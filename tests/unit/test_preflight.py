"""Preflight's analysis in the library (compression.preflight), without HTTP: the route adds ids and the queue."""
from __future__ import annotations

from dataclasses import replace

import pytest

from compression.preflight import ModelFacts, analyse
from compression.spec import parse_spec

CNN = ModelFacts(op_types={"Conv": 2, "Gemm": 1, "Relu": 2}, unsupported_ops=[], prunable=3, quantizable=3, macs=1000)
LOOPY = ModelFacts(op_types={"Loop": 1, "Gemm": 1}, unsupported_ops=["Loop"], prunable=1, quantizable=1, macs=None)
NO_WEIGHTS = ModelFacts(op_types={"Add": 1}, unsupported_ops=[], prunable=0, quantizable=0, macs=10)
NO_DATA = "needs a dataset (dataset_id)"


def _report(steps, facts=CNN, samples=1000, **kw):
    return analyse(parse_spec({"steps": steps}), facts, model_params=5000, dataset_samples=samples, **kw)


def test_report_of_an_onnx_only_step_and_its_cost():
    r = _report([{"method": "prune", "sparsity": 0.5}])
    assert r["model"] == {"params": 5000, "macs": 1000, "macs_source": "measured",
                          "op_types": CNN.op_types, "unsupported_ops": []}
    assert r["dataset_samples"] == 1000 and r["runnable"]
    [step] = r["steps"]
    assert step == {"index": 0, "method": "prune", "phase": "pruning", "applies": True, "trains": False,
                    "needs_torch": False, "needs_data": False, "blocking_ops": [], "targets": 3,
                    "forward_passes": 0, "notes": [step["notes"][0]]}
    assert step["notes"][0].startswith("weight pruning: dense ONNX Runtime kernels do not skip zeros")
    # measuring the original and the step's model: 200 held-out + 50 latency + 5 warm-up + 160 throughput, twice
    infer = 2 * (200 + 50 + 5 + 160)
    assert r["cost"]["macs_total"] == 1000 * infer
    assert r["cost"]["seconds_cpu"] == r["cost"]["seconds_gpu"] == round(1000 * infer / 1e10 + 4.0, 1)
    assert r["cost"]["size"] == "small" and r["cost"]["basis"].startswith("measured MACs/sample")


def test_training_counts_three_passes_per_sample_epoch_and_the_gpu_is_faster():
    r = _report([{"method": "prune", "finetune": {"epochs": 2}}], facts=replace(CNN, macs=10**9))
    [step] = r["steps"]
    assert step["trains"] and step["needs_torch"] and step["needs_data"] and step["applies"]
    assert step["forward_passes"] == 3 * 2 * 800  # 80 % of 1000 samples train
    assert r["cost"]["seconds_gpu"] < r["cost"]["seconds_cpu"] and r["cost"]["size"] == "large"


def test_ops_the_converter_lacks_block_only_steps_that_need_torch():
    r = _report([{"method": "quantize", "mode": "dynamic"}, {"method": "prune", "granularity": "channel"},
                 {"method": "distill"}], facts=LOOPY)
    dyn, channel, distill = r["steps"]
    assert dyn["applies"] and dyn["blocking_ops"] == [] and not dyn["needs_torch"]
    for step in (channel, distill):
        assert not step["applies"] and step["needs_torch"] and step["blocking_ops"] == ["Loop"]
        assert step["notes"][0] == "the ONNX→torch converter lacks these ops: training/structured steps cannot run"
    assert not channel["trains"] and distill["trains"] and not r["runnable"]


def test_macs_unmeasured_are_estimated_from_parameters():
    for facts in (LOOPY, replace(CNN, macs=0)):
        r = _report([{"method": "quantize", "mode": "dynamic"}], facts=facts)
        assert r["model"]["macs"] == 5000 and r["model"]["macs_source"] == "estimated"
        assert r["cost"]["basis"].startswith("estimated MACs/sample")


@pytest.mark.parametrize("raw", [{"method": "distill"}, {"method": "quantize", "mode": "static"},
                                 {"method": "slimmable", "epochs": 0}])
def test_a_step_that_needs_data_does_not_apply_without_a_dataset(raw):
    r = _report([raw], samples=None)
    [step] = r["steps"]
    assert step["needs_data"] and not step["applies"] and NO_DATA in step["notes"] and not r["runnable"]
    assert r["dataset_samples"] is None
    assert _report([raw], samples=0)["steps"][0]["applies"]  # a dataset, even empty, is the job's to check


@pytest.mark.parametrize("raw", [{"method": "prune"}, {"method": "quantize", "mode": "dynamic"}])
def test_pruning_and_quantization_need_layers_to_act_on(raw):
    [step] = _report([raw], facts=NO_WEIGHTS)["steps"]
    assert not step["applies"] and step["targets"] == 0
    assert "no layers with weights held as initializers for this step to act on" in step["notes"]


def test_notes_name_later_steps_and_the_probe_once():
    r = _report([{"method": "quantize", "mode": "dynamic"}, {"method": "lowrank"}], probe_note="MACs estimated: x")
    first, second = r["steps"]
    assert first["notes"] == ["MACs estimated: x"]
    assert second["notes"] == ["checked against the uploaded model; earlier steps change the graph this step sees"]
    assert second["applies"] and second["targets"] == 3


def test_eval_options_shape_the_measurement_cost():
    spec = parse_spec({"steps": [{"method": "quantize", "mode": "dynamic"}],
                       "eval": {"holdout": 0.5, "max_eval_samples": 10, "latency_runs": 5}})
    r = analyse(spec, CNN, model_params=5000, dataset_samples=1000)
    assert r["cost"]["macs_total"] == 1000 * 2 * (10 + 5 + 5 + 160)
    no_data = analyse(spec, CNN, model_params=5000, dataset_samples=None)
    assert no_data["cost"]["macs_total"] == 1000 * 2 * (64 + 5 + 5 + 160)  # 64 generated samples


def test_preflight_states_the_quality_gate_budget():
    from compression.preflight import ModelFacts, analyse
    from compression.spec import parse_spec

    facts = ModelFacts(op_types={"Gemm": 2}, unsupported_ops=[], prunable=2, quantizable=2, macs=1000)
    spec = parse_spec({"steps": [{"method": "prune"}], "eval": {"max_drop": 2}})
    gate = analyse(spec, facts, model_params=1000, dataset_samples=100, labels=True)["quality_gate"]
    assert gate["enabled"] and gate["max_drop_pt"] == 2 and gate["min_cosine"] == 0.9
    assert "accuracy may fall at most 2 pt" in gate["summary"] and "quality_gate" in gate["summary"]
    assert gate["max_perplexity_ratio"] == 1.1 and "language models: perplexity at most ×1.10" in gate["summary"]
    unlabelled = analyse(spec, facts, model_params=1000, dataset_samples=None, labels=False)["quality_gate"]
    assert "top-1 agreement with the original at least 98%" in unlabelled["summary"]
    off = parse_spec({"steps": [{"method": "prune"}], "eval": {"gate": False}})
    assert "off" in analyse(off, facts, model_params=1000, dataset_samples=None)["quality_gate"]["summary"]
