"""Models as other exporters write them (paddle2onnx: every weight a ``Constant`` node, opset 11/12; tf2onnx: ``int32``
inputs; batch-1 detectors): ``quantize`` never does worse than ONNX Runtime's ``quantize_static`` called directly
(per-channel QDQ, the same calibration data), every result loads and runs in ONNX Runtime, and what cannot be done
fails with a named reason."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from compression.data import Arrays, DataSplit
from compression.errors import CompressionError, UnsupportedOp
from compression.graph_prep import lift_constants, opset
from compression.metrics import EvalData, measure, run_batched, session, throughput
from compression.pipeline import eval_data
from compression.techniques.quantization.int8 import _quantizer_error, _reason
from testkit.helpers import apply_step
from testkit.zoo import export_onnx

CALIBRATION, HOLDOUT = 32, 32


class _Recogniser(nn.Module):
    """A CTC text recogniser in miniature: conv-BN-ReLU-pool twice, the width as a sequence, per-step softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.c2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d((8, 1)))
        self.fc = nn.Linear(16, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(self.c2(self.c1(x)).squeeze(2).permute(0, 2, 1)), -1)


class _Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.f(x).mean((2, 3)))


class _ByteClassifier(nn.Module):
    """A file-type classifier in miniature: ``int32`` bytes → Cast → Gather (embedding) → mean → Gemm."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(b.long()).mean(1))


def _to_constant_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every initializer moved into a ``Constant`` node, as paddle2onnx writes weights."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    consts = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in g.initializer]
    names = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in names]
    del g.input[:], g.initializer[:]
    g.input.extend(inputs)
    nodes = consts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return out


def _shared_weight_model() -> onnx.ModelProto:
    """One weight initializer read by two MatMuls (tf2onnx shares tied weights so)."""
    rng = np.random.default_rng(0)
    s = numpy_helper.from_array((rng.standard_normal((16, 16)) * 0.3).astype(np.float32), "S")
    w = numpy_helper.from_array(rng.standard_normal((16, 5)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "S"], ["h1"]), helper.make_node("Relu", ["h1"], ["h2"]),
             helper.make_node("MatMul", ["h2", "S"], ["h3"]), helper.make_node("MatMul", ["h3", "W"], ["y"])]
    g = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], [s, w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)


@pytest.fixture(scope="module")
def forms(tmp_path_factory) -> dict[str, tuple[onnx.ModelProto, DataSplit]]:
    """Each foreign form with its data: 32 samples to calibrate on, 32 held out."""
    tmp = tmp_path_factory.mktemp("foreign")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    def split(name: str, x: np.ndarray) -> DataSplit:
        return DataSplit(Arrays({name: x[:CALIBRATION]}), Arrays({name: x[CALIBRATION:]}))

    def export(module: nn.Module, example: torch.Tensor, name: str, opset_: int, **kw) -> onnx.ModelProto:
        return onnx.load(str(export_onnx(module, example, tmp / name, dynamo=False, opset=opset_, **kw)))

    lines = split("input", rng.random((64, 1, 16, 32), dtype=np.float32))
    images = split("input", rng.random((64, 1, 12, 12), dtype=np.float32))
    fixed = export(_Classifier(), torch.zeros(1, 1, 12, 12), "fixed.onnx", 11, dynamic_batch=False)
    return {
        "constant_weights_op12": (_to_constant_weights(export(_Recogniser(), torch.zeros(2, 1, 16, 32), "rec.onnx", 12)),
                                  lines),
        "opset11": (export(_Classifier(), torch.zeros(2, 1, 12, 12), "cls.onnx", 11), images),
        "int32_bytes_op15": (export(_ByteClassifier(), torch.zeros(2, 24, dtype=torch.int32), "bytes.onnx", 15),
                             split("input", rng.integers(0, 256, (64, 24)).astype(np.int32))),
        "fixed_batch1_op11": (fixed, images),
        "fixed_batch1_constant_weights_op11": (_to_constant_weights(fixed), images),
        "shared_weight_op15": (_shared_weight_model(), split("x", rng.standard_normal((64, 16)).astype(np.float32))),
    }


FORMS = ["constant_weights_op12", "opset11", "int32_bytes_op15", "fixed_batch1_op11",
         "fixed_batch1_constant_weights_op11", "shared_weight_op15"]


def _outputs(model: onnx.ModelProto | Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    return run_batched(session(model, 1), inputs)[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).mean())


class _Reader:
    """ORT's CalibrationDataReader protocol over the calibration split, at the graph's batch size."""

    def __init__(self, inputs: dict[str, np.ndarray], batch: int) -> None:
        n = len(next(iter(inputs.values())))
        self._feeds = iter([{k: v[i:i + batch] for k, v in inputs.items()} for i in range(0, n, batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _direct(model: onnx.ModelProto, data: DataSplit, tmp: Path) -> float | None:
    """Output cosine of ORT's ``quantize_static`` called directly (per-channel QDQ), or None where it fails."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    src, dst = tmp / "direct-float.onnx", tmp / "direct-int8.onnx"
    onnx.save(model, str(src))
    batch = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value or 16
    try:
        quantize_static(str(src), str(dst), _Reader(data.train.inputs, batch), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        extra_options={"WeightSymmetric": True})
        return _cosine(_outputs(dst, data.holdout.inputs), _outputs(model, data.holdout.inputs))
    except Exception:
        return None


@pytest.mark.parametrize("form", FORMS)
def test_int8_never_worse_than_ort_direct(forms, form, tmp_path):
    model, data = forms[form]
    reference = _outputs(model, data.holdout.inputs)
    direct = _direct(model, data, tmp_path)
    for spec in ({"method": "quantize"}, {"method": "quantize", "mode": "static"}):
        res = apply_step(spec, model, data, tmp_path)
        q = res.model
        ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
        ours = _cosine(_outputs(q, data.holdout.inputs), reference)
        assert ours >= (direct if direct is not None else 0.99) - 2e-3, (form, ours, direct)
        assert res.report["quantized_op_counts"].get("DequantizeLinear", 0) > 0
        assert res.report["pre_process"] == "ok" or res.report["pre_process"].startswith(("skipped: ", "retried without: "))
        if opset(model) < 13:  # per-channel needs opset 13: converted, said so
            assert res.report["per_channel"] and res.report["opset"] == {"original": opset(model), "quantized": 13}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("spec", [{"method": "quantize", "mode": "dynamic", "op_types": ["Conv", "MatMul", "Gather"]},
                                  {"method": "quantize", "scheme": "fp16"}], ids=["dynamic", "fp16"])
def test_dynamic_and_fp16_run_or_fail_with_a_reason(forms, form, spec, tmp_path):
    model, data = forms[form]
    try:
        res = apply_step(spec, model, data, tmp_path)
    except CompressionError as e:
        assert e.code != "internal_error" and str(e)
        return
    out = _outputs(res.model, data.holdout.inputs)
    assert _cosine(out, _outputs(model, data.holdout.inputs)) > 0.99
    assert _float32_weights(res.model) < _float32_weights(lift_constants(model)[0])  # weights stored smaller


def _float32_weights(model: onnx.ModelProto) -> int:
    """Float32 weight values (initializers of more than 16 values: not scales, shapes or biases of the tiny heads)."""
    sizes = [int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT]
    return sum(n for n in sizes if n > 16)


def test_constant_weights_are_quantized_as_weights(forms, tmp_path):
    """Lifted into initializers, paddle-style weights get int8 per-channel scales (direct ORT leaves them as
    activations); dynamic quantizes their Conv and MatMul too (ORT refuses weights that are not initializers)."""
    model, data = forms["constant_weights_op12"]
    lifted, n = lift_constants(model)
    assert n == sum(1 for node in model.graph.node if node.op_type == "Constant") and not any(
        node.op_type == "Constant" for node in lifted.graph.node)
    np.testing.assert_array_equal(_outputs(lifted, data.holdout.inputs), _outputs(model, data.holdout.inputs))
    res = apply_step({"method": "quantize", "mode": "dynamic", "op_types": ["Conv", "MatMul"]}, model, data, tmp_path)
    assert res.report["quantized_op_counts"].get("ConvInteger") == 2
    assert any("Constant nodes lifted" in note for note in res.report["notes"])


def test_int32_inputs_pass_through_unchanged(forms, tmp_path):
    model, data = forms["int32_bytes_op15"]
    q = apply_step({"method": "quantize"}, model, data, tmp_path).model
    sess = session(q, 1)
    assert sess.get_inputs()[0].type == "tensor(int32)"
    assert [n.op_type for n in q.graph.node if "input" in n.input] == ["Cast"]  # no Q/DQ on the bytes
    np.testing.assert_array_equal(run_batched(sess, data.holdout.inputs)[0].shape, (HOLDOUT, 5))


def test_fixed_batch_metrics_and_eval_one_sample_per_run(forms, tmp_path):
    """A batch-1 model is run, timed and measured one sample per run, with or without a dataset."""
    model, data = forms["fixed_batch1_op11"]
    sess = session(model, 1)
    assert run_batched(sess, data.holdout.inputs)[0].shape == (HOLDOUT, 10)
    assert throughput(sess, data.holdout.inputs, runs=2) > 0
    for split in (data, None):
        ev = eval_data(model, split, threads=1, seed=0)
        path = tmp_path / "fixed.onnx"
        onnx.save(model, str(path))
        m = measure(model, [path], EvalData(ev.inputs, ev.labels, ev.reference), latency_runs=2, threads=1)
        assert m["throughput"] > 0 and m["output_cosine"] == pytest.approx(1.0)


def test_invalid_graph_is_named_not_raw(tmp_path):
    """ORT's INVALID_GRAPH on a quantized graph (``axis`` on an opset-12 DequantizeLinear) becomes an
    ``unsupported_op`` naming the op, with no server path in it."""
    dq = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=0)
    g = helper.make_graph([dq], "bad", [helper.make_tensor_value_info("q", TensorProto.INT8, [2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
                          [numpy_helper.from_array(np.ones(2, np.float32), "s"),
                           numpy_helper.from_array(np.zeros(2, np.int8), "z")])
    path = tmp_path / "secret-upload" / "quantized.onnx"
    path.parent.mkdir()
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 12)], ir_version=7), str(path))
    with pytest.raises(Exception) as raw:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    err = _quantizer_error([_reason(raw.value)])
    assert isinstance(err, UnsupportedOp) and err.code == "unsupported_op" and err.op_types == ["DequantizeLinear"]
    assert str(tmp_path) not in str(err) and "DequantizeLinear" in str(err)
