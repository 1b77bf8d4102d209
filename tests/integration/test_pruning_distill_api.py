"""Issue 3 through HTTP on PostgreSQL + Redis + a worker: channel pruning, distillation with teachers
and students named by id, lottery tickets, and the submit-time checks on those ids."""
from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from testkit.zoo import LeNet300100, export_onnx
from testkit.stack import upload, wait_job

EVAL = {"holdout": 0.3, "latency_runs": 10}


def _job(c, model_id: str, dataset_id: str | None, steps: list[dict], **eval_opts) -> dict:
    spec = {"steps": steps, "eval": {**EVAL, **eval_opts}}
    r = c.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "spec": spec})
    assert r.status_code == 202, r.text
    return wait_job(c, r.json()["id"], timeout=300)


def _conv_filters(blob: bytes) -> list[int]:
    m = onnx.load_from_string(blob)
    inits = {t.name: list(t.dims) for t in m.graph.initializer}
    return [inits[n.input[1]][0] for n in m.graph.node if n.op_type == "Conv"]


def test_channel_prune_then_distill_is_smaller_faster_and_accurate(stack, cnn_onnx, mnist_npz):
    c = stack.client()
    model, ds = upload(c, cnn_onnx["dynamo"]), upload(c, mnist_npz)
    job = _job(c, model["id"], ds["id"], [
        {"method": "prune", "granularity": "channel", "sparsity": 0.5, "scope": "layer",
         "finetune": {"epochs": 2, "lr": 2e-3, "distill": True}},
        {"method": "distill", "epochs": 2, "lr": 1e-3, "temperature": 4},
    ])
    assert job["status"] == "succeeded", job["error"]
    blob = c.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").content
    assert _conv_filters(blob) == [8, 16]
    orig, pruned, result = job["metrics"]["original"], job["metrics"]["steps"][0], job["metrics"]["result"]
    assert result["macs"] * 3 < orig["macs"] and result["params"] * 3 < orig["params"]
    assert result["accuracy"] >= orig["accuracy"] - 0.04, (orig["accuracy"], result["accuracy"])
    assert result["agreement"] > 0.9
    report = c.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    prune_r, distill_r = report["steps"][0]["report"], report["steps"][1]["report"]
    assert prune_r["granularity"] == "channel" and prune_r["ignored"][0]["reason"].startswith("feeds a graph output")
    assert distill_r["student"] == "pipeline model" and distill_r["teachers"][0]["teacher"] == "original"
    assert pruned["params"] == result["params"]  # distillation trains the pruned graph, it does not regrow it
    # issue 14: the exporter folded BatchNorm into the convs; both steps trained with it re-inserted, and folded
    # it back (the graphs have no BatchNormalization node)
    note = "re-inserted BatchNorm after 2 convs for fine-tuning, folded back"
    assert note in prune_r["notes"] and note in distill_r["notes"]
    assert "BatchNormalization" not in {n.op_type for n in onnx.load_from_string(blob).graph.node}


def _tiny_cnn(path) -> object:
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 13 * 13, 10)).eval()
    return export_onnx(net, torch.zeros(2, 1, 28, 28), path, dynamo=False)


def test_distill_teacher_ensemble_into_an_uploaded_student(stack, cnn_onnx, mnist_npz, tmp_path):
    c = stack.client()
    teacher = upload(c, cnn_onnx["dynamo"])
    second = upload(c, cnn_onnx["legacy"])
    student = upload(c, _tiny_cnn(tmp_path / "student.onnx"))
    ds = upload(c, mnist_npz)
    job = _job(c, teacher["id"], ds["id"], [{"method": "distill", "teachers": ["original", second["id"]],
                                             "student_model_id": student["id"], "epochs": 3, "lr": 3e-3}],
               gate=False)  # a 4-filter student measured for what it learns (≈0.75 vs 0.95): past the gate
    assert job["status"] == "succeeded", job["error"]
    result = job["metrics"]["result"]
    assert result["params"] == student["params"] and result["accuracy"] > 0.6
    report = c.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()["steps"][0]["report"]
    assert report["ensemble"] and [t["teacher"] for t in report["teachers"]] == ["original", second["id"]]
    assert report["student_holdout_accuracy_after"] > report["student_holdout_accuracy_before"] + 0.3


def test_model_ids_in_a_spec_are_checked_at_submit(stack, cnn_onnx, mnist_npz):
    a, b = stack.client(), stack.client(stack.new_key("team-pd-other"))
    mine, ds = upload(a, cnn_onnx["legacy"]), upload(a, mnist_npz)
    theirs = upload(b, cnn_onnx["legacy"])
    for steps, path in (
        ([{"method": "distill", "teachers": ["original", theirs["id"]]}], "$.spec.steps[0].teachers[1]"),
        ([{"method": "distill", "student_model_id": "no-such-model"}], "$.spec.steps[0].student_model_id"),
        ([{"method": "prune", "rewind": "init", "rewind_model_id": theirs["id"], "finetune": {"epochs": 1}}],
         "$.spec.steps[0].rewind_model_id"),
        ([{"method": "prune", "rewind": "sign", "rewind_model_id": theirs["id"], "finetune": {"epochs": 1}}],
         "$.spec.steps[0].rewind_model_id"),  # sign rewind reads the init model's signs: same ownership check
    ):
        r = a.post("/v1/jobs", json={"model_id": mine["id"], "dataset_id": ds["id"], "spec": {"steps": steps}})
        assert r.status_code == 404, r.text
        assert r.json()["code"] == "not_found" and r.json()["errors"][0]["path"] == path
    r = a.post("/v1/jobs", json={"model_id": mine["id"], "dataset_id": ds["id"], "spec": {"steps": [
        {"method": "prune", "granularity": "channel", "rewind": "init", "finetune": {"epochs": 1}}]}})
    assert r.status_code == 422 and r.json()["errors"][0]["path"].startswith("$.spec.steps[0]")
    r = a.post("/v1/jobs", json={"model_id": mine["id"], "spec": {"steps": [{"method": "distill"}]}})
    assert r.status_code == 422 and "needs a dataset" in r.text


def test_lottery_ticket_rewinds_to_an_uploaded_init(stack, mnist_data, tmp_path):
    X, y = mnist_data
    Xf = X.reshape(len(X), -1)
    torch.manual_seed(0)
    net = LeNet300100()
    init_path = export_onnx(net, torch.zeros(2, 784), tmp_path / "init.onnx", dynamo=False)
    from testkit.refdata import fit

    fit(net, Xf[:2000], y[:2000], epochs=2)
    trained_path = export_onnx(net, torch.zeros(2, 784), tmp_path / "trained.onnx", dynamo=False)
    npz = tmp_path / "flat.npz"
    np.savez(npz, input=Xf[:2000], labels=y[:2000])
    c = stack.client()
    init, trained, ds = upload(c, init_path), upload(c, trained_path), upload(c, npz)
    job = _job(c, trained["id"], ds["id"], [{"method": "prune", "sparsity": 0.8, "iterations": 2, "rewind": "init",
                                             "rewind_model_id": init["id"], "finetune": {"epochs": 2, "lr": 2e-3}}])
    assert job["status"] == "succeeded", job["error"]
    rounds = c.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()["steps"][0]["report"]["rounds"]
    assert [r["kept"] for r in rounds] == [1.0, 0.4472, 0.2] and all(r["accuracy"] > 0.8 for r in rounds)
    m = job["metrics"]["result"]
    assert m["nonzero_params"] < 0.25 * m["params"] and m["accuracy"] > 0.8
