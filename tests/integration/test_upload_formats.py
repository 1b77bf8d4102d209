"""Model formats through HTTP: a .zip of ONNX + external data and a torch.export .pt2 both run jobs."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import onnxruntime as ort
import torch

from testkit.refdata import fit
from testkit.zoo import LeNet300100
from testkit.stack import upload, wait_job


def _lenet_data(mnist_data):
    X, y = mnist_data
    return X.reshape(len(X), -1)[:600], y[:600]


def _trained_lenet(mnist_data) -> LeNet300100:
    """Agreement is only meaningful on a trained net (an untrained one has near-tied logits)."""
    X, y = mnist_data
    torch.manual_seed(0)
    return fit(LeNet300100(), X.reshape(len(X), -1)[1000:3000], y[1000:3000], epochs=2)


def _check_job(stack, model, X, tmp_path):
    c = stack.client()
    buf = io.BytesIO()
    np.savez(buf, **{model["inputs"][0]["name"]: X})
    ds = upload(c, "d.npz", buf.getvalue())
    r = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": ds["id"], "spec": {"steps": [
        {"method": "prune", "sparsity": 0.5, "finetune": {"epochs": 1}},
        {"method": "quantize", "mode": "dynamic"}]}})
    assert r.status_code == 202, r.text
    job = wait_job(c, r.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    blob = c.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").content
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: X[:8]})[0]
    assert out.shape == (8, 10) and np.isfinite(out).all()
    # unlabelled data: fine-tuning distilled from the original, and the metrics say how close it stays
    assert job["metrics"]["result"]["agreement"] > 0.8
    return job


def _zip_with_external_data(net: torch.nn.Module, folder) -> io.BytesIO:
    """The net exported with its weights in a sidecar ``.data`` file, both zipped."""
    folder.mkdir()
    torch.onnx.export(net, (torch.zeros(2, 784),), str(folder / "model.onnx"), dynamo=True, external_data=True,
                      input_names=["input"], dynamic_shapes=({0: torch.export.Dim("batch")},))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in folder.iterdir():
            zf.write(p, p.name)
    return buf


def test_zip_with_external_data(stack, mnist_data, tmp_path):
    X, _ = _lenet_data(mnist_data)
    net = _trained_lenet(mnist_data)
    buf = _zip_with_external_data(net, tmp_path / "export")
    model = upload(stack.client(), "lenet.zip", buf.getvalue())
    assert model["format"] == "onnx_zip" and model["params"] == sum(p.numel() for p in net.parameters())
    # downloaded as one self-contained ONNX
    blob = stack.client().get(f"/v1/models/{model['id']}/file").content
    out = ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, {"input": X[:4]})[0]
    np.testing.assert_allclose(out, net(torch.from_numpy(X[:4])).detach().numpy(), atol=1e-5)
    _check_job(stack, model, X, tmp_path)


def test_pt2_program(stack, mnist_data, tmp_path):
    X, _ = _lenet_data(mnist_data)
    net = _trained_lenet(mnist_data)
    ep = torch.export.export(net, (torch.zeros(2, 784),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path / "lenet.pt2"
    torch.export.save(ep, str(path))
    model = upload(stack.client(), path)
    assert model["format"] == "pt2" and model["outputs"][0]["shape"][-1] == 10
    _check_job(stack, model, X, tmp_path)


def test_large_zip_is_stored_as_uploaded_and_runs(mnist_data, tmp_path):
    """A zip over the inline threshold (0 here) is checked without loading its weights in the API, stored
    as the zip, served back as the zip, and opened by the worker."""
    from testkit.stack import start_embedded

    X, _ = _lenet_data(mnist_data)
    net = _trained_lenet(mnist_data)
    buf = _zip_with_external_data(net, tmp_path / "export")
    stack = start_embedded(tmp_path / "lazy", NETCOMPRESS_MODEL_INLINE_MAX_BYTES="0")
    try:
        model = upload(stack.client(), "lenet.zip", buf.getvalue())
        assert model["format"] == "onnx_zip" and model["params"] == sum(p.numel() for p in net.parameters())
        got = stack.client().get(f"/v1/models/{model['id']}/file")
        assert got.content == buf.getvalue() and got.headers["content-disposition"].endswith('.zip"')
        _check_job(stack, model, X, tmp_path)
    finally:
        stack.stop()
