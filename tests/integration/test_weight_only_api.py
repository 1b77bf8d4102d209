"""Weight-only int4 through REST (issue 15): the testkit's byte-level GPT, exported by the TorchScript
exporter, uploaded with byte windows of real text; ``quantize scheme: int4`` with its defaults. The artifact
holds MatMulNBits and GatherBlockQuantized nodes, loads in ONNX Runtime, is ≥ 4× smaller than float32, and
the language-model metrics the service reports are what this test computes itself from the downloaded
artifact on the held-out split; the SDK reads the bits per layer the CLI prints."""
from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from client import Client
from client.cli import layer_bits_lines
from compression.data import Arrays, split
from testkit import real_zoo
from testkit.lm import lm_fidelity, perplexity
from testkit.stack import upload, wait_job

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EVAL = {"latency_runs": 5, "holdout": 0.25, "seed": 3}


@pytest.fixture(scope="module")
def gpt(stack, zoo_folder, tmp_path_factory):
    built = real_zoo.build("gpt", "legacy17", zoo_folder)
    npz = tmp_path_factory.mktemp("wonly") / "bytes.npz"
    np.savez(npz, **built.inputs)
    c = stack.client()
    return upload(c, built.path), upload(c, npz), built


def test_int4_defaults_through_rest(stack, gpt):
    model, ds, built = gpt
    c = stack.client()
    body = {"model_id": model["id"], "dataset_id": ds["id"],
            "spec": {"steps": [{"method": "quantize", "scheme": "int4"}], "eval": EVAL}}
    pre = c.post("/v1/jobs/preflight", json=body)
    assert pre.status_code == 200, pre.text
    step = pre.json()["steps"][0]
    assert step["applies"] is True and any("MatMul" in n for n in step["notes"]), step
    r = c.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = wait_job(c, r.json()["id"], timeout=400)
    assert job["status"] == "succeeded", job["error"]

    q = onnx.load_model(io.BytesIO(c.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").content))
    ops = {n.op_type for n in q.graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops, ops
    res, orig = job["metrics"]["result"], job["metrics"]["original"]
    assert res["ratios"]["file_bytes"] >= 4.0, res["ratios"]

    # the held-out split the service measured on, and the numbers computed here from the artifact
    held = split(Arrays(dict(built.inputs)), holdout=EVAL["holdout"], seed=EVAL["seed"], max_eval=2000).holdout
    ids = held.inputs["input_ids"]
    run = lambda m: ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
    ref, out = run(str(built.path)), run(q.SerializeToString())
    mine = lm_fidelity(out, ref, ids)
    assert orig["perplexity"] == pytest.approx(perplexity(ref, ids), rel=1e-3)
    assert res["perplexity"] == pytest.approx(mine["perplexity"], rel=1e-3)
    assert res["token_agreement"] == pytest.approx(mine["token_agreement"], abs=1e-4)
    assert res["kl"] == pytest.approx(mine["kl"], rel=1e-2, abs=1e-5)
    assert mine["token_agreement"] >= 0.9 and res["ratios"]["perplexity_ratio"] <= 1.10

    # bits per layer: the LM head at 8 bits, the other MatMuls and the tables at 4 (SDK + the CLI's lines)
    with Client(stack.url, stack.key) as nc:
        report = nc.job(job["id"]).report()
    layers = report["steps"][0]["report"]["layers"]
    bits = {entry["bits"] for entry in layers}
    assert bits == {4, 8} and sum(entry["bits"] == 8 for entry in layers) == 1, layers
    line = layer_bits_lines(report)[0]
    assert "at 4 bits" in line and "1 at 8 bits" in line and "block 32" in line, line
