"""The prune step's spec (PruneSpec): combinations that cannot run are refused when the spec is read."""
from __future__ import annotations

import pytest

from compression.errors import InvalidSpec
from compression.spec import parse_spec


@pytest.mark.parametrize("bad", [
    {"granularity": "channel", "rewind": "random", "finetune": {"epochs": 1}},
    {"rewind": "init", "finetune": {"epochs": 1}},
    {"rewind": "random"},
    {"importance": "bn_scale"},
    {"head_sparsity": 0.5},
])
def test_invalid_prune_specs_are_refused_at_validation(bad):
    with pytest.raises(InvalidSpec):
        parse_spec({"steps": [{"method": "prune", **bad}]})
