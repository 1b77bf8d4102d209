"""API policy through HTTP: model ids in searched values, idempotency keys bound to their body, no server
paths in messages, /metrics behind its token, relative redirects, security headers, the bearer scheme."""
from __future__ import annotations

import json
import re
import zipfile

import httpx
import numpy as np
import pytest

from testkit.stack import METRICS_TOKEN, expect_problem, jobs_count, send_upload, tiny_classifier, upload

FAST_EVAL = {"latency_runs": 5}


@pytest.fixture(scope="module")
def ids(stack, tmp_path_factory) -> dict[str, str]:
    """A model and a labelled dataset of team A, and a model of another team (with that team's key)."""
    onnx_path, npz_path = tiny_classifier(tmp_path_factory.mktemp("policy"))
    other_key = stack.new_key("team-policy-other")
    a, b = stack.client(), stack.client(other_key)
    return {"model": upload(a, onnx_path)["id"], "data": upload(a, npz_path)["id"],
            "theirs": upload(b, onnx_path)["id"], "other_key": other_key}


def _searches(ids: dict[str, str]) -> list[tuple[dict, str]]:
    """Specs whose only foreign model id sits in a searched value (next to one of the team's own), and its path."""
    own, theirs = ids["model"], ids["theirs"]
    prune = {"method": "prune", "rewind": "init", "rewind_model_id": own, "finetune": {"epochs": 1}}
    return [
        ({"steps": [{"method": "distill"}], "search": {"distill.teachers": [["original", own], ["original", theirs]]}},
         '$.spec.search["distill.teachers"][1][1]'),
        ({"steps": [{"method": "distill"}], "search": {"distill.student_model_id": [own, theirs]}},
         '$.spec.search["distill.student_model_id"][1]'),
        ({"steps": [prune], "search": {"steps[0].rewind_model_id": [theirs, own]}},
         '$.spec.search["steps[0].rewind_model_id"][0]'),
    ]


@pytest.mark.parametrize("case", range(3), ids=["teachers", "student", "rewind"])
@pytest.mark.parametrize("route", ["/v1/jobs", "/v1/jobs/preflight"])
def test_model_ids_in_search_values_are_checked(stack, ids, case, route):
    spec, path = _searches(ids)[case]
    before = jobs_count(stack)
    r = stack.client().post(route, json={"model_id": ids["model"], "dataset_id": ids["data"], "spec": spec})
    body = expect_problem(r, 404, "not_found")
    assert [e["path"] for e in body["errors"]] == [path], body  # the foreign id only, not the team's own
    assert ids["theirs"] in body["errors"][0]["message"]
    assert jobs_count(stack) == before


def test_idempotency_key_reused_with_another_body(stack, ids):
    c = stack.client()
    body = {"model_id": ids["model"], "name": "idem", "spec": {"steps": [{"method": "quantize", "scheme": "fp16"}],
                                                               "eval": FAST_EVAL}}
    first = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "policy-key"})
    assert first.status_code == 202, first.text
    # the same body with its keys in another order and other spacing is the same request
    reordered = json.dumps(dict(reversed(list(body.items()))), indent=2)
    again = c.post("/v1/jobs", content=reordered,
                   headers={"Idempotency-Key": "policy-key", "Content-Type": "application/json"})
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    before = jobs_count(stack)
    other = {**body, "spec": {"steps": [{"method": "quantize", "scheme": "int8", "mode": "dynamic"}]}}
    r = c.post("/v1/jobs", json=other, headers={"Idempotency-Key": "policy-key"})
    assert "different request body" in expect_problem(r, 422, "idempotency_key_reused")["detail"]
    assert jobs_count(stack) == before
    assert c.get(f"/v1/jobs/{first.json()['id']}").json()["spec"]["steps"][0]["scheme"] == "fp16"
    # keys are the team's own: another team's first use of the same key makes its own job
    theirs = stack.client(ids["other_key"]).post("/v1/jobs", json={**other, "model_id": ids["theirs"]},
                                                 headers={"Idempotency-Key": "policy-key"})
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]


def _model_ort_refuses(folder) -> bytes:
    """A zip whose external weights (16 MiB + 64 B) make the API validate it from its unpacked path, and
    whose custom op ONNX Runtime refuses with a message naming that path. The weights are random: zeros
    would inflate past the zip-ratio cap and be refused before ONNX Runtime sees them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = (1 << 22) + 16
    nodes = [helper.make_node("Add", ["x", "w"], ["y"]), helper.make_node("Frobnicate", ["y"], ["z"], domain="com.example")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [n])],
                              [numpy_helper.from_array(np.random.default_rng(0).standard_normal(n, np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
                              ir_version=9)
    onnx.save(model, folder / "model.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0)
    with zipfile.ZipFile(folder / "m.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in ("model.onnx", "weights.bin"):
            zf.write(folder / name, name)
    return (folder / "m.zip").read_bytes()


def test_load_errors_name_no_server_path(stack, unchanged, tmp_path):
    r = send_upload(stack.client(), "m.zip", _model_ort_refuses(tmp_path))
    detail = expect_problem(r, 422, "invalid_model")["detail"]
    assert "Frobnicate" in detail and "model.onnx" in detail, detail  # ONNX Runtime's own message, kept useful
    assert str(stack.home) not in detail and "/tmp/" not in detail and "unzipped" not in detail, detail
    assert not re.search(r"(^|[\s'\"(])/\w", detail), detail


def test_metrics_need_their_token(stack):
    url = stack.url + "/metrics"
    expect_problem(httpx.get(url), 401, "unauthorized")
    expect_problem(httpx.get(url, headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    expect_problem(stack.client().get("/metrics"), 401, "unauthorized")  # a team's API key is not the metrics token
    r = httpx.get(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert r.status_code == 200 and "netcompress_jobs" in r.text


@pytest.mark.parametrize("public, status", [(False, 404), (True, 200)])
def test_metrics_without_a_token_are_off_unless_public(pg_url, redis_url, tmp_path, public, status):
    """The API in-process on the stack's database, with no token configured."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from store.settings import Settings

    app = create_app(Settings(database_url=pg_url, broker_url=redis_url, home=tmp_path, metrics_public=public))
    with TestClient(app) as client:
        r = client.get("/metrics")
    assert r.status_code == status, r.text
    if not public:
        expect_problem(r, 404, "not_found")


@pytest.mark.parametrize("path, location", [("/v1/jobs/", "/v1/jobs"), ("/v1/jobs/?limit=2", "/v1/jobs?limit=2")])
def test_redirects_ignore_a_forged_host(stack, path, location):
    r = stack.client().get(path, headers={"Host": "evil.example"}, follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == location, r.headers
    assert stack.client().get(r.headers["location"]).status_code == 200


def test_security_headers_on_every_response(stack):
    c = stack.client()
    responses = {"health": c.get("/healthz"), "json": c.get("/v1/jobs"), "problem": c.get("/v1/jobs/nope"),
                 "unauthorized": httpx.get(stack.url + "/v1/jobs"),
                 "too large": c.post("/v1/jobs", content=b"x" * (2 << 20), headers={"Content-Type": "application/json"}),
                 "redirect": c.get("/", follow_redirects=False),
                 "page": c.get("/dashboard"), "script": c.get("/static/dashboard.js")}
    assert [r.status_code for r in responses.values()] == [200, 200, 404, 401, 413, 307, 200, 200]
    for what, r in responses.items():
        assert r.headers.get("x-content-type-options") == "nosniff", what
        assert r.headers.get("x-frame-options") == "DENY", what
        assert r.headers.get("referrer-policy") == "no-referrer", what
    csp = responses["page"].headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe" not in csp, csp
    assert responses["script"].headers["content-security-policy"] == csp
    # the CSP allows no inline code: the page must have none (the browser test runs it for real)
    html = responses["page"].text
    assert not re.search(r"<script(?![^>]*\ssrc=)|<style|\sstyle=|\son\w+=", html)


def test_openapi_declares_the_bearer_scheme(stack):
    schema = httpx.get(stack.url + "/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"]["type"] == "http"
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    ops = {(p, m): op for p, item in schema["paths"].items() for m, op in item.items()}
    v1 = [k for k in ops if k[0].startswith("/v1/")]
    assert len(v1) >= 12 and all(ops[k].get("security") == [{"bearer": []}] for k in v1)
    assert all("security" not in ops[(p, "get")] for p in ("/healthz", "/readyz"))
