"""``netcompress demo`` (issue 16) against a live embedded service, run as a user runs it: a subprocess in a folder
outside the repository, with only the URL and key in its environment."""
from __future__ import annotations

import subprocess

import numpy as np
import onnx
import onnxruntime as ort

from testkit.stack import NC


def test_demo_shows_a_smaller_faster_model_within_a_point(embedded, tmp_path):
    env = {**embedded.env, "NETCOMPRESS_URL": embedded.url, "NETCOMPRESS_API_KEY": embedded.key}
    env.pop("PYTHONPATH", None)
    r = subprocess.run(NC + ["demo"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verdict" in r.stdout and "smaller" in r.stdout

    job = embedded.client().get("/v1/jobs", params={"limit": 1}).json()["items"][0]
    assert job["status"] == "succeeded" and job["name"].startswith("demo")
    m = job["metrics"]
    ratios = m["result"]["ratios"]
    assert ratios["file_bytes"] >= 2.0 and ratios["latency_p50_speedup"] >= 2.0, ratios  # faster at batch 1
    assert ratios["accuracy_delta"] >= -0.01, ratios
    assert m["result"]["verdict"]["smaller"] and m["result"]["verdict"]["faster_batch1"]

    demo = tmp_path / "demo"
    assert (demo / "recipe.yaml").is_file() and (demo / "report.json").is_file()
    data = np.load(demo / "digits.npz")
    original = ort.InferenceSession(str(demo / "digits_cnn.onnx"), providers=["CPUExecutionProvider"])
    result = ort.InferenceSession(str(demo / "model.onnx"), providers=["CPUExecutionProvider"])
    x, y = data["image"], data["labels"]
    assert [i.name for i in result.get_inputs()] == ["image"]
    ops = {n.op_type for n in onnx.load(demo / "model.onnx").graph.node}
    assert ops & {"QLinearConv", "ConvInteger", "QuantizeLinear"}, ops
    # The downloaded artifact computes what the service measured: both models agree on nearly every digit.
    a = original.run(None, {"image": x})[0].argmax(1)
    b = result.run(None, {"image": x})[0].argmax(1)
    assert (a == b).mean() >= 0.97 and (b == y).mean() >= 0.95
