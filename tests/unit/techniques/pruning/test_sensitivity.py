"""Per-layer sensitivity allocation: the target sparsity is met, the fragile layer is spared, and the
search's ``allocation`` pseudo-field applies to weight-pruning steps only."""
from __future__ import annotations

import pytest

from compression.errors import InvalidSpec
from compression.search_space import auto_space, expand
from compression.spec import parse_spec
from compression.techniques.pruning.sensitivity import allocate, allocation_applies, allocation_searchable


def test_allocation_meets_the_target_and_spares_the_sensitive_layer():
    levels = [0.0, 0.5, 0.9]
    sens = {"robust": {"params": 900, "levels": levels, "relative_error": [0.0, 0.01, 0.05]},
            "fragile": {"params": 100, "levels": levels, "relative_error": [0.0, 0.3, 0.9]}}
    alloc = allocate(sens, 0.8)
    removed = sum(alloc[k] * sens[k]["params"] for k in sens)
    assert removed >= 0.8 * 1000 - 1e-6
    assert alloc["robust"] == 0.9 and alloc["fragile"] < alloc["robust"]


@pytest.mark.parametrize("steps, search, msg", [
    ([{"method": "quantize"}], {"quantize.allocation": ["uniform"]}, "allocation applies to prune steps"),
    ([{"method": "prune"}], {"prune.allocation": ["even"]}, "allocation values: uniform, sensitivity"),
])
def test_allocation_pseudo_field_is_refused_where_it_cannot_apply(steps, search, msg):
    with pytest.raises(InvalidSpec) as e:
        parse_spec({"steps": steps, "search": search})
    assert e.value.errors[0] == {"loc": ["search", next(iter(search))], "msg": msg}


def test_allocation_is_searched_for_weight_pruning_only():
    weight, channel = {"method": "prune"}, {"method": "prune", "granularity": "channel"}
    named = {"method": "prune", "scope": "layer", "layers": {"fc1": 0.5}}
    assert allocation_applies(weight) and not allocation_applies(channel)
    assert allocation_searchable(weight) and not allocation_searchable(named)
    assert not allocation_searchable({**weight, "rewind": "random"})
    assert "steps[0].allocation" in auto_space([weight]) and "steps[0].allocation" not in auto_space([named])
    cands = expand([weight, channel], {"prune.allocation": ["uniform", "sensitivity"]})
    assert sorted(c.sensitivity_steps for c in cands) == [[], [0]]  # the channel step is never allocated
