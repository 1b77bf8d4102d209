"""``scheme: fp16``: float16 weights, float32 inputs/outputs by default, accuracy kept, half the bytes."""
from __future__ import annotations

import pytest
from onnx import TensorProto

from compression.techniques.quantization.layers import weight_layers
from testkit.helpers import accuracy, apply_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fp16_halves_the_file_and_runs(lenet, tmp_path):
    model, data = lenet
    res = apply_step({"method": "quantize", "scheme": "fp16"}, model, data, tmp_path)
    q = res.model
    inits = [t for t in q.graph.initializer if t.name in {wl.weight for wl in weight_layers(model)}]
    assert inits and all(t.data_type == TensorProto.FLOAT16 for t in inits)
    assert q.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # keep_io_types
    assert {n.op_type for n in q.graph.node} >= {"Cast", "Gemm"}
    assert 1.9 < len(model.SerializeToString()) / len(q.SerializeToString()) < 2.1
    assert abs(accuracy(q, data) - accuracy(model, data)) <= 0.002
    assert set(res.report["runtime_float32_fallback"]) <= {"Gemm", "Relu"}  # what ORT's CPU EP upcasts, reported
    raw = apply_step({"method": "quantize", "scheme": "fp16", "keep_io_types": False}, model, data, tmp_path).model
    assert raw.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
