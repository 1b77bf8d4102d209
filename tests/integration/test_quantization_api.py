"""Every quantization scheme family through HTTP (PostgreSQL + Redis + a worker process): the artifacts'
graphs, values per layer, accuracy and real bytes; the Deep Compression spec and its ``.xz`` download."""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from compression.spec import FinetuneSpec
from compression.techniques.quantization.layers import channel_view, weight_layers
from compression.techniques.quantization.packing import computed_weights
from compression.xz_artifact import load_compressed
from testkit.stack import upload, wait_job

DEEP_COMPRESSION = {"steps": [
    {"method": "prune", "granularity": "weight", "sparsity": 0.8, "iterations": 2, "finetune": {"epochs": 1}},
    {"method": "quantize", "scheme": "cluster", "bits": 4, "finetune": {"epochs": 1, "lr": 1e-4}},
], "eval": {"holdout": 0.4, "latency_runs": 5}}
SPECS = {
    "deep_compression": DEEP_COMPRESSION,
    "binary": {"steps": [{"method": "quantize", "scheme": "binary", "finetune": {"epochs": 2}}],
               "eval": {"holdout": 0.4, "latency_runs": 5}},
    "qat": {"steps": [{"method": "quantize", "scheme": "int8", "mode": "qat", "finetune": {"epochs": 1, "lr": 1e-4}}],
            "eval": {"holdout": 0.4, "latency_runs": 5}},
    "fp16": {"steps": [{"method": "quantize", "scheme": "fp16"}], "eval": {"holdout": 0.4, "latency_runs": 5}},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lenet_upload(mnist_data, tmp_path_factory):
    from testkit.refdata import fit
    from testkit.zoo import LeNet300100, export_onnx

    X, y = mnist_data
    Xf = X.reshape(len(X), -1)
    torch.manual_seed(0)
    net = fit(LeNet300100(), Xf[:2000], y[:2000], epochs=3)
    d = tmp_path_factory.mktemp("qapi")
    onnx_path = export_onnx(net, torch.zeros(2, 784), d / "lenet.onnx", dynamo=True)
    npz = d / "mnist_flat.npz"
    np.savez(npz, input=Xf[3000:4000], labels=y[3000:4000])
    return onnx_path, npz, Xf[4000:5000], y[4000:5000]


@pytest.fixture(scope="module")
def jobs(stack, lenet_upload):
    """Upload once, submit one job per scheme family, wait for all (the worker runs them in turn)."""
    onnx_path, npz, _, _ = lenet_upload
    c = stack.client()
    model, ds = upload(c, onnx_path), upload(c, npz)
    ids = {}
    for name, spec in SPECS.items():
        r = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": ds["id"], "spec": spec, "name": name})
        assert r.status_code == 202, r.text
        ids[name] = r.json()["id"]
    out = {}
    for name, job_id in ids.items():
        job = wait_job(c, job_id, timeout=400)
        assert job["status"] == "succeeded", (name, job["error"])
        out[name] = job
    return out


def _download(stack, job, name) -> bytes:
    arts = {a["name"]: a for a in job["artifacts"]}
    blob = stack.client().get(f"/v1/jobs/{job['id']}/artifacts/{name}").content
    assert hashlib.sha256(blob).hexdigest() == arts[name]["sha256"] and len(blob) == arts[name]["size_bytes"]
    return blob


def _accuracy(blob: bytes, X: np.ndarray, y: np.ndarray) -> float:
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return float((sess.run(None, {"input": X})[0].argmax(1) == y).mean())


def test_deep_compression_spec_and_xz_download(stack, jobs, lenet_upload, tmp_path):
    onnx_path, _, X, y = lenet_upload
    job = jobs["deep_compression"]
    arts = {a["name"]: a for a in job["artifacts"]}
    assert arts["model.onnx.xz"]["kind"] == "compressed_model"
    blob = _download(stack, job, "model.onnx")
    xz = tmp_path / "model.onnx.xz"
    xz.write_bytes(_download(stack, job, "model.onnx.xz"))
    assert load_compressed(xz) == blob  # the loader gives back model.onnx byte for byte

    result, orig = job["metrics"]["result"], job["metrics"]["original"]
    assert result["compressed_bytes"] == arts["model.onnx.xz"]["size_bytes"]
    assert result["compressed_bytes"] < result["zip_bytes"] < result["file_bytes"]
    assert result["ratios"]["file_to_compressed"] > 15  # 80% zeros + 4-bit shared weights, entropy coded
    assert result["file_bytes"] * 6 < orig["file_bytes"]  # packed 4-bit indices: the ONNX itself shrinks
    assert result["params"] == orig["params"]  # packed weights are counted as weights, not bytes
    pruned = job["metrics"]["steps"][0]
    assert result["nonzero_params"] == pruned["nonzero_params"] <= 0.21 * orig["params"]  # zeros survived

    original = onnx.load(str(onnx_path))
    model = onnx.load_from_string(blob)
    assert {"Gather", "BitShift"} <= {n.op_type for n in model.graph.node}
    for name, w in computed_weights(model, [wl.weight for wl in weight_layers(original)]).items():
        assert len(np.unique(w)) <= 16, name
    acc_o, acc_c = _accuracy(onnx_path.read_bytes(), X, y), _accuracy(blob, X, y)
    assert acc_c >= acc_o - 0.03, (acc_o, acc_c)

    report = stack.client().get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    layers = report["steps"][1]["report"]["layers"]
    assert len(layers) == 3 and all(r["stored_bits"] == 4 and r["zero_centroid"] for r in layers)
    assert layers[0]["bits_per_weight"] < 4.01 and layers[0]["entropy_bits_per_weight"] < 2  # 80% one code
    # the step's settings as parsed: what was given, every other recovery option at its default
    finetune = FinetuneSpec(**DEEP_COMPRESSION["steps"][1]["finetune"]).model_dump(mode="json")
    assert finetune["epochs"] == 1 and finetune["lr"] == 1e-4
    assert report["steps"][1]["report"]["settings"] == {
        "scheme": "cluster", "bits": 4, "finetune": finetune, "layers": None, "exclude_layers": [], "layer_bits": {}}


def test_binary_job_weights_take_two_values(stack, jobs, lenet_upload):
    onnx_path, _, X, y = lenet_upload
    job = jobs["binary"]
    blob = _download(stack, job, "model.onnx")
    original, model = onnx.load(str(onnx_path)), onnx.load_from_string(blob)
    for wl in weight_layers(original):
        rows = channel_view(computed_weights(model, [wl.weight])[wl.weight], wl.axis)
        assert np.all(np.abs(rows) == np.abs(rows).max(1, keepdims=True))  # ±α per output channel
        assert max(len(np.unique(r)) for r in rows) == 2
    m = job["metrics"]["result"]
    assert m["ratios"]["file_bytes"] > 20 and m["file_bytes"] == len(blob)
    assert _accuracy(blob, X, y) >= _accuracy(onnx_path.read_bytes(), X, y) - 0.05


def test_qat_job_is_qdq_int8(stack, jobs, lenet_upload):
    onnx_path, _, X, y = lenet_upload
    job = jobs["qat"]
    blob = _download(stack, job, "model.onnx")
    model = onnx.load_from_string(blob)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    assert sum(1 for t in model.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2) == 3
    m = job["metrics"]["result"]
    assert m["ratios"]["file_bytes"] > 3.5
    assert _accuracy(blob, X, y) >= _accuracy(onnx_path.read_bytes(), X, y) - 0.01
    report = stack.client().get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    assert report["steps"][0]["report"]["qat"]["weights_on_grid_max_error"] < 1e-6


def test_fp16_job(stack, jobs, lenet_upload):
    onnx_path, _, X, y = lenet_upload
    job = jobs["fp16"]
    blob = _download(stack, job, "model.onnx")
    model = onnx.load_from_string(blob)
    assert {t.data_type for t in model.graph.initializer if len(t.dims) == 2} == {TensorProto.FLOAT16}
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert 1.9 < job["metrics"]["result"]["ratios"]["file_bytes"] < 2.1
    assert abs(_accuracy(blob, X, y) - _accuracy(onnx_path.read_bytes(), X, y)) <= 0.003


@pytest.mark.parametrize("step, path", [
    ({"method": "quantize", "scheme": "int8", "bits": 4}, "$.spec.steps[0].bits"),
    ({"method": "quantize", "scheme": "cluster", "mode": "dynamic"}, "$.spec.steps[0].mode"),
    ({"method": "quantize", "scheme": "binary"}, "$.spec.steps[0]"),  # trains: needs a dataset
])
def test_bad_quantize_specs_are_422_at_their_path(stack, lenet_upload, step, path):
    onnx_path = lenet_upload[0]
    c = stack.client()
    model = upload(c, onnx_path)
    r = c.post("/v1/jobs", json={"model_id": model["id"], "spec": {"steps": [step]}})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == "invalid_spec" and path in [e["path"] for e in body["errors"]], body
