"""Bad input through HTTP: each gets its 4xx problem+json and leaves nothing behind."""
from __future__ import annotations

import io
import os
import pickle
import zipfile

import httpx
import numpy as np
import pytest

from testkit.stack import expect_problem, jobs_count, send_upload, upload


def test_random_bytes_model_refused(stack, unchanged):
    expect_problem(send_upload(stack.client(), "m.onnx", os.urandom(5000)), 422, "invalid_model")


def test_truncated_onnx_refused(stack, cnn_onnx, unchanged):
    data = cnn_onnx["dynamo"].read_bytes()
    expect_problem(send_upload(stack.client(), "m.onnx", data[: len(data) // 2]), 422, "invalid_model")


def test_pickled_checkpoint_refused_unread(stack, unchanged):
    class Boom:
        def __reduce__(self):  # would run on unpickling
            return (os.system, ("touch /tmp/netcompress-pwned",))

    body = expect_problem(send_upload(stack.client(), "m.pt", pickle.dumps(Boom())), 415, "unsupported_format")
    assert "pickle" in body["detail"]
    assert not os.path.exists("/tmp/netcompress-pwned")


def test_zip_slip_refused(stack, cnn_onnx, unchanged):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("model.onnx", cnn_onnx["legacy"].read_bytes())
        zf.writestr("../../evil.txt", b"x")
    expect_problem(send_upload(stack.client(), "m.zip", buf.getvalue()), 422, "invalid_model")


def test_npz_with_objects_refused(stack, unchanged):
    buf = io.BytesIO()
    np.savez(buf, input=np.array([{"a": 1}, None], dtype=object))
    body = expect_problem(send_upload(stack.client(), "d.npz", buf.getvalue()), 422, "invalid_dataset")
    assert "object" in body["detail"]


def test_upload_over_cap_is_413_and_deleted(stack, unchanged):
    cap = 20 * 1024 * 1024
    boundary = "xxBOUNDARYxx"

    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.onnx\"\r\n"
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        chunk = b"\0" * (1024 * 1024)
        for _ in range(cap // len(chunk) + 3):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    r = stack.client().post("/v1/models", content=body(),
                            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    expect_problem(r, 413, "too_large")


def test_missing_and_wrong_key(stack):
    r = httpx.get(stack.url + "/v1/jobs")
    expect_problem(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    expect_problem(stack.client("nc_000000000000_nope").get("/v1/jobs"), 401, "unauthorized")
    expect_problem(stack.client("garbage").get("/v1/models"), 401, "unauthorized")


@pytest.fixture(scope="module")
def model_and_data(stack, cnn_onnx, mnist_npz):
    c = stack.client()
    model, ds = upload(c, cnn_onnx["legacy"]), upload(c, mnist_npz)
    buf = io.BytesIO()
    np.savez(buf, wrong_name=np.zeros((10, 1, 28, 28), np.float32))
    bad_ds = upload(c, "bad.npz", buf.getvalue())
    return model, ds, bad_ds


@pytest.mark.parametrize("spec, path", [
    ({"steps": [{"method": "shrink"}]}, "$.spec.steps[0].method"),
    ({"steps": [{"method": "prune", "sparsity": 1.5}]}, "$.spec.steps[0].sparsity"),
    ({"steps": [{"method": "prune", "sparsity": -0.1}]}, "$.spec.steps[0].sparsity"),
    ({"steps": [{"method": "prune", "finetune": {"epochs": 1e9}}]}, "$.spec.steps[0].finetune.epochs"),
    ({"steps": []}, "$.spec.steps"),
    ({"steps": [{"method": "quantize", "mode": "static", "bogus": 1}]}, "$.spec.steps[0].bogus"),
])
def test_bad_specs(stack, model_and_data, spec, path):
    model, ds, _ = model_and_data
    before = jobs_count(stack)
    r = stack.client().post("/v1/jobs", json={"model_id": model["id"], "dataset_id": ds["id"], "spec": spec})
    body = expect_problem(r, 422, "invalid_spec")
    assert path in [e["path"] for e in body["errors"]], body
    assert jobs_count(stack) == before


def test_static_quant_without_dataset(stack, model_and_data):
    model, _, _ = model_and_data
    r = stack.client().post("/v1/jobs", json={"model_id": model["id"],
                                              "spec": {"steps": [{"method": "quantize", "mode": "static"}]}})
    body = expect_problem(r, 422, "invalid_spec")
    assert body["errors"][0]["path"] == "$.spec.steps[0]"


def test_dataset_not_matching_model(stack, model_and_data):
    model, _, bad_ds = model_and_data
    before = jobs_count(stack)
    r = stack.client().post("/v1/jobs", json={"model_id": model["id"], "dataset_id": bad_ds["id"],
                                              "spec": {"steps": [{"method": "prune"}]}})
    body = expect_problem(r, 422, "dataset_mismatch")
    assert "input" in body["detail"] and body["errors"][0]["path"] == "$.dataset_id"
    assert jobs_count(stack) == before


def test_other_team_gets_404_everywhere(stack, model_and_data):
    model, ds, _ = model_and_data
    c = stack.client()
    job = c.post("/v1/jobs", json={"model_id": model["id"], "spec": {"steps": [{"method": "prune", "sparsity": 0.3}]}},
                 headers={"Idempotency-Key": "k-404"}).json()
    other = stack.client(stack.new_key("team-b"))
    for method, url in [("GET", f"/v1/jobs/{job['id']}"), ("POST", f"/v1/jobs/{job['id']}/cancel"),
                        ("GET", f"/v1/jobs/{job['id']}/artifacts/model.onnx"), ("GET", f"/v1/models/{model['id']}"),
                        ("GET", f"/v1/models/{model['id']}/file"), ("DELETE", f"/v1/models/{model['id']}"),
                        ("GET", f"/v1/datasets/{ds['id']}"), ("DELETE", f"/v1/datasets/{ds['id']}")]:
        expect_problem(other.request(method, url), 404, "not_found")
    r = other.post("/v1/jobs", json={"model_id": model["id"], "spec": {"steps": [{"method": "prune"}]}})
    expect_problem(r, 404, "not_found")
    assert other.get("/v1/jobs").json()["items"] == []
    assert c.get(f"/v1/models/{model['id']}").status_code == 200


def test_idempotency_key_returns_same_job(stack, model_and_data):
    model, _, _ = model_and_data
    c = stack.client()
    body = {"model_id": model["id"], "spec": {"steps": [{"method": "prune", "sparsity": 0.2}]}}
    a = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "same-key"})
    b = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "same-key"})
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] == b.json()["id"]


def test_pagination_walks_all_jobs(stack, model_and_data):
    model, _, _ = model_and_data
    c = stack.client()
    for i in range(5):
        assert c.post("/v1/jobs", json={"model_id": model["id"], "name": f"p{i}",
                                        "spec": {"steps": [{"method": "prune", "sparsity": 0.1}]}}).status_code == 202
    seen, cursor = [], None
    while True:
        page = c.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        assert len(page["items"]) <= 2
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)) == len(c.get("/v1/jobs?limit=100").json()["items"])
    expect_problem(c.get("/v1/jobs", params={"cursor": "!!"}), 422, "validation_error")


def test_npz_bomb_refused_from_headers(stack, unchanged):
    """A small file that declares a huge array: refused from the header, nothing inflated."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                      "shape": (1 << 20, 1 << 14)})
        zf.writestr("input.npy", np.lib.format.MAGIC_PREFIX + b"\x01\x00" + header.getvalue()[8:] + b"\0" * 1024)
    assert len(buf.getvalue()) < 10_000
    body = expect_problem(send_upload(stack.client(), "bomb.npz", buf.getvalue()), 422, "invalid_dataset")
    assert "uncompressed size" in body["detail"]


def _pb_field(num: int, payload: bytes) -> bytes:
    """Protobuf wire format, length-delimited field (to build nesting the onnx helpers refuse to build)."""
    def varint(n: int) -> bytes:
        out = b""
        while True:
            b, n = n & 0x7F, n >> 7
            out += bytes([b | (0x80 if n else 0)])
            if not n:
                return out
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def test_deeply_nested_subgraphs_refused(stack, unchanged):
    from onnx import TensorProto, helper

    leaf = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "leaf", [],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]).SerializeToString()
    graph = leaf
    for i in range(3000):  # If inside If inside If ...: a recursion bomb for naive parsers and walkers
        attr = _pb_field(1, b"then_branch") + _pb_field(6, graph) + bytes([20 << 3 & 0x7F | 0x80, 1, 5])
        node = _pb_field(1, b"c") + _pb_field(2, b"y") + _pb_field(4, b"If") + _pb_field(5, attr)
        graph = _pb_field(1, node) + _pb_field(2, f"g{i}".encode())
    model = bytes([1 << 3, 8]) + _pb_field(7, graph) + _pb_field(8, _pb_field(1, b"") + bytes([2 << 3, 17]))
    body = expect_problem(send_upload(stack.client(), "deep.onnx", model), 422, "invalid_model")
    assert body["detail"]
    assert stack.client().get("/healthz").status_code == 200


def test_fifty_megabyte_json_body_is_413(stack):
    before = jobs_count(stack)
    blob = b'{"model_id": "x", "spec": {"steps": [], "pad": "' + b"a" * (50 * 1024 * 1024) + b'"}}'
    r = stack.client().post("/v1/jobs", content=blob, headers={"Content-Type": "application/json"})
    expect_problem(r, 413, "too_large")

    def chunks():  # no Content-Length: counted as it streams
        for i in range(0, len(blob), 1 << 20):
            yield blob[i:i + (1 << 20)]

    r = stack.client().post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    expect_problem(r, 413, "too_large")
    assert jobs_count(stack) == before and stack.client().get("/healthz").status_code == 200


def test_revoked_key_is_401(stack):
    import subprocess

    from testkit.stack import NC

    key = stack.new_key("team-revoke")
    assert stack.client(key).get("/v1/jobs").status_code == 200
    subprocess.run(NC + ["keys", "revoke", key], env=stack.env, check=True, capture_output=True)
    expect_problem(stack.client(key).get("/v1/jobs"), 401, "unauthorized")


def test_keys_are_stored_hashed_only(stack, pg_url):
    from sqlalchemy import create_engine, text

    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT prefix, key_hash FROM api_keys")).all()
    engine.dispose()
    assert rows and all(stack.key not in (p, h) and len(h) == 64 for p, h in rows)
    assert any(stack.key.startswith(f"nc_{p}_") for p, _ in rows)


def test_zip_with_symlink_refused(stack, cnn_onnx, unchanged):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("model.onnx", cnn_onnx["legacy"].read_bytes())
        link = zipfile.ZipInfo("weights.data")
        link.external_attr = (0o120777 << 16)  # a symlink entry
        zf.writestr(link, "/etc/passwd")
    body = expect_problem(send_upload(stack.client(), "m.zip", buf.getvalue()), 422, "invalid_model")
    assert "link" in body["detail"]
