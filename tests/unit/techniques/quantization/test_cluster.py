"""``scheme: cluster``: k-means weight sharing exported as packed indices + codebook; centroid fine-tuning."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compression.analysis import count_params, packed_param_counts
from compression.errors import InvalidSpec
from compression.spec import parse_spec
from compression.techniques.quantization.layers import weight_layers
from compression.techniques.quantization.packing import computed_weights
from testkit.helpers import accuracy, apply_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _layer_weights(original: onnx.ModelProto, quantized: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The weights each layer of ``quantized`` computes with (decoded in ONNX Runtime), by weight name."""
    return computed_weights(quantized, [wl.weight for wl in weight_layers(original)])


@pytest.mark.parametrize("bits", [2, 4])
def test_cluster_exports_codebook_and_packed_indices(lenet, tmp_path, bits):
    model, data = lenet
    res = apply_step({"method": "quantize", "scheme": "cluster", "bits": bits}, model, data, tmp_path)
    q = res.model
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("Gather") == 3 and "BitShift" in ops
    for name, w in _layer_weights(model, q).items():
        assert len(np.unique(w)) <= 2 ** bits, name
    layers = res.report["layers"]
    assert all(r["index_bits"] <= bits and r["stored_bits"] == bits for r in layers)
    ratio = len(model.SerializeToString()) / len(q.SerializeToString())
    assert 32 / bits * 0.85 < ratio <= 32 / bits  # biases stay float
    assert accuracy(q, data) >= accuracy(model, data) - (0.01 if bits == 4 else 0.05)
    params, nonzero = count_params(q)
    dp, dn = packed_param_counts(q)
    assert params + dp == count_params(model)[0]


def test_cluster_finetune_trains_centroids_and_keeps_pruned_zeros(lenet, tmp_path):
    model, data = lenet
    pruned = apply_step({"method": "prune", "sparsity": 0.8}, model, data, tmp_path).model
    before = {wl.weight: numpy_helper.to_array(t) for wl in weight_layers(pruned)
              for t in pruned.graph.initializer if t.name == wl.weight}
    plain = apply_step({"method": "quantize", "scheme": "cluster", "bits": 2}, pruned, data, tmp_path)
    tuned = apply_step({"method": "quantize", "scheme": "cluster", "bits": 2, "finetune": {"epochs": 2, "lr": 1e-3}},
                       pruned, data, tmp_path)
    for res in (plain, tuned):
        for name, w in _layer_weights(pruned, res.model).items():
            assert len(np.unique(w)) <= 4
            np.testing.assert_array_equal(w == 0, before[name] == 0)  # zeros kept, no new ones
        assert all(r["zero_centroid"] for r in res.report["layers"])
    assert accuracy(tuned.model, data) > accuracy(plain.model, data)
    assert tuned.report["finetune_losses"][-1] < tuned.report["finetune_losses"][0]


def test_layer_bits_gives_one_layer_fewer_centroids_and_refuses_unknown_names(lenet, tmp_path):
    model, data = lenet
    first = weight_layers(model)[0].weight
    res = apply_step({"method": "quantize", "scheme": "cluster", "bits": 4, "layer_bits": {first: 2}},
                     model, data, tmp_path)
    centroids = [r["centroids"] for r in res.report["layers"]]
    assert centroids[0] <= 4 < min(centroids[1:]) and max(centroids) <= 16
    with pytest.raises(InvalidSpec, match="unknown layers"):
        apply_step({"method": "quantize", "scheme": "cluster", "layer_bits": {"nope": 2}}, model, data, tmp_path)
    with pytest.raises(InvalidSpec) as refused:
        parse_spec({"steps": [{"method": "quantize", "scheme": "int8", "layer_bits": {first: 2}}]})
    assert any("layer_bits" in e["loc"] for e in refused.value.errors)
    with pytest.raises(InvalidSpec, match="invalid spec"):
        parse_spec({"steps": [{"method": "quantize", "scheme": "cluster", "layer_bits": {first: 9}}]})
