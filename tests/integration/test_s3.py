"""The S3 artifact store against an S3-compatible server on loopback (moto's standalone server), and queue
routing by device: a stack whose API writes uploads and whose worker writes artifacts to the bucket."""
from __future__ import annotations

import hashlib
import uuid

import psycopg
import pytest

from testkit.stack import PG_HOST, PG_PORT, free_port, start_stack, tiny_classifier, upload, wait_job

BUCKET = "nc-artifacts"
PREFIX = "team-data/v1"
FAST_EVAL = {"holdout": 0.3, "latency_runs": 5}


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="module")
def s3(s3_server, monkeypatch_module):
    import boto3

    for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                 ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch_module.setenv(k, v)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def s3_stack(s3, s3_server, redis_url, tmp_path_factory):
    """API + one worker on their own database, artifacts in the bucket, jobs routed by device.

    This machine has no GPU, so the worker listens to the CPU queue only (its default with routing on).
    """
    name = f"nc_s3_{uuid.uuid4().hex[:8]}"
    admin = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    q = f"nc-s3-{uuid.uuid4().hex[:8]}"
    stack = start_stack(tmp_path_factory.mktemp("s3stack"), database_url=f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{name}",
                        broker_url=redis_url, NETCOMPRESS_ARTIFACT_URL=f"s3://{BUCKET}/{PREFIX}",
                        NETCOMPRESS_S3_ENDPOINT_URL=s3_server, NETCOMPRESS_S3_REGION="us-east-1",
                        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                        NETCOMPRESS_ROUTE_BY_DEVICE="true", NETCOMPRESS_GPU_QUEUE=f"{q}-gpu",
                        NETCOMPRESS_CPU_QUEUE=f"{q}-cpu")
    yield stack
    stack.stop()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def keys(s3, prefix: str) -> dict[str, int]:
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


def test_job_artifacts_land_in_the_bucket_and_download_through_the_api(s3_stack, s3, tmp_path):
    onnx_path, npz_path = tiny_classifier(tmp_path)
    c = s3_stack.client()
    model, ds = upload(c, onnx_path), upload(c, npz_path)
    assert keys(s3, f"{PREFIX}/models/{model['id']}/") == {f"{PREFIX}/models/{model['id']}/model.onnx": onnx_path.stat().st_size}
    assert list(keys(s3, f"{PREFIX}/datasets/{ds['id']}/")) == [f"{PREFIX}/datasets/{ds['id']}/data.npz"]
    # the model file streams back from the bucket
    assert c.get(f"/v1/models/{model['id']}/file").content == onnx_path.read_bytes()

    spec = {"steps": [{"method": "prune", "granularity": "weight", "sparsity": 0.5},
                      {"method": "quantize", "scheme": "int8", "mode": "static"}], "eval": FAST_EVAL}
    r = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": ds["id"], "spec": spec})
    job = wait_job(c, r.json()["id"], timeout=120)
    assert job["status"] == "succeeded", job["error"]
    stored = keys(s3, f"{PREFIX}/jobs/{job['id']}/")
    assert len(stored) == len(job["artifacts"]) >= 3
    by_name = {k.rsplit("/", 1)[1]: size for k, size in stored.items()}
    for art in job["artifacts"]:
        assert by_name[art["name"]] == art["size_bytes"]
        blob = c.get(f"/v1/jobs/{job['id']}/artifacts/{art['name']}").content
        assert hashlib.sha256(blob).hexdigest() == art["sha256"]
    assert not (s3_stack.home / "artifacts").exists()  # nothing went to the local folder
    # deleting the model removes its objects and its jobs' artifacts from the bucket
    assert c.delete(f"/v1/models/{model['id']}").status_code == 204
    assert keys(s3, f"{PREFIX}/models/{model['id']}") == {} and keys(s3, f"{PREFIX}/jobs/{job['id']}") == {}


def test_training_jobs_are_routed_to_the_gpu_queue(s3_stack, redis_url, tmp_path):
    import redis

    onnx_path, npz_path = tiny_classifier(tmp_path)
    c = s3_stack.client()
    model, ds = upload(c, onnx_path), upload(c, npz_path)
    spec = {"steps": [{"method": "prune", "sparsity": 0.5, "finetune": {"epochs": 1}}], "eval": FAST_EVAL}
    job = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": ds["id"], "spec": spec}).json()
    gpu_q, cpu_q = s3_stack.env["NETCOMPRESS_GPU_QUEUE"], s3_stack.env["NETCOMPRESS_CPU_QUEUE"]
    r = redis.Redis.from_url(redis_url)
    assert r.llen(gpu_q) == 1 and r.llen(cpu_q) == 0  # no GPU worker here: it waits in the GPU queue
    assert c.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
    assert c.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    r.delete(gpu_q)


def test_store_streams_multipart_and_cleans_up(s3, tmp_path):
    from store.objects import UploadTooLarge
    from store.s3 import S3ArtifactStore

    store = S3ArtifactStore(BUCKET, "unit", s3, part_bytes=5 * 1024 * 1024)
    chunk = bytes(range(256)) * 4096  # 1 MiB
    n_chunks = 12  # 12 MiB: three parts, the last one short
    produced = []

    def chunks():
        for i in range(n_chunks):
            produced.append(i)
            yield chunk

    size, sha = store.put_stream("a/big.bin", chunks())
    assert size == n_chunks * len(chunk) and sha == hashlib.sha256(chunk * n_chunks).hexdigest()
    head = s3.head_object(Bucket=BUCKET, Key="unit/a/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload of three parts
    h = hashlib.sha256()
    pieces = 0
    for piece in store.iter_bytes("a/big.bin"):
        h.update(piece)
        pieces += 1
    assert h.hexdigest() == sha and pieces >= n_chunks  # streamed back in chunks, not one blob
    local = store.local_file("a/big.bin", tmp_path / "dl" / "big.bin")  # what the worker reads inputs through
    assert local == tmp_path / "dl" / "big.bin" and local.stat().st_size == size
    assert [p.name for p in local.parent.iterdir()] == ["big.bin"]  # no temp file left

    def failing():
        yield chunk * 6
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        store.put_stream("a/partial.bin", failing())
    assert not store.exists("a/partial.bin")
    assert s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []  # aborted, nothing left over
    with pytest.raises(UploadTooLarge):
        store.put_stream("a/too-big.bin", iter([chunk] * 3), max_bytes=2 * len(chunk))
    assert not store.exists("a/too-big.bin")

    (tmp_path / "m.onnx").write_bytes(b"x")
    assert store.put_file("models/abc/model.onnx", tmp_path / "m.onnx") == (1, hashlib.sha256(b"x").hexdigest())
    store.put_stream("models/abcd/model.onnx", iter([b"y"]))
    store.delete_prefix("models/abc")
    assert not store.exists("models/abc/model.onnx") and store.exists("models/abcd/model.onnx")
    with pytest.raises(ValueError):
        store.put_stream("../escape", iter([b"z"]))
