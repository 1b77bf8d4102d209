"""What each step spec says about itself (compression.step_spec): trains, needs_data, needs_torch, auto grid."""
from __future__ import annotations

import pytest
from pydantic import Field

from compression.registry import get_technique, list_techniques, register_technique
from compression.search_space import auto_space
from compression.spec import parse_spec
from compression.step_spec import ModelFacts, StepSpec, StrictModel

# step as written -> (trains, needs_data, needs_torch); every technique, defaults and variants. ``trains`` was
# checked equal to store.queue.step_trains on each stored step before that function went.
TABLE = [
    ({"method": "prune"}, False, False, False),
    ({"method": "prune", "granularity": "channel"}, False, False, True),
    ({"method": "prune", "granularity": "channel", "sparsity": 0.3, "round_to": 8}, False, False, True),
    ({"method": "prune", "finetune": {"epochs": 0}}, False, True, False),
    ({"method": "prune", "finetune": {"epochs": 2}}, True, True, True),
    ({"method": "prune", "finetune": {"epochs": 2, "distill": True}, "iterations": 3}, True, True, True),
    ({"method": "prune", "granularity": "channel", "finetune": {"epochs": 1}}, True, True, True),
    ({"method": "prune", "importance": "taylor", "finetune": {"epochs": 0}}, True, True, True),
    ({"method": "prune", "importance": "taylor", "finetune": {"epochs": 1}, "granularity": "channel"}, True, True, True),
    ({"method": "prune", "importance": "bn_scale", "granularity": "channel"}, False, False, True),
    ({"method": "prune", "rewind": "random", "finetune": {"epochs": 1}}, True, True, True),
    ({"method": "prune", "rewind": "init", "rewind_model_id": "m1", "finetune": {"epochs": 1}, "iterations": 2}, True, True, True),
    ({"method": "prune", "layers": {"fc1.weight": 0.3}, "scope": "layer"}, False, False, False),
    ({"method": "quantize"}, False, True, False),
    ({"method": "quantize", "mode": "dynamic"}, False, False, False),
    ({"method": "quantize", "mode": "static", "calibration_samples": 64}, False, True, False),
    ({"method": "quantize", "mode": "qat"}, True, True, True),
    ({"method": "quantize", "mode": "qat", "finetune": {"epochs": 0}}, True, True, True),
    ({"method": "quantize", "mode": "qat", "finetune": {"epochs": 3, "distill": True}}, True, True, True),
    ({"method": "quantize", "scheme": "fp16"}, False, False, False),
    ({"method": "quantize", "scheme": "cluster"}, False, False, False),
    ({"method": "quantize", "scheme": "cluster", "bits": 4, "finetune": {"epochs": 1}}, True, True, True),
    ({"method": "quantize", "scheme": "cluster", "finetune": {"epochs": 0}}, False, False, False),
    ({"method": "quantize", "scheme": "binary"}, True, True, True),
    ({"method": "quantize", "scheme": "ternary", "finetune": {"epochs": 0}}, False, False, False),
    ({"method": "quantize", "scheme": "ternary", "threshold": 0.5}, True, True, True),
    ({"method": "lowrank"}, False, False, False),
    ({"method": "lowrank", "rank_ratio": 0.25}, False, False, False),
    ({"method": "lowrank", "finetune": {"epochs": 0}}, False, False, False),
    ({"method": "lowrank", "finetune": {"epochs": 2, "distill": True}}, True, True, True),
    ({"method": "depthwise_separable"}, True, True, True),
    ({"method": "depthwise_separable", "finetune": None}, False, False, False),
    ({"method": "depthwise_separable", "finetune": {"epochs": 0}}, False, False, False),
    ({"method": "depthwise_separable", "finetune": {"epochs": 1, "distill": False}}, True, True, True),
    ({"method": "distill"}, True, True, True),
    ({"method": "distill", "epochs": 1, "teachers": ["original", "m2"]}, True, True, True),
    ({"method": "early_exit"}, True, True, True),
    ({"method": "early_exit", "epochs": 1, "distill": False}, True, True, True),
    ({"method": "slimmable"}, True, True, True),
    ({"method": "slimmable", "epochs": 0}, False, True, False),
    ({"method": "slimmable", "epochs": 2, "distill": True, "rule": "sum"}, True, True, True),
]


def _step(raw):
    return parse_spec({"steps": [raw]}).steps[0]


def test_the_table_covers_every_technique():
    assert {raw["method"] for raw, *_ in TABLE} == set(list_techniques())


@pytest.mark.parametrize("raw, trains, needs_data, needs_torch", TABLE)
def test_each_spec_says_what_it_needs(raw, trains, needs_data, needs_torch):
    step = _step(raw)
    assert (step.trains, step.needs_data, step.needs_torch) == (trains, needs_data, needs_torch)


def test_parsed_spec_trains_when_any_step_trains():
    assert not parse_spec({"steps": [{"method": "prune"}, {"method": "quantize", "mode": "dynamic"}]}).trains
    assert parse_spec({"steps": [{"method": "prune"}, {"method": "quantize", "scheme": "binary"}]}).trains


def test_every_registered_spec_is_a_step_spec_and_others_are_refused():
    assert all(issubclass(get_technique(n).spec_model, StepSpec) for n in list_techniques())

    class Plain(StrictModel):
        method: str = Field("plain")

    with pytest.raises(TypeError, match="StepSpec"):
        register_technique("plain", Plain, phase="x")


@pytest.mark.parametrize("raw, grid", [
    ({"method": "prune"}, {"sparsity": [0.5, 0.7, 0.8, 0.9, 0.95], "allocation": ["uniform", "sensitivity"]}),
    ({"method": "prune", "scope": "layer", "layers": {"fc1": 0.5}}, {"sparsity": [0.5, 0.7, 0.8, 0.9, 0.95]}),
    ({"method": "prune", "rewind": "random", "finetune": {"epochs": 1}}, {"sparsity": [0.5, 0.7, 0.8, 0.9, 0.95]}),
    ({"method": "prune", "granularity": "channel"}, {"sparsity": [0.25, 0.4, 0.5, 0.6]}),
    ({"method": "quantize"}, {"scheme": ["int8", "cluster"], "bits": [4, 5, 6]}),
    ({"method": "quantize", "scheme": "cluster", "bits": 3}, {"scheme": ["int8", "cluster"], "bits": [4, 5, 6]}),
    ({"method": "quantize", "scheme": "fp16"}, {}),
    ({"method": "quantize", "scheme": "binary"}, {}),
    ({"method": "quantize", "scheme": "ternary"}, {}),
    ({"method": "lowrank"}, {"energy": [0.8, 0.9, 0.95]}),
    ({"method": "depthwise_separable"}, {}),
    ({"method": "distill"}, {}),
    ({"method": "early_exit"}, {}),
    ({"method": "slimmable"}, {}),
])
def test_auto_grid_of_each_family(raw, grid):
    assert get_technique(raw["method"]).spec_model.auto_grid(raw) == grid
    assert auto_space([raw]) == {f"steps[0].{k}": v for k, v in grid.items()}


def test_auto_grid_values_are_copies():
    spec_model = get_technique("prune").spec_model
    spec_model.auto_grid({"method": "prune"})["sparsity"].append(0.99)
    assert 0.99 not in spec_model.auto_grid({"method": "prune"})["sparsity"]


FACTS = ModelFacts(op_types={"Conv": 2, "Gather": 1}, unsupported_ops=[], prunable=2, quantizable=3)
NONE = ModelFacts(op_types={"Add": 1}, unsupported_ops=[], prunable=0, quantizable=0)


def test_preflight_hook_targets_and_notes():
    weight, channel, quant = _step({"method": "prune"}), _step({"method": "prune", "granularity": "channel"}), \
        _step({"method": "quantize"})
    assert weight.preflight(FACTS).targets == 2 and weight.preflight(FACTS).applies
    assert "weight pruning" in weight.preflight(FACTS).notes[0]
    assert channel.preflight(FACTS).notes == []
    assert quant.preflight(FACTS).targets == 3 and quant.preflight(FACTS).notes == []
    for step in (weight, channel, quant):
        check = step.preflight(NONE)
        assert not check.applies and check.targets == 0
        assert check.notes[0] == "no layers with weights held as initializers for this step to act on"
    for raw in ({"method": "lowrank"}, {"method": "distill"}, {"method": "slimmable"}):
        check = _step(raw).preflight(NONE)  # nothing to act on is not theirs to refuse
        assert check.applies and check.targets == 0 and check.notes == []


@pytest.mark.parametrize("raw, train, infer", [
    ({"method": "prune"}, 0, 0),
    ({"method": "prune", "finetune": {"epochs": 2, "distill": True}, "iterations": 3}, 3 * 2 * 100 * 3, 2 * 100 * 3),
    ({"method": "prune", "importance": "taylor", "finetune": {"epochs": 0}}, 200, 0),
    ({"method": "quantize"}, 0, 256),
    ({"method": "quantize", "mode": "qat"}, 3 * 2 * 100, 256),
    ({"method": "quantize", "scheme": "binary"}, 3 * 6 * 100, 0),
    ({"method": "lowrank", "finetune": {"epochs": 1}}, 300, 0),
    ({"method": "depthwise_separable"}, 3 * 3 * 100, 3 * 100),
    ({"method": "distill", "epochs": 2, "teachers": ["original", "m2"]}, 600, 400),
])
def test_forward_passes(raw, train, infer):
    passes = _step(raw).forward_passes(100)
    assert (passes.train, passes.infer) == (train, infer)


@pytest.mark.parametrize("route", [False, True])
def test_the_queue_is_settings_job_queue_of_parsed_trains(route):
    from store.settings import Settings

    settings = Settings(route_by_device=route, queue="jobs")
    for raw, trains, *_ in TABLE:
        expected = ("gpu" if trains else "cpu") if route else "jobs"
        assert settings.job_queue(parse_spec({"steps": [raw]}).trains) == expected
