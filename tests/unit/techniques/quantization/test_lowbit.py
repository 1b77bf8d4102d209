"""``scheme: binary | ternary``: ±α (and 0) per channel after STE training, packed 1-/2-bit codes."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, numpy_helper

from compression.analysis import count_params, packed_param_counts
from compression.errors import InvalidSpec
from compression.techniques.quantization.layers import channel_view, weight_layers
from compression.techniques.quantization.packing import computed_weights
from testkit.helpers import accuracy, apply_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_binary_layers_take_two_values_per_channel(lenet, tmp_path):
    model, data = lenet
    res = apply_step({"method": "quantize", "scheme": "binary", "finetune": {"epochs": 3}}, model, data, tmp_path)
    q = res.model
    for wl in weight_layers(model):
        w = computed_weights(q, [wl.weight])[wl.weight]
        rows = channel_view(w, wl.axis)
        alpha = np.abs(rows).max(1, keepdims=True)
        assert np.all(np.abs(rows) == alpha) and (alpha > 0).all()  # every weight is ±α of its channel
        assert max(len(np.unique(r)) for r in rows) == 2
    packed = [t for t in q.graph.initializer if t.data_type == TensorProto.UINT8 and ".codes" in t.name]
    assert sum(len(t.raw_data) for t in packed) * 8 == pytest.approx(sum(wl.size for wl in weight_layers(model)), abs=16)
    assert len(model.SerializeToString()) / len(q.SerializeToString()) > 20
    assert accuracy(q, data) >= accuracy(model, data) - 0.03
    assert res.report["bits_per_weight"] < 1.1


def test_ternary_keeps_pruned_zeros_and_three_values(lenet, tmp_path):
    model, data = lenet
    pruned = apply_step({"method": "prune", "sparsity": 0.5}, model, data, tmp_path).model
    res = apply_step({"method": "quantize", "scheme": "ternary", "finetune": {"epochs": 2}}, pruned, data, tmp_path)
    q = res.model
    for wl in weight_layers(pruned):
        before = next(numpy_helper.to_array(t) for t in pruned.graph.initializer if t.name == wl.weight)
        w = computed_weights(q, [wl.weight])[wl.weight]
        assert np.all(w[before == 0] == 0)
        for row in channel_view(w, wl.axis):
            assert len(np.unique(row)) <= 3 and len(np.unique(np.abs(row[row != 0]))) <= 1
    assert len(model.SerializeToString()) / len(q.SerializeToString()) > 12
    assert accuracy(q, data) >= accuracy(model, data) - 0.03
    _, nonzero = count_params(q)
    assert nonzero + packed_param_counts(q)[1] <= count_params(pruned)[1]


def test_binary_without_data_is_refused(lenet, tmp_path):
    model, _ = lenet
    with pytest.raises(InvalidSpec, match="dataset"):
        apply_step({"method": "quantize", "scheme": "binary"}, model, None, tmp_path)
