"""Issue 5 (part 1) through HTTP on PostgreSQL + Redis + a worker: ``lowrank`` (alone and chained into int8
quantization) and ``depthwise_separable`` rewrite the graph, the artifacts load in ONNX Runtime with the
factored structure, the metrics show the saving, and bad specs are refused at submit."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from testkit.stack import upload, wait_job

EVAL = {"holdout": 0.3, "latency_runs": 10}


def _job(c, model_id: str, dataset_id: str | None, steps: list[dict]) -> dict:
    r = c.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "spec": {"steps": steps, "eval": EVAL}})
    assert r.status_code == 202, r.text
    return wait_job(c, r.json()["id"], timeout=300)


def _artifact(c, job: dict, name: str) -> onnx.ModelProto:
    r = c.get(f"/v1/jobs/{job['id']}/artifacts/{name}")
    assert r.status_code == 200, r.text
    model = onnx.load_from_string(r.content)
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, X: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": X})[0]


def test_lowrank_then_int8_is_factored_smaller_and_accurate(stack, cnn_onnx, mnist_npz, mnist_data):
    c = stack.client()
    model, ds = upload(c, cnn_onnx["legacy"]), upload(c, mnist_npz)
    job = _job(c, model["id"], ds["id"], [
        # min_rank 1: the 1-channel first conv at rank ⌈0.25 · 3⌉ = 1, the rewrite this test checks (the default
        # floor of 8 would leave it dense)
        {"method": "lowrank", "rank_ratio": 0.25, "exclude": ["/classifier/classifier.3/Gemm"], "min_rank": 1,
         "finetune": {"epochs": 3, "lr": 2e-3, "distill": True}},
        {"method": "quantize", "scheme": "int8", "mode": "dynamic"},
    ])
    assert job["status"] == "succeeded", job["error"]
    factored = _artifact(c, job, "step1-lowrank.onnx")
    inits = {t.name: list(t.dims) for t in factored.graph.initializer}
    ops = [n.op_type for n in factored.graph.node]
    assert ops.count("Conv") == 4 and ops.count("MatMul") == 1  # 2 convs -> 4 (kh×1, 1×kw); fc1 -> MatMul + Gemm
    fc1_in = next(n for n in factored.graph.node if n.name == "/classifier/classifier.1/Gemm.lowrank.in")
    assert inits[fc1_in.input[1]] == [1568, 32]  # rank ⌈0.25 · 128⌉
    conv2_v = next(n for n in factored.graph.node if n.name == "/features/features.4/Conv.lowrank.in")
    assert inits[conv2_v.input[1]] == [12, 16, 3, 1]  # rank ⌈0.25 · min(16·3, 32·3)⌉, vertical 3×1
    final = _artifact(c, job, "model.onnx")
    X, _ = mnist_data
    assert _run(final, X[:5]).shape == (5, 10)
    orig, step1, result = job["metrics"]["original"], job["metrics"]["steps"][0], job["metrics"]["result"]
    assert step1["ratios"]["params"] > 3 and step1["macs"] < orig["macs"]
    assert result["ratios"]["file_bytes"] > 8  # factored, then int8
    assert step1["accuracy"] >= orig["accuracy"] - 0.08, (orig["accuracy"], step1["accuracy"])
    assert result["accuracy"] >= orig["accuracy"] - 0.1
    report = c.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()["steps"][0]["report"]
    assert [la["layer"] for la in report["skipped"]] == ["/classifier/classifier.3/Gemm"]
    assert report["totals"]["layers_factored"] == 3 and report["totals"]["params_ratio"] > 3
    assert report["holdout_accuracy"]["finetuned"] > report["holdout_accuracy"]["factored"]


def test_depthwise_separable_replaces_the_conv_and_recovers(stack, cnn_onnx, mnist_npz, mnist_data):
    c = stack.client()
    model, ds = upload(c, cnn_onnx["dynamo"]), upload(c, mnist_npz)
    job = _job(c, model["id"], ds["id"], [{"method": "depthwise_separable", "finetune": {"epochs": 3, "lr": 2e-3}}])
    assert job["status"] == "succeeded", job["error"]
    out = _artifact(c, job, "model.onnx")
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    groups = [next((helper.get_attribute_value(a) for a in n.attribute if a.name == "group"), 1) for n in convs]
    assert groups == [1, 16, 1]  # stem kept (1 input channel), then depthwise (group = 16 channels) + pointwise
    X, _ = mnist_data
    assert _run(out, X[:3]).shape == (3, 10)
    orig, result = job["metrics"]["original"], job["metrics"]["result"]
    assert result["ratios"]["params"] > 1 and result["ratios"]["macs"] > 2.5
    assert result["accuracy"] >= orig["accuracy"] - 0.06, (orig["accuracy"], result["accuracy"])
    report = c.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()["steps"][0]["report"]
    assert report["totals"]["conv_macs_ratio"] > 4
    assert report["holdout_accuracy"]["recovered"] > report["holdout_accuracy"]["init"]


def test_bad_rewrite_specs_are_refused_at_submit(stack, cnn_onnx):
    c = stack.client()
    model = upload(c, cnn_onnx["legacy"])
    for step, path in (({"method": "lowrank", "rank_ratio": 0.5, "energy": 0.9}, "$.spec.steps[0]"),
                       ({"method": "lowrank", "layers": {"x": {"rank": 0}}}, "$.spec.steps[0].layers.x.rank"),
                       ({"method": "depthwise_separable", "min_channels": 0}, "$.spec.steps[0].min_channels")):
        r = c.post("/v1/jobs", json={"model_id": model["id"], "spec": {"steps": [step]}})
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["path"] == path
    # recovery by distillation is on by default: it needs a dataset
    r = c.post("/v1/jobs", json={"model_id": model["id"], "spec": {"steps": [{"method": "depthwise_separable"}]}})
    assert r.status_code == 422 and "needs a dataset" in r.text
