"""``QuantizeSpec``: options of another scheme refused at their JSON path, defaults filled in per scheme."""
from __future__ import annotations

import pytest

from compression.errors import InvalidSpec
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
    ({"scheme": "int4"}, "scheme"),
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
    ]:
        step = _step(raw)
        dumped = step.model_dump(mode="json")
        for k, v in want.items():
            got = dumped[k]
            assert (got == v) if not isinstance(v, dict) else {kk: got[kk] for kk in v} == v, (raw, k, got)
        assert step.needs_data is needs, raw
        again = parse_spec({"steps": [dumped]}).steps[0]  # the worker re-parses the stored spec
        assert again.model_dump(mode="json") == dumped
