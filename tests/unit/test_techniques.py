"""The contract every registered technique keeps; each family's own tests live in ``tests/unit/techniques/``."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from compression.registry import list_techniques
from compression.spec import parse_spec
from testkit.helpers import apply_step, run_ort

CONTRACT_SPECS = {
    "prune": {"method": "prune", "sparsity": 0.5, "finetune": {"epochs": 1}},
    "quantize": {"method": "quantize", "mode": "static", "calibration_samples": 64},
    "distill": {"method": "distill", "epochs": 1},
    "lowrank": {"method": "lowrank", "energy": 0.9},
    "depthwise_separable": {"method": "depthwise_separable", "finetune": {"epochs": 1}},
    "early_exit": {"method": "early_exit", "epochs": 1, "latency_samples": 20, "latency_rounds": 1},
    "slimmable": {"method": "slimmable", "widths": [0.5, 1.0], "epochs": 1},
}


def test_every_technique_has_a_contract_spec():
    assert set(CONTRACT_SPECS) == set(list_techniques())


@pytest.mark.parametrize("name", list_techniques())
def test_contract(name, lenet, tmp_path):
    model, data = lenet
    res = apply_step(CONTRACT_SPECS[name], model, data, tmp_path)
    onnx.checker.check_model(res.model)
    out = run_ort(res.model, data.holdout.inputs)
    ref = run_ort(model, data.holdout.inputs)
    assert out.shape == ref.shape and np.isfinite(out).all()
    assert float((out.argmax(1) == ref.argmax(1)).mean()) > 0.8
    assert isinstance(res.report, dict) and res.report


@pytest.mark.parametrize("step", [*CONTRACT_SPECS.values(),
                                  {"method": "slimmable", "widths": [0.5, 1.0], "rule": "sum", "epochs": 1}])
def test_a_stored_spec_parses_again_to_itself(step):
    """The job row stores ``to_json()`` of the parsed spec and the worker parses that again."""
    stored = parse_spec({"steps": [step]}).to_json()
    assert parse_spec(stored).to_json() == stored
