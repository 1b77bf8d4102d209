"""A model over the external-data limit through HTTP: the zip an exporter's folder makes (weights in a
sub-folder, one file per tensor) uploads without its weights being loaded by the API, a step that trains is
refused at submit, a weight-only step runs and its result downloads as ``model.onnx`` + ``model.onnx.data``.

The limit is lowered (``NETCOMPRESS_EXTERNAL_DATA_ABOVE_BYTES``) so a 1.5 MB model takes the road of one over
2 GiB; ``bench/large_model.py`` runs the real size.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from testkit.large_model import decoder_params, write_decoder, zip_folder
from testkit.stack import expect_problem, start_embedded, upload, wait_job

HIDDEN, LAYERS = 64, 6
LIMIT = 64 * 1024  # the int4 result (~0.25 MB) is over it too: written with external data
STEP = {"method": "quantize", "scheme": "int4"}


@pytest.fixture(scope="module")
def large_stack(tmp_path_factory):
    s = start_embedded(tmp_path_factory.mktemp("large"), NETCOMPRESS_EXTERNAL_DATA_ABOVE_BYTES=str(LIMIT),
                       NETCOMPRESS_MODEL_INLINE_MAX_BYTES="0")
    yield s
    s.stop()


def test_large_model_upload_job_download(large_stack, tmp_path):
    write_decoder(tmp_path / "export", hidden=HIDDEN, layers=LAYERS, one_file=False)
    c = large_stack.client()
    model = upload(c, zip_folder(tmp_path / "export", tmp_path / "decoder.zip"))
    params = decoder_params(HIDDEN, LAYERS)
    assert model["format"] == "onnx_zip" and model["params"] == params and model["weight_bytes"] == params * 4

    r = c.post("/v1/jobs", json={"model_id": model["id"], "spec": {"steps": [
        STEP, {"method": "prune", "sparsity": 0.5, "finetune": {"epochs": 1}}]}})
    body = expect_problem(r, 422, "too_large")
    assert [e["loc"] for e in body["errors"]] == [["spec", "steps", 1]]  # the weight-only step is not named

    r = c.post("/v1/jobs", json={"model_id": model["id"], "spec": {"steps": [STEP], "eval": {"latency_runs": 5}}})
    assert r.status_code == 202, r.text
    job = wait_job(c, r.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    kinds = {a["name"]: a["kind"] for a in job["artifacts"]}
    assert kinds["model.onnx"] == "model" and kinds["model.onnx.data"] == "model"
    out = tmp_path / "download"
    out.mkdir()
    for name in ("model.onnx", "model.onnx.data"):  # ORT finds the data beside the graph, by its name
        (out / name).write_bytes(c.get(f"/v1/jobs/{job['id']}/artifacts/{name}").content)
    assert (out / "model.onnx").stat().st_size < 8192
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"hidden_states": np.ones((2, HIDDEN), np.float32)})[0]
    assert y.shape == (2, HIDDEN) and np.isfinite(y).all()
    orig, result = job["metrics"]["original"], job["metrics"]["result"]
    assert orig["file_bytes"] >= params * 4 and orig["macs"] == params == result["macs"]
    assert orig["zip_bytes"] > 0 and result["zip_bytes"] > 0 and result["output_cosine"] > 0.95
    assert result["file_bytes"] < orig["file_bytes"] and result["ratios"]["file_bytes"] > 4
