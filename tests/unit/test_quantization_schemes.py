"""The ``quantize`` schemes on small models: exported graph structure, values per layer, accuracy, bytes."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper

from compression.analysis import count_params
from compression.context import StepContext
from compression.data import Arrays, DataSplit
from compression.techniques.quantization.layers import channel_view, weight_layers
from compression.techniques.quantization.packing import computed_weights, packed_param_counts
from testkit.refdata import fit
from compression.registry import get_technique
from compression.spec import parse_spec
from testkit.zoo import LeNet300100, export_onnx


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lenet(mnist_data, tmp_path_factory):
    """LeNet-300-100 trained on 2,000 images; 1,000 more to train/calibrate on, 1,000 held out.

    Exported by the TorchScript exporter (Gemm with transB=1, opset 17); the API tests use the dynamo one.
    """
    X, y = mnist_data
    Xf = X.reshape(len(X), -1)
    torch.manual_seed(0)
    net = fit(LeNet300100(), Xf[:2000], y[:2000], epochs=3)
    path = export_onnx(net, torch.zeros(2, 784), tmp_path_factory.mktemp("qlenet") / "lenet.onnx", dynamo=False)
    data = DataSplit(Arrays({"input": Xf[2000:3000]}, y[2000:3000]), Arrays({"input": Xf[3000:4000]}, y[3000:4000]))
    return onnx.load(str(path)), data


def _apply(raw: dict, model, data, tmp_path):
    step = parse_spec({"steps": [{"method": "quantize", **raw}]}).steps[0]
    ctx = StepContext(workdir=tmp_path, data=data, original=model, seed=0, threads=1)
    return get_technique("quantize").apply(model, step, ctx)


def _acc(model, data) -> float:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return float((sess.run(None, data.holdout.inputs)[0].argmax(1) == data.holdout.labels).mean())


def _nbytes(model) -> int:
    return len(model.SerializeToString())


def _layer_weights(original, quantized) -> dict[str, np.ndarray]:
    """The weights each layer of ``quantized`` computes with (decoded in ONNX Runtime), by weight name."""
    return computed_weights(quantized, [wl.weight for wl in weight_layers(original)])


def test_fp16_halves_the_file_and_runs(lenet, tmp_path):
    model, data = lenet
    res = _apply({"scheme": "fp16"}, model, data, tmp_path)
    q = res.model
    inits = [t for t in q.graph.initializer if t.name in {wl.weight for wl in weight_layers(model)}]
    assert inits and all(t.data_type == TensorProto.FLOAT16 for t in inits)
    assert q.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # keep_io_types
    assert {n.op_type for n in q.graph.node} >= {"Cast", "Gemm"}
    assert 1.9 < _nbytes(model) / _nbytes(q) < 2.1
    assert abs(_acc(q, data) - _acc(model, data)) <= 0.002
    assert set(res.report["runtime_float32_fallback"]) <= {"Gemm", "Relu"}  # what ORT's CPU EP upcasts, reported
    raw = _apply({"scheme": "fp16", "keep_io_types": False}, model, data, tmp_path).model
    assert raw.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16


@pytest.mark.parametrize("bits", [2, 4])
def test_cluster_exports_codebook_and_packed_indices(lenet, tmp_path, bits):
    model, data = lenet
    res = _apply({"scheme": "cluster", "bits": bits}, model, data, tmp_path)
    q = res.model
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("Gather") == 3 and "BitShift" in ops
    for name, w in _layer_weights(model, q).items():
        assert len(np.unique(w)) <= 2 ** bits, name
    layers = res.report["layers"]
    assert all(r["index_bits"] <= bits and r["stored_bits"] == bits for r in layers)
    assert 32 / bits * 0.85 < _nbytes(model) / _nbytes(q) <= 32 / bits  # biases stay float
    assert _acc(q, data) >= _acc(model, data) - (0.01 if bits == 4 else 0.05)
    params, nonzero = count_params(q)
    dp, dn = packed_param_counts(q)
    assert params + dp == count_params(model)[0]


def test_cluster_finetune_trains_centroids_and_keeps_pruned_zeros(lenet, tmp_path):
    model, data = lenet
    pruned = get_technique("prune").apply(
        model, parse_spec({"steps": [{"method": "prune", "sparsity": 0.8}]}).steps[0],
        StepContext(workdir=tmp_path, data=data, original=model, seed=0)).model
    before = {wl.weight: numpy_helper.to_array(t) for wl in weight_layers(pruned)
              for t in pruned.graph.initializer if t.name == wl.weight}
    plain = _apply({"scheme": "cluster", "bits": 2}, pruned, data, tmp_path)
    tuned = _apply({"scheme": "cluster", "bits": 2, "finetune": {"epochs": 2, "lr": 1e-3}}, pruned, data, tmp_path)
    for res in (plain, tuned):
        for name, w in _layer_weights(pruned, res.model).items():
            assert len(np.unique(w)) <= 4
            np.testing.assert_array_equal(w == 0, before[name] == 0)  # zeros kept, no new ones
        assert all(r["zero_centroid"] for r in res.report["layers"])
    assert _acc(tuned.model, data) > _acc(plain.model, data)
    assert tuned.report["finetune_losses"][-1] < tuned.report["finetune_losses"][0]


def test_binary_layers_take_two_values_per_channel(lenet, tmp_path):
    model, data = lenet
    res = _apply({"scheme": "binary", "finetune": {"epochs": 3}}, model, data, tmp_path)
    q = res.model
    for wl in weight_layers(model):
        w = computed_weights(q, [wl.weight])[wl.weight]
        rows = channel_view(w, wl.axis)
        alpha = np.abs(rows).max(1, keepdims=True)
        assert np.all(np.abs(rows) == alpha) and (alpha > 0).all()  # every weight is ±α of its channel
        assert max(len(np.unique(r)) for r in rows) == 2
    packed = [t for t in q.graph.initializer if t.data_type == TensorProto.UINT8 and ".codes" in t.name]
    assert sum(len(t.raw_data) for t in packed) * 8 == pytest.approx(sum(wl.size for wl in weight_layers(model)), abs=16)
    assert _nbytes(model) / _nbytes(q) > 20
    assert _acc(q, data) >= _acc(model, data) - 0.03
    assert res.report["bits_per_weight"] < 1.1


def test_ternary_keeps_pruned_zeros_and_three_values(lenet, tmp_path):
    model, data = lenet
    pruned = get_technique("prune").apply(
        model, parse_spec({"steps": [{"method": "prune", "sparsity": 0.5}]}).steps[0],
        StepContext(workdir=tmp_path, data=data, original=model, seed=0)).model
    res = _apply({"scheme": "ternary", "finetune": {"epochs": 2}}, pruned, data, tmp_path)
    q = res.model
    for wl in weight_layers(pruned):
        before = next(numpy_helper.to_array(t) for t in pruned.graph.initializer if t.name == wl.weight)
        w = computed_weights(q, [wl.weight])[wl.weight]
        assert np.all(w[before == 0] == 0)
        for row in channel_view(w, wl.axis):
            assert len(np.unique(row)) <= 3 and len(np.unique(np.abs(row[row != 0]))) <= 1
    assert _nbytes(model) / _nbytes(q) > 12
    assert _acc(q, data) >= _acc(model, data) - 0.03
    _, nonzero = count_params(q)
    assert nonzero + packed_param_counts(q)[1] <= count_params(pruned)[1]


def test_binary_without_data_is_refused(lenet, tmp_path):
    from compression.errors import InvalidSpec

    model, _ = lenet
    with pytest.raises(InvalidSpec, match="dataset"):
        _apply({"scheme": "binary"}, model, None, tmp_path)


def test_qat_exports_qdq_on_the_trained_grid_and_keeps_pruned_zeros(lenet, tmp_path):
    model, data = lenet
    model = get_technique("prune").apply(  # half the weights pruned: QAT must not regrow them
        model, parse_spec({"steps": [{"method": "prune", "sparsity": 0.5}]}).steps[0],
        StepContext(workdir=tmp_path, data=data, original=model, seed=0)).model
    static = _apply({"mode": "static"}, model, data, tmp_path)
    res = _apply({"mode": "qat", "finetune": {"epochs": 2, "lr": 1e-4}}, model, data, tmp_path)
    q = res.model
    assert count_params(q)[1] <= count_params(model)[1]  # int8 zero == zero point: pruned zeros survived
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in q.graph.node}
    qat = res.report["qat"]
    assert qat["layers"] == 3 and qat["activation_ranges_from_training"] == 3
    assert qat["weights_on_grid_max_error"] < 1e-6  # ORT re-quantized exactly the trained int8 weights
    dq_data = {n.input[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    int8 = [t for t in q.graph.initializer if t.data_type == TensorProto.INT8 and t.name in dq_data]
    assert sum(int(np.prod(t.dims)) for t in int8) == sum(wl.size for wl in weight_layers(model))
    assert _nbytes(model) / _nbytes(q) > 3.5
    assert _acc(q, data) >= _acc(static.model, data) - 0.005


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
    res = _apply({"mode": mode, **({"calibration_samples": 64} if mode == "static" else {})}, model, data, tmp_path)
    q = res.model
    assert res.report["embeddings_quantized"] == 1
    producer = {o: n for n in q.graph.node for o in n.output}
    gather = next(n for n in q.graph.node if n.op_type == "Gather")
    # dynamic: Gather reads the int8 table and its output feeds MatMulInteger; static: DequantizeLinear(table)
    src = producer[gather.input[0]].input[0] if gather.input[0] in producer else gather.input[0]
    assert (mode == "static") == (gather.input[0] in producer)
    table = next(t for t in q.graph.initializer if t.name == src)
    assert table.data_type in (TensorProto.INT8, TensorProto.UINT8) and list(table.dims) == [2000, 64]
    assert _nbytes(model) / _nbytes(q) > 3.5
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, data.holdout.inputs)[0]
    out = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, data.holdout.inputs)[0]
    a, b = out.reshape(-1, 64), ref.reshape(-1, 64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.mean() > 0.99


def test_measure_counts_packed_weights_and_entropy_coded_bytes(lenet, tmp_path):
    from compression.metrics import EvalData, measure, ratios
    from compression.xz_artifact import compress

    model, data = lenet
    q = _apply({"scheme": "cluster", "bits": 2}, model, data, tmp_path).model
    ev = EvalData(data.holdout.inputs, data.holdout.labels)
    paths = []
    for name, m in (("o.onnx", model), ("q.onnx", q)):
        onnx.save_model(m, str(tmp_path / name))
        paths.append(tmp_path / name)
    mo, mq = (measure(m, [p], ev, latency_runs=5) for m, p in zip((model, q), paths))
    assert mq["params"] == mo["params"] == count_params(model)[0]
    assert mq["compressed_bytes"] == len(compress(paths[1].read_bytes())) < mq["zip_bytes"] < mq["file_bytes"]
    r = ratios(mq, mo)
    assert r["file_to_compressed"] == pytest.approx(mo["file_bytes"] / mq["compressed_bytes"], rel=1e-3)
    assert r["file_to_compressed"] > 16
