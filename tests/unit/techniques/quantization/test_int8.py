"""``scheme: int8`` through ONNX Runtime: static QDQ (calibrations), dynamic (Gemm rewritten), pruned zeros
kept, embedding tables quantized."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from compression.analysis import count_params
from compression.data import Arrays, DataSplit, split
from compression.techniques.quantization.layers import weight_layers
from testkit.helpers import accuracy, apply_step, run_ort
from testkit.zoo import export_onnx


def test_static_int8_cnn_size_and_accuracy(trained_cnn, cnn_onnx, mnist_data, tmp_path):
    X, y = mnist_data
    model = onnx.load(str(cnn_onnx["legacy"]))
    data = split(Arrays({"input": X[4000:5000]}, y[4000:5000]), holdout=0.5, seed=0, max_eval=1000)
    res = apply_step({"method": "quantize", "mode": "static", "per_channel": True}, model, data, tmp_path)
    q = res.model
    assert len(q.SerializeToString()) * 3.5 < len(model.SerializeToString())
    assert {n.op_type for n in q.graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv"}
    assert accuracy(q, data) >= accuracy(model, data) - 0.01
    assert res.report["per_channel"] and res.report["calibration"] == "minmax"


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_static_int8_other_calibrations(lenet_dynamo, tmp_path, method):
    model, data = lenet_dynamo
    res = apply_step({"method": "quantize", "mode": "static", "calibration": method, "calibration_samples": 64},
                     model, data, tmp_path)
    assert accuracy(res.model, data) >= accuracy(model, data) - 0.02


def test_dynamic_int8_rewrites_gemm_and_shrinks(lenet_dynamo, tmp_path):
    model, data = lenet_dynamo
    res = apply_step({"method": "quantize", "mode": "dynamic"}, model, data, tmp_path)
    ops = {n.op_type for n in res.model.graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeLinear" in ops
    assert len(res.model.SerializeToString()) * 3.5 < len(model.SerializeToString())
    assert accuracy(res.model, data) >= accuracy(model, data) - 0.01


def test_pruned_zeros_survive_static_quantization(lenet_dynamo, tmp_path):
    model, data = lenet_dynamo
    pruned = apply_step({"method": "prune", "sparsity": 0.6}, model, data, tmp_path).model
    q = apply_step({"method": "quantize", "mode": "static", "calibration_samples": 64}, pruned, data, tmp_path).model
    p_params, p_nz = count_params(pruned)
    q_params, q_nz = count_params(q)
    weights = sum(wl.size for wl in weight_layers(pruned))
    assert p_nz <= p_params - int(0.6 * weights) + 1
    assert q_nz <= p_nz  # symmetric int8: a zero stays exactly zero


@pytest.fixture(scope="module")
def tiny_transformer(tmp_path_factory):
    """An embedding table, one attention-like block and LayerNorm: enough to check Gather quantization."""

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(2000, 64)
            self.q, self.k = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
            self.norm = torch.nn.LayerNorm(64)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.emb(ids)
            att = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / 8.0, -1)
            return self.norm(h + att @ h)

    torch.manual_seed(0)
    path = export_onnx(Tiny().eval(), torch.zeros(2, 12, dtype=torch.long), tmp_path_factory.mktemp("tiny") / "t.onnx",
                       dynamo=False, input_names=("ids",), output_names=("hidden",))
    ids = np.random.default_rng(0).integers(0, 2000, (96, 12)).astype(np.int64)
    return onnx.load(str(path)), DataSplit(Arrays({"ids": ids[:64]}), Arrays({"ids": ids[64:]}))


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_quantizes_embedding_tables(tiny_transformer, tmp_path, mode):
    model, data = tiny_transformer
    res = apply_step({"method": "quantize", "mode": mode, **({"calibration_samples": 64} if mode == "static" else {})},
                     model, data, tmp_path)
    q = res.model
    assert res.report["embeddings_quantized"] == 1
    producer = {o: n for n in q.graph.node for o in n.output}
    gather = next(n for n in q.graph.node if n.op_type == "Gather")
    # dynamic: Gather reads the int8 table and its output feeds MatMulInteger; static: DequantizeLinear(table)
    src = producer[gather.input[0]].input[0] if gather.input[0] in producer else gather.input[0]
    assert (mode == "static") == (gather.input[0] in producer)
    table = next(t for t in q.graph.initializer if t.name == src)
    assert table.data_type in (TensorProto.INT8, TensorProto.UINT8) and list(table.dims) == [2000, 64]
    assert len(model.SerializeToString()) / len(q.SerializeToString()) > 3.5
    ref = run_ort(model, data.holdout.inputs)
    out = run_ort(q, data.holdout.inputs)
    a, b = out.reshape(-1, 64), ref.reshape(-1, 64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.mean() > 0.99
