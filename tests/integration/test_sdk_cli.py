"""The Python SDK and the ``netcompress`` client commands against a live API + worker (PostgreSQL, Redis).

The CLI runs as a subprocess, as a user would run it; the SDK runs in-process. Only the retry test puts
a transport in front of the real server, to make it answer 503 twice.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time

import httpx
import numpy as np
import pytest

from client import Client, NotFound, Unauthorized, ValidationFailed
from client.errors import Conflict
from testkit.images import conv_model, photo_crops
from testkit.stack import NC, Pause, tiny_classifier

FAST_EVAL = {"holdout": 0.3, "latency_runs": 5}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_classifier(tmp_path_factory.mktemp("tiny"))


def cli(stack, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**stack.env, "NETCOMPRESS_URL": stack.url, "NETCOMPRESS_API_KEY": stack.key}
    out = subprocess.run(NC + list(args), env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, f"exit {out.returncode}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    return out


def _cli_following(stack, args: list[str], until, pause: Pause, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the CLI; once a line of its stderr satisfies ``until`` (or it exits), release the held job."""
    env = {**stack.env, "NETCOMPRESS_URL": stack.url, "NETCOMPRESS_API_KEY": stack.key}
    proc = subprocess.Popen(NC + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def drain() -> None:
        for line in proc.stderr:
            lines.append(line)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    deadline = time.time() + timeout
    while not any(until(line) for line in list(lines)) and proc.poll() is None:
        assert time.time() < deadline, lines
        time.sleep(0.1)
    pause.release()
    stdout = proc.stdout.read()
    proc.wait(timeout=timeout)
    reader.join(timeout=60)
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "".join(lines))
    assert out.returncode == 0, f"exit {out.returncode}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    return out


def test_cli_submit_shorthand_wait_out(stack, tiny, tmp_path):
    """submit with --prune/--quantize: progress lines, a metrics table, artifacts downloaded and intact."""
    onnx_path, npz_path = tiny
    out_dir = tmp_path / "out"
    # the worker holds the job as its second step begins, until the CLI has printed a running line
    with stack.paused("phase:quantizing") as pause:
        r = _cli_following(stack, ["submit", str(onnx_path), "--data", str(npz_path), "--prune", "0.5",
                                   "--finetune-epochs", "2", "--quantize", "int8", "--name", "cli-shorthand",
                                   "--wait", "--out", str(out_dir)],
                           until=lambda line: line.startswith("[") and "running" in line and "step" in line,
                           pause=pause)
    # not a terminal: one progress line per change, e.g. "[1a2b3c4d] running · quantizing · step 2/2 · 55% · ..."
    progress = [line for line in r.stderr.splitlines() if line.startswith("[")]
    assert any("running" in line and "step" in line for line in progress), r.stderr
    assert progress[-1].split("] ")[1].startswith("succeeded"), progress
    for label in ("file size", "zip size", "nonzero params", "latency p50", "accuracy", "ratio"):
        assert label in r.stdout, r.stdout
    with Client(stack.url, stack.key) as nc:
        job = nc.jobs(limit=1)[0]
        assert job.data["name"] == "cli-shorthand" and job.status == "succeeded"
        steps = job.data["spec"]["steps"]
        assert [s["method"] for s in steps] == ["prune", "quantize"]
        assert steps[0]["sparsity"] == 0.5 and steps[1]["scheme"] == "int8" and steps[1]["mode"] == "static"
        arts = {a["name"]: a for a in job.artifacts}
    assert {p.name for p in out_dir.iterdir()} == set(arts)
    blob = (out_dir / "model.onnx").read_bytes()
    assert hashlib.sha256(blob).hexdigest() == arts["model.onnx"]["sha256"]
    # the table's ratio is the server's own number
    ratio = job.metrics["result"]["ratios"]["zip_bytes"]
    assert f"{ratio:.2f}×" in r.stdout
    # the verdict comes first, before the table: the server's summary
    summary = job.metrics["result"]["verdict"]["summary"]
    first = summary.split(", ")[0]
    # the tiny model is smaller than int8's QDQ overhead: the verdict says so rather than hiding it
    assert first.endswith("× smaller" if job.metrics["result"]["verdict"]["smaller"] else "× larger"), summary
    assert "verdict  " + first in r.stdout and r.stdout.index(first) < r.stdout.index("file size"), r.stdout


def test_cli_yaml_spec_jobs_models_download_cancel(stack, tiny, tmp_path):
    onnx_path, _ = tiny
    spec = tmp_path / "spec.yaml"
    spec.write_text("steps:\n  - method: quantize\n    scheme: int8\n    mode: dynamic\n"
                    "eval:\n  holdout: 0.3\n  latency_runs: 5\n")
    with stack.paused(""):  # held at its first progress message: it cannot have finished
        r = cli(stack, "submit", str(onnx_path), "--spec", str(spec), "--json")
        job = json.loads(r.stdout)
        assert job["status"] in ("queued", "running") and job["spec"]["steps"][0]["mode"] == "dynamic"

    r = cli(stack, "jobs", "wait", job["id"], "--no-progress", "--json")
    assert json.loads(r.stdout)["status"] == "succeeded"
    r = cli(stack, "jobs", "list", "--json", "--limit", "5")
    assert job["id"] in [j["id"] for j in json.loads(r.stdout)]
    r = cli(stack, "jobs", "show", job["id"])
    assert job["id"] in r.stdout and "succeeded" in r.stdout and "model.onnx" in r.stdout
    r = cli(stack, "models", "list", "--json")
    assert job["model_id"] in [m["id"] for m in json.loads(r.stdout)]
    r = cli(stack, "models", "list")
    assert "tiny.onnx" in r.stdout

    r = cli(stack, "download", job["id"], "--out", str(tmp_path / "dl"), "--name", "report.json")
    report = json.loads((tmp_path / "dl" / "report.json").read_text())
    assert report["manifest"]["spec"]["steps"][0]["scheme"] == "int8"

    # an uploaded model's id works in place of a file; a finished job cannot be cancelled (409 → exit 3)
    r = cli(stack, "preflight", job["model_id"], "--quantize", "fp16", "--json")
    assert json.loads(r.stdout)["model"]["id"] == job["model_id"]
    r = cli(stack, "jobs", "cancel", job["id"], check=False)
    assert r.returncode == 3 and "409 conflict" in r.stderr


def test_cli_errors_carry_the_problem(stack, tiny):
    onnx_path, _ = tiny
    r = cli(stack, "submit", str(onnx_path), "--prune", "1.5", check=False)
    assert r.returncode == 3
    assert "422 invalid_spec" in r.stderr and "$.spec.steps[0].sparsity" in r.stderr
    r = cli(stack, "submit", str(onnx_path), check=False)
    assert r.returncode == 2 and "--spec" in r.stderr
    r = cli(stack, "jobs", "show", "0" * 32, check=False)
    assert r.returncode == 3 and "404 not_found" in r.stderr
    r = subprocess.run(NC + ["jobs", "list", "--url", stack.url, "--api-key", "nc_wrong"], env=stack.env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "401 unauthorized" in r.stderr


def test_cli_dry_run_is_preflight(stack, tiny):
    onnx_path, npz_path = tiny
    r = cli(stack, "submit", str(onnx_path), "--data", str(npz_path), "--prune", "0.5", "--finetune-epochs", "1",
            "--dry-run", "--json")
    report = json.loads(r.stdout)
    assert report["runnable"] is True and report["steps"][0]["trains"] is True
    before = len(Client(stack.url, stack.key).jobs())
    r = cli(stack, "preflight", str(onnx_path), "--quantize", "int8")
    assert "preflight" in r.stdout and "quantize" in r.stdout
    assert len(Client(stack.url, stack.key).jobs()) == before  # nothing was queued


def test_sdk_flow_with_arrays_progress_and_metrics(stack, tmp_path):
    onnx_path, npz_path = tiny_classifier(tmp_path / "sdk", samples=1000)
    seen: list[tuple[str, float]] = []

    def on_update(j) -> None:
        seen.append((j.status, j.progress.get("fraction") or 0.0))
        if j.status == "running":
            pause.release()  # "running" was seen mid-way: the held job may go on

    # the worker holds the job as its second step begins, until the SDK has reported it running
    with stack.paused("phase:quantizing") as pause, Client(stack.url, stack.key) as nc:
        model = nc.upload_model(onnx_path, name="sdk-tiny")
        assert model.params == 16 * 32 + 32 + 32 * 4 + 4 and model.inputs[0]["name"] == "input"
        arrays = dict(np.load(npz_path))
        ds = nc.upload_dataset(arrays)
        assert ds.samples == len(arrays["input"])
        spec = {"steps": [{"method": "prune", "granularity": "weight", "sparsity": 0.6,
                           "finetune": {"epochs": 2, "batch_size": 4}},
                          {"method": "quantize", "scheme": "int8", "mode": "static"}],
                # about the SDK's flow, not quality: 60% + batch-4 fine-tuning costs the tiny model ~13 pt
                "eval": {**FAST_EVAL, "gate": False}}
        job = nc.submit(model, spec, ds, name="sdk")
        job.wait(timeout=600, progress=on_update)
        assert job.status == "succeeded"
        assert ("succeeded", 1.0) == seen[-1] and any(s == "running" for s, _ in seen), seen
        fractions = [f for s, f in seen if s == "running"]
        assert fractions == sorted(fractions)
        result = job.metrics["result"]
        assert result["nonzero_params"] < job.metrics["original"]["nonzero_params"]
        assert result["ratios"]["zip_bytes"] > 1.0
        paths = job.download(tmp_path / "all")
        assert {p.name for p in paths} == {a["name"] for a in job.artifacts}
        assert nc.job(job.id).status == "succeeded"


def test_sdk_typed_errors(stack, tiny, tmp_path):
    onnx_path, _ = tiny
    with pytest.raises(Unauthorized) as e:
        Client(stack.url, "nc_not_a_key").models()
    assert e.value.status == 401 and e.value.problem["type"] == "/problems/unauthorized"
    with Client(stack.url, stack.key) as nc:
        model = nc.upload_model(onnx_path)
        with pytest.raises(ValidationFailed) as e:
            nc.submit(model, {"steps": [{"method": "prune", "sparsity": 2}]})
        assert e.value.code == "invalid_spec" and e.value.errors[0]["path"] == "$.spec.steps[0].sparsity"
        with pytest.raises(ValidationFailed) as e:  # static int8 calibrates: it needs data
            nc.submit(model, {"steps": [{"method": "quantize", "scheme": "int8", "mode": "static"}]})
        done = nc.jobs(status="succeeded", limit=1)  # an earlier test's, or one made now when run alone
        job = done[0] if done else nc.submit(model, {"steps": [{"method": "quantize", "scheme": "fp16"}],
                                                     "eval": FAST_EVAL}).wait(timeout=600)
        with pytest.raises(Conflict):
            job.cancel()
    other = Client(stack.url, stack.new_key("team-sdk-other"))
    with pytest.raises(NotFound):
        other.job(job.id)
    with pytest.raises(NotFound):
        other.download_artifact(job.id, "model.onnx", tmp_path / "stolen.onnx")
    assert not (tmp_path / "stolen.onnx").exists()


def test_sdk_retries_503_with_backoff(stack):
    """Two 503s (with Retry-After) in front of the real server: the SDK waits them out and succeeds."""
    real = httpx.HTTPTransport()
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) <= 2:
            return httpx.Response(503, headers={"Retry-After": "0.1", "Content-Type": "application/problem+json"},
                                  json={"type": "/problems/unavailable", "title": "database unavailable",
                                        "status": 503, "detail": "try again shortly", "code": "unavailable"})
        return real.handle_request(request)

    nc = Client(stack.url, stack.key, transport=httpx.MockTransport(handler), backoff=0.05)
    assert isinstance(nc.models(limit=1), list) and len(calls) == 3
    calls.clear()
    nc_no_retry = Client(stack.url, stack.key, transport=httpx.MockTransport(handler), retries=1, backoff=0.01)
    from client import Unavailable

    with pytest.raises(Unavailable) as e:
        nc_no_retry.models(limit=1)
    assert e.value.detail == "try again shortly" and len(calls) == 2


def test_sdk_upload_texts_sends_the_windows_as_an_npz(stack, tiny, tmp_path):
    """Client.upload_texts: byte windows of a text file, with the mask unless the model lacks that input."""
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(range(32, 127)) * 2)  # 190 bytes: 5 windows of 40, the last one 30 long
    with Client(stack.url, stack.key) as nc:
        ds = nc.upload_texts(text, seq_len=40, byte_level=True)
        assert ds.samples == 5 and {k: v["shape"] for k, v in ds.arrays.items()} == {
            "input_ids": [5, 40], "attention_mask": [5, 40]} and ds.arrays["input_ids"]["dtype"] == "int64"
        model = nc.upload_model(tiny[0])  # no attention_mask input: none is sent, the last window ends the text
        ds = nc.upload_texts(text, seq_len=40, byte_level=True, model=model, name="bytes")
        assert set(ds.arrays) == {"input_ids"} and ds.samples == 5 and ds.name == "bytes"


def test_cli_images_builds_the_dataset_from_photo_crops(stack, tmp_path):
    """``--images DIR --labels-from-folders``: 20 JPEG crops of scikit-learn's two sample photos, one folder per
    photo, against a model fixed at [N, 3, 64, 64]: the API receives 20 samples named after the model's input,
    resized, scaled to [0, 1], in NCHW, labelled by folder."""
    from PIL import Image

    folder = tmp_path / "crops"
    expected = photo_crops(folder)
    model = conv_model(tmp_path / "conv.onnx")
    out = cli(stack, "submit", str(model), "--images", str(folder), "--labels-from-folders", "--quantize", "int8",
              "--dry-run", "--json")
    assert "20 images as images, labels; labels from folders: 0=china, 1=flower" in out.stderr, out.stderr
    with Client(stack.url, stack.key) as nc:
        ds = nc.datasets(limit=1)[0]
    assert ds.samples == 20 and ds.arrays["images"] == {"shape": [20, 3, 64, 64], "dtype": "float32"}
    assert "china" in ds.name and "flower" in ds.name
    stored = np.load(stack.home / "artifacts" / "datasets" / ds.id / "data.npz")
    x, labels = stored["images"], stored["labels"]
    order = sorted(expected)  # the folder is read in sorted order
    assert labels.tolist() == [0 if expected[p] == "china" else 1 for p in order]
    first = np.asarray(Image.open(order[0]).convert("RGB").resize((64, 64), Image.BILINEAR), np.float32) / 255
    assert np.allclose(x[0], first.transpose(2, 0, 1), atol=1e-6)
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.05


def test_cli_images_mistakes_exit_2_before_any_upload(stack, tmp_path):
    with Client(stack.url, stack.key) as nc:
        before = len(nc.datasets())
    model = conv_model(tmp_path / "conv.onnx")
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli(stack, "submit", str(model), "--images", str(empty), "--quantize", "int8", check=False)
    assert r.returncode == 2 and "no images" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    from PIL import Image

    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (80, 60), (200, 10, 10)).save(one / "red.png")
    r = cli(stack, "submit", str(model), "--images", str(one), "--size", "64by64", "--quantize", "int8", check=False)
    assert r.returncode == 2 and "HxW" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    with Client(stack.url, stack.key) as nc:
        assert len(nc.datasets()) == before
