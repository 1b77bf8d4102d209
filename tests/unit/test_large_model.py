"""The road of models over 2 GiB, forced with a small model: external data written without stripping the model,
the pipeline measuring from files, and which steps say they run on a large model."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from compression import modelio
from compression.metrics import EvalData, deflated_size, measure
from compression.pipeline import run_pipeline
from compression.spec import parse_spec
from testkit.large_model import decoder_params, write_decoder, zip_folder

HIDDEN, LAYERS = 32, 3


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """The testkit decoder as a user zips it (one weight file per tensor, in a sub-folder), read back as the
    worker reads a stored zip."""
    d = tmp_path_factory.mktemp("dec")
    write_decoder(d / "export", hidden=HIDDEN, layers=LAYERS, one_file=False)
    zipped = zip_folder(d / "export", d / "model.zip")
    return modelio.load_stored(zipped, d / "work")


def test_save_writes_external_data_and_keeps_the_model(decoder, tmp_path):
    before = [numpy_helper.to_array(t).copy() for t in decoder.graph.initializer]
    files = modelio.save(decoder, tmp_path / "model.onnx", external_above=64 * 1024)
    assert [f.name for f in files] == ["model.onnx", "model.onnx.data"]
    assert files[0].stat().st_size < 4096  # the graph alone
    # the caller's model still holds its weights (onnx's own save strips them)
    assert not modelio.uses_external_data(decoder)
    for t, want in zip(decoder.graph.initializer, before):
        np.testing.assert_array_equal(numpy_helper.to_array(t), want)
    header = onnx.load_model(str(files[0]), load_external_data=False)
    offsets = [int(next(e.value for e in t.external_data if e.key == "offset")) for t in header.graph.initializer]
    assert all(o % modelio.EXTERNAL_ALIGN == 0 for o in offsets)
    x = np.random.default_rng(0).standard_normal((3, HIDDEN)).astype(np.float32)
    got = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"]).run(None, {"hidden_states": x})[0]
    want = ort.InferenceSession(decoder.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"hidden_states": x})[0]
    np.testing.assert_array_equal(got, want)
    assert modelio.weight_bytes(decoder) == decoder_params(HIDDEN, LAYERS) * 4
    # below the limit: one file, as before
    assert len(modelio.save(decoder, tmp_path / "small.onnx")) == 1


def test_measure_from_files_and_the_zip_cap(decoder, tmp_path):
    files = modelio.save(decoder, tmp_path / "m.onnx", external_above=0)
    x = np.random.default_rng(1).standard_normal((8, HIDDEN)).astype(np.float32)
    m = measure(decoder, files, EvalData({"hidden_states": x}, None), latency_runs=3, threads=1)
    assert m["macs"] == decoder_params(HIDDEN, LAYERS)  # one MAC a weight, at batch 1
    assert m["zip_bytes"] == deflated_size(files) and 0 < m["zip_bytes"] < m["file_bytes"]
    assert "not_measured" not in m
    capped = measure(decoder, files, EvalData({"hidden_states": x}, None), latency_runs=3, threads=1, zip_max_bytes=1000)
    assert capped["zip_bytes"] is None and "zip_bytes" in capped["not_measured"]
    assert not list(tmp_path.glob(".probe-*"))  # the MAC probe cleans up after itself


def test_pipeline_writes_every_model_with_external_data(decoder, tmp_path):
    spec = parse_spec({"steps": [{"method": "quantize", "scheme": "fp16"}], "eval": {"latency_runs": 5}})
    res = run_pipeline(decoder, spec, None, tmp_path, threads=1, external_above=16 * 1024)
    names = {f.name: f.kind for f in res.files}
    assert names["model.onnx"] == "model" and names["model.onnx.data"] == "model"
    assert "model.onnx.xz" not in names  # the xz artifact is one file's
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"hidden_states": np.ones((2, HIDDEN), np.float32)})[0].shape == (2, HIDDEN)
    orig, result = res.metrics["original"], res.metrics["result"]
    assert orig["file_bytes"] > decoder_params(HIDDEN, LAYERS) * 4 - 1  # the original measured from its files
    assert result["ratios"]["file_bytes"] > 1.9 and result["output_cosine"] > 0.999
    assert res.report["manifest"]["result_sha256"]


def test_which_steps_handle_large_models():
    steps = parse_spec({"steps": [{"method": "quantize", "scheme": "int4"},
                                  {"method": "quantize", "scheme": "int8", "mode": "weight_only"},
                                  {"method": "quantize", "scheme": "int4", "algorithm": "gptq"},
                                  {"method": "quantize", "scheme": "int4", "format": "qdq"},
                                  {"method": "quantize", "scheme": "fp16"},
                                  {"method": "quantize", "scheme": "int8", "mode": "dynamic"},
                                  {"method": "prune", "sparsity": 0.5, "finetune": {"epochs": 1}},
                                  {"method": "prune", "granularity": "channel", "sparsity": 0.5}]}).steps
    assert [s.handles_large for s in steps] == [True, True, False, False, False, False, False, False]
