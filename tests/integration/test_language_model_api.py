"""A language model through the CLI and the API (issue 15): the zoo's byte-level GPT (TorchScript export) and a
text file given as ``--texts FILE --bytes``, quantized weight-only int4 with its defaults by the worker. The
artifact holds MatMulNBits and GatherBlockQuantized nodes, loads in ONNX Runtime and is ≥ 4× smaller than
float32; the LM head is kept at 8 bits and the SDK reads the bits per layer the CLI prints. The job's
perplexity (original and result),
token agreement and KL are what this test computes itself, with torch's cross_entropy and kl_div, from the
downloaded artifact run in ONNX Runtime on the held-out split (``compression.data.split`` with the job's
``eval.seed`` and ``eval.holdout``), over windows it cuts from the raw bytes itself."""
from __future__ import annotations

import io
import json
import pydoc_data.topics
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from client import Client
from client.cli import layer_bits_lines
from compression.data import Arrays, split
from testkit import real_zoo
from testkit.stack import NC

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SEQ, WINDOWS = 32, 160


def _logits(model: bytes | str, ids: np.ndarray) -> torch.Tensor:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"input_ids": ids})[0]).double()


def test_gpt_int4_through_the_cli_perplexity_agreement_and_kl_match_onnx_runtime(stack, zoo_folder, tmp_path):
    built = real_zoo.build("gpt", "legacy17", zoo_folder)  # the matrix's build (cached); input_ids [batch, 32] → logits [batch, 32, 256]
    raw = "\n".join(pydoc_data.topics.topics.values()).encode()[:SEQ * WINDOWS]
    text = tmp_path / "topics.txt"
    text.write_bytes(raw)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"steps": [{"method": "quantize", "scheme": "int4"}],
                                "eval": {"latency_runs": 5, "holdout": 0.2, "seed": 3}}))
    env = {**stack.env, "NETCOMPRESS_URL": stack.url, "NETCOMPRESS_API_KEY": stack.key}
    r = subprocess.run(NC + ["submit", str(built.path), "--texts", str(text), "--bytes", "--seq-len", str(SEQ),
                             "--spec", str(spec), "--wait", "--json", "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stderr, json.loads(r.stdout).get("error") if r.stdout else None)
    job = json.loads(r.stdout)
    assert job["status"] == "succeeded", job["error"]
    # the model has no attention_mask input: none was sent, and the windows are the text's bytes
    assert f"{WINDOWS} windows of {SEQ} tokens as 'input_ids'" in r.stderr and "attention_mask" not in r.stderr
    orig, res = job["metrics"]["original"], job["metrics"]["result"]

    ids = np.frombuffer(raw, np.uint8).astype(np.int64).reshape(WINDOWS, SEQ)
    held = split(Arrays({"input_ids": ids}), holdout=0.2, seed=3, max_eval=2000).holdout.inputs["input_ids"]
    artifact = stack.client().get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").content
    q = onnx.load_model(io.BytesIO(artifact))
    onnx.checker.check_model(q)
    assert {"MatMulNBits", "GatherBlockQuantized"} <= {n.op_type for n in q.graph.node}
    assert res["ratios"]["file_bytes"] >= 4.0, res["ratios"]
    ref, out = _logits(str(built.path), held), _logits(artifact, held)
    target = torch.from_numpy(held[:, 1:]).reshape(-1)

    def ppl(logits: torch.Tensor) -> float:
        return float(torch.exp(F.cross_entropy(logits[:, :-1].reshape(-1, 256), target)))

    kl = F.kl_div(F.log_softmax(out, -1).reshape(-1, 256), F.log_softmax(ref, -1).reshape(-1, 256),
                  log_target=True, reduction="batchmean")
    agree = float((out.argmax(-1) == ref.argmax(-1)).double().mean())
    assert orig["perplexity"] == pytest.approx(ppl(ref), rel=1e-4)
    assert res["perplexity"] == pytest.approx(ppl(out), rel=1e-4)
    assert res["token_agreement"] == pytest.approx(agree, abs=1.5 / held.size)  # one position at most
    assert res["kl"] == pytest.approx(float(kl), rel=1e-2) and res["kl"] > 0  # int4 moves the distribution
    assert agree >= 0.9
    assert res["sequence_length"] == orig["sequence_length"] == SEQ and "agreement" not in res
    assert res["ratios"]["perplexity_ratio"] == pytest.approx(res["perplexity"] / orig["perplexity"], rel=1e-5)
    summary = res["verdict"]["summary"]
    assert f"perplexity {res['perplexity']:.2f} vs {orig['perplexity']:.2f}" in summary and "within ×1.10" in summary

    # bits per layer: the LM head and the two tables at 8 bits, the other MatMuls at 4 (the SDK, the CLI's lines)
    with Client(stack.url, stack.key) as nc:
        report = nc.job(job["id"]).report()
    layers = report["steps"][0]["report"]["layers"]
    eight = sorted(e["op"] for e in layers if e["bits"] == 8)
    assert {e["bits"] for e in layers} == {4, 8} and eight == ["Gather", "Gather", "MatMul"], layers
    line = layer_bits_lines(report)[0]
    assert "8 at 4 bits" in line and "3 at 8 bits" in line and "block 32" in line, line
