"""Static counts and measured metrics against numbers worked out by hand."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compression.analysis import count_params, macs
from compression.metrics import EvalData, fidelity, measure, ratios
from compression.modelio import describe, save
from testkit.helpers import apply_step

# SmallCNN: conv1 28·28·16·(1·9) + conv2 14·14·32·(16·9) + fc1 1568·128 + fc2 128·10
CNN_MACS = 28 * 28 * 16 * 9 + 14 * 14 * 32 * 16 * 9 + 1568 * 128 + 128 * 10


def test_cnn_params_and_macs_both_exporters(cnn_onnx, trained_cnn):
    torch_params = sum(p.numel() for n, p in trained_cnn.named_parameters())
    sample = {"input": np.zeros((1, 1, 28, 28), np.float32)}
    for path in cnn_onnx.values():
        m = onnx.load(str(path))
        params, nonzero = count_params(m)
        # The legacy exporter folds BatchNorm into the convs (fewer params); dynamo keeps BN (+ its stats).
        assert torch_params - 2 * (16 + 32) <= params <= torch_params + 2 * (16 + 32)
        assert nonzero == params
        assert macs(m, sample) == CNN_MACS


def test_measure_reports_sizes_from_disk(cnn_onnx, mnist_data, tmp_path):
    X, y = mnist_data
    path = cnn_onnx["dynamo"]
    m = onnx.load(str(path))
    ev = EvalData({"input": X[:64]}, y[:64])
    res = measure(m, [path], ev, latency_runs=5, threads=1)
    assert res["file_bytes"] == path.stat().st_size
    assert 0 < res["zip_bytes"] < res["file_bytes"]
    assert res["latency_ms"]["p50"] > 0 and res["latency_ms"]["p90"] >= res["latency_ms"]["p50"]
    assert res["throughput"] > 0 and res["accuracy"] > 0.85


def test_fidelity_and_ratios():
    ref = [np.array([[1.0, 0.0], [0.0, 1.0]])]
    out = [np.array([[1.0, 0.0], [1.0, 0.0]])]
    f = fidelity(out, ref, None)
    assert f["agreement"] == 0.5 and abs(f["output_cosine"] - 0.5) < 1e-9 and f["max_abs_error"] == 1.0
    r = ratios({"file_bytes": 25, "latency_ms": {"p50": 2.0}, "accuracy": 0.9},
               {"file_bytes": 100, "latency_ms": {"p50": 1.0}, "accuracy": 0.95})
    assert r == {"file_bytes": 4.0, "latency_p50_speedup": 0.5, "accuracy_delta": -0.05}


def _constant_weights_model() -> onnx.ModelProto:
    """``y = (x·W + b) · 0.5`` with ``W [4, 3]`` and ``b [3]`` in Constant nodes, as some exporters store weights
    (the scalar 0.5 is no parameter)."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(rng.random((4, 3), np.float32), "w")),
        helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(np.zeros(3, np.float32), "bias")),
        helper.make_node("Constant", [], ["half"], value_float=0.5),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["z"]),
        helper.make_node("Mul", ["z", "half"], ["y"]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("case", ["cluster_4bit", "int8_dynamic", "pruned", "constant_weights"])
def test_describe_and_measure_count_the_same_params(case, lenet, tmp_path):
    """The model's record (``describe``) and its measured metrics (``measure``) give one parameter count."""
    model, data = lenet
    steps = {"cluster_4bit": {"method": "quantize", "scheme": "cluster", "bits": 4},
             "int8_dynamic": {"method": "quantize", "mode": "dynamic"},
             "pruned": {"method": "prune", "sparsity": 0.5}}
    if case == "constant_weights":
        m = _constant_weights_model()
        ev = EvalData({"x": np.ones((8, 4), np.float32)}, None)
    else:
        m = apply_step(steps[case], model, data, tmp_path).model
        ev = EvalData({"input": data.holdout.inputs["input"][:64]}, data.holdout.labels[:64])
    measured = measure(m, save(m, tmp_path / "m.onnx"), ev, latency_runs=5, threads=1)
    assert describe(m)["params"] == measured["params"]
    if case == "constant_weights":
        assert measured["params"] == measured["nonzero_params"] + 3 == 15  # W and b (zeros) count; 0.5 does not
    elif case == "pruned":
        assert measured["params"] == describe(model)["params"]
        assert measured["nonzero_params"] < 0.6 * measured["params"]
    elif case == "cluster_4bit":  # packed codes count as the weights they decode to, not as their bytes
        assert measured["params"] == describe(model)["params"] > count_params(m)[0]


def _lm_case(seed: int = 0, n: int = 6, t: int = 9, v: int = 11):
    rng = np.random.default_rng(seed)
    ref = (rng.standard_normal((n, t, v)) * 3).astype(np.float32)
    out = (ref + rng.standard_normal((n, t, v)) * 0.7).astype(np.float32)
    ids = rng.integers(0, v, size=(n, t))
    mask = np.ones((n, t), np.int64)
    mask[1, 6:] = 0  # a padded tail
    mask[4, 3:] = 0
    return out, ref, ids, mask


def _torch_lm(out: np.ndarray, ref: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """The same three numbers, independently: torch's cross_entropy and kl_div over the real positions."""
    import torch
    import torch.nn.functional as F

    o, r = torch.from_numpy(out).double(), torch.from_numpy(ref).double()
    real = torch.from_numpy(mask).bool()
    pair = real[:, :-1] & real[:, 1:]
    ce = F.cross_entropy(o[:, :-1][pair], torch.from_numpy(ids)[:, 1:][pair])
    kl = F.kl_div(F.log_softmax(o[real], -1), F.log_softmax(r[real], -1), log_target=True, reduction="batchmean")
    agree = (o.argmax(-1) == r.argmax(-1))[real].double().mean()
    return {"perplexity": float(torch.exp(ce)), "kl": float(kl), "token_agreement": float(agree)}


def test_lm_metrics_match_torch_with_masking_and_chunking():
    from compression.metrics import lm_metrics

    out, ref, ids, mask = _lm_case()
    want = _torch_lm(out, ref, ids, mask)
    got = lm_metrics(out, ids, mask, ref)
    assert got["sequence_length"] == 9
    for k in ("perplexity", "kl", "token_agreement"):
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k
    assert 0 < got["token_agreement"] < 1 and got["kl"] > 0.01  # the case is not degenerate
    # one sample per chunk gives the same numbers
    assert lm_metrics(out, ids, mask, ref, chunk_bytes=1) == got
    # the mask matters: without it the padded tails count, and the numbers move
    unmasked = lm_metrics(out, ids, None, ref)
    assert unmasked["perplexity"] == pytest.approx(_torch_lm(out, ref, ids, np.ones_like(mask))["perplexity"], rel=1e-5)
    assert unmasked["perplexity"] != got["perplexity"]
    # the original against itself: perplexity only, agreement 1, KL 0
    same = lm_metrics(ref, ids, mask, ref)
    assert same["token_agreement"] == 1.0 and same["kl"] == 0.0
    assert "kl" not in lm_metrics(ref, ids, mask)


def test_lm_metrics_are_stable_for_large_logits():
    """float32 logits of ±1e4 (an unnormalised head): no overflow, the right answer for a near one-hot output."""
    from compression.metrics import lm_metrics

    logits = np.full((1, 3, 5), -1e4, np.float32)
    logits[0, :, 2] = 1e4
    res = lm_metrics(logits, np.array([[2, 2, 2]]), None, logits[:, :, ::-1].copy())
    assert res["perplexity"] == 1.0 and res["token_agreement"] == 1.0  # index 2 is the middle: the flip keeps it
    assert np.isfinite(res["kl"])


def test_measure_adds_lm_metrics_and_ratios(tmp_path):
    """An ONNX 'language model' (logits = a table lookup of the ids) measured: perplexity for the original,
    agreement and KL against a reference, and ``perplexity_ratio`` > 1 for a worse model."""
    from compression.metrics import lm_ids_input

    rng = np.random.default_rng(1)
    table = rng.standard_normal((7, 7)).astype(np.float32) * 2
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["n", "t"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["n", "t"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", "t", 7])
    graph = helper.make_graph([helper.make_node("Gather", ["table", "input_ids"], ["logits"]),
                               helper.make_node("Identity", ["attention_mask"], ["unused"])],
                              "lm", [ids, mask], [y], [numpy_helper.from_array(table, "table")])
    graph.output.append(helper.make_tensor_value_info("unused", TensorProto.INT64, ["n", "t"]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    x = rng.integers(0, 7, size=(5, 8))
    m = np.ones_like(x)
    m[2, 5:] = 0
    ref = table[x] + 0.5 * rng.standard_normal((5, 8, 7)).astype(np.float32)
    ev = EvalData({"input_ids": x, "attention_mask": m}, None, reference=[ref, m])
    res = measure(model, save(model, tmp_path / "lm.onnx"), ev, latency_runs=5, threads=1)
    want = _torch_lm(table[x], ref, x, m)
    assert res["sequence_length"] == 8 and "agreement" not in res and res["output_cosine"] < 1
    for k in ("perplexity", "kl", "token_agreement"):
        assert res[k] == pytest.approx(want[k], rel=1e-5), k
    assert lm_ids_input(table[x], {"attention_mask": m, "ids": x}) is None  # two 2-D integer inputs, neither named
    assert lm_ids_input(table[x], {"ids": x}) == "ids"
    assert lm_ids_input(table[x][:, :4], {"input_ids": x}) is None  # T differs
    assert lm_ids_input(table[x][..., :3], {"input_ids": x}) is None  # ids past V: a per-token tagger
    worse = ratios({"perplexity": 6.0}, {"perplexity": 5.0})
    assert worse == {"perplexity_ratio": 1.2}
