"""Static counts and measured metrics against numbers worked out by hand."""
from __future__ import annotations

import numpy as np
import onnx

from compression.analysis import count_params, macs
from compression.metrics import EvalData, fidelity, measure, ratios

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
