"""``QuantizeSpec``: options of another scheme refused at their JSON path, defaults filled in per scheme."""
from __future__ import annotations

import pytest

from compression.errors import InvalidSpec
from compression.search_space import expand
from compression.spec import parse_spec


def _step(raw: dict):
    return parse_spec({"steps": [{"method": "quantize", **raw}]}).steps[0]


@pytest.mark.parametrize("raw, field", [
    ({"scheme": "int8", "bits": 4}, "bits"),
    ({"scheme": "cluster", "mode": "static"}, "mode"),
    ({"scheme": "fp16", "per_channel": True}, "per_channel"),
    ({"scheme": "binary", "threshold": 0.5}, "threshold"),
    ({"scheme": "int8", "keep_io_types": False}, "keep_io_types"),
    ({"mode": "dynamic", "calibration": "entropy"}, "calibration"),
    ({"mode": "static", "finetune": {"epochs": 1}}, "finetune"),
    ({"scheme": "cluster", "bits": 9}, "bits"),
    ({"scheme": "int3"}, "scheme"),
    ({"scheme": "int4", "calibration": "minmax"}, "calibration"),
    ({"scheme": "int4", "bits": 4}, "bits"),
    ({"scheme": "int8", "block_size": 32}, "block_size"),
    ({"scheme": "int8", "mode": "dynamic", "algorithm": "rtn"}, "algorithm"),
    ({"scheme": "int8", "mode": "weight_only", "per_channel": True}, "per_channel"),
    ({"scheme": "int8", "mode": "weight_only", "keep_8bit": ["x"]}, "keep_8bit"),
    ({"scheme": "cluster", "format": "qdq"}, "format"),
    ({"scheme": "int4", "block_size": 48}, "block_size"),
    ({"scheme": "int4", "block_size": 512}, "block_size"),
    ({"scheme": "int4", "accuracy_level": 5}, "accuracy_level"),
])
def test_options_that_do_not_apply_are_refused_at_their_path(raw, field):
    with pytest.raises(InvalidSpec) as e:
        _step(raw)
    assert e.value.errors[0]["loc"] == ["steps", 0, field]


def test_defaults_are_filled_per_scheme_and_survive_a_round_trip():
    for raw, want, needs in [
        ({}, {"mode": "static", "calibration": "minmax", "per_channel": True}, True),
        ({"mode": "dynamic"}, {"mode": "dynamic", "calibration": None}, False),
        ({"mode": "qat"}, {"finetune": {"epochs": 2, "lr": 1e-4}}, True),
        ({"scheme": "fp16"}, {"keep_io_types": True}, False),
        ({"scheme": "cluster"}, {"bits": 5, "finetune": None}, False),
        ({"scheme": "cluster", "finetune": {"epochs": 1}}, {"bits": 5}, True),
        ({"scheme": "ternary"}, {"threshold": 0.7, "finetune": {"epochs": 6}}, True),
        ({"scheme": "binary", "finetune": {"epochs": 0}}, {}, False),
        ({"scheme": "int4"}, {"algorithm": "rtn", "block_size": 32, "symmetric": True, "accuracy_level": None,
                              "embeddings": True, "keep_8bit": "lm_head", "format": "matmulnbits"}, False),
        ({"scheme": "int4", "algorithm": "hqq", "symmetric": True}, {"symmetric": False}, False),
        ({"scheme": "int4", "algorithm": "gptq", "keep_8bit": []}, {"keep_8bit": []}, True),
        ({"scheme": "int8", "mode": "weight_only"}, {"algorithm": "rtn", "calibration": None, "per_channel": None,
                                                     "keep_8bit": None}, False),
    ]:
        step = _step(raw)
        dumped = step.model_dump(mode="json")
        for k, v in want.items():
            got = dumped[k]
            assert (got == v) if not isinstance(v, dict) else {kk: got[kk] for kk in v} == v, (raw, k, got)
        assert step.needs_data is needs, raw
        again = parse_spec({"steps": [dumped]}).steps[0]  # the worker re-parses the stored spec
        assert again.model_dump(mode="json") == dumped


@pytest.mark.parametrize("raw", [
    {"scheme": "int4", "algorithm": "hqq", "format": "qdq"},
    {"scheme": "int4", "algorithm": "gptq", "format": "qdq"},
    {"scheme": "int8", "mode": "weight_only", "algorithm": "gptq"},
])
def test_weight_only_combinations_ort_cannot_write_are_refused_at_submit(raw):
    with pytest.raises(InvalidSpec):
        _step(raw)


def test_weight_only_settings_name_what_ran_and_auto_grid_searches_it():
    step = _step({"scheme": "int4"})
    settings = step.settings()
    assert settings["algorithm"] == "rtn" and settings["keep_8bit"] == "lm_head" and "calibration" not in settings
    assert "per_channel" not in _step({"scheme": "int8", "mode": "weight_only"}).settings()
    assert "block_size" not in _step({"scheme": "int8", "mode": "dynamic"}).settings()
    grid = type(step).auto_grid({"method": "quantize", "scheme": "int4"})
    assert grid == {"block_size": [32, 128], "algorithm": ["rtn", "hqq"], "keep_8bit": ["lm_head", []]}
    raw = parse_spec({"steps": [{"method": "quantize", "scheme": "int4"}], "target": {}}).raw_steps()
    cands = [c.steps[0] for c in expand(raw, "auto")]
    assert len(cands) == 8 and {(s["algorithm"], s["block_size"], str(s["keep_8bit"])) for s in cands} >= {
        ("hqq", 128, "[]"), ("rtn", 32, "lm_head")}
    explicit = expand(raw, {"quantize.block_size": [32, 128]})
    assert sorted(c.steps[0]["block_size"] for c in explicit) == [32, 128]
