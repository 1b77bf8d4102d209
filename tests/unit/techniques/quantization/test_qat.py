"""``scheme: int8, mode: qat``: fake-quant training exported as QDQ on exactly the trained int8 grid."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from compression.analysis import count_params
from compression.techniques.quantization.layers import weight_layers
from testkit.helpers import accuracy, apply_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_qat_exports_qdq_on_the_trained_grid_and_keeps_pruned_zeros(lenet, tmp_path):
    model, data = lenet
    model = apply_step({"method": "prune", "sparsity": 0.5}, model, data, tmp_path).model  # QAT must not regrow them
    static = apply_step({"method": "quantize", "mode": "static"}, model, data, tmp_path)
    res = apply_step({"method": "quantize", "mode": "qat", "finetune": {"epochs": 2, "lr": 1e-4}},
                     model, data, tmp_path)
    q = res.model
    assert count_params(q)[1] <= count_params(model)[1]  # int8 zero == zero point: pruned zeros survived
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in q.graph.node}
    qat = res.report["qat"]
    assert qat["layers"] == 3 and qat["activation_ranges_from_training"] == 3
    assert qat["weights_on_grid_max_error"] < 1e-6  # ORT re-quantized exactly the trained int8 weights
    dq_data = {n.input[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    int8 = [t for t in q.graph.initializer if t.data_type == TensorProto.INT8 and t.name in dq_data]
    assert sum(int(np.prod(t.dims)) for t in int8) == sum(wl.size for wl in weight_layers(model))
    assert len(model.SerializeToString()) / len(q.SerializeToString()) > 3.5
    assert accuracy(q, data) >= accuracy(static.model, data) - 0.005
