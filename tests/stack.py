"""Start the real service processes for tests: ``netcompress api`` + ``worker``, or ``netcompress serve``."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PG_HOST, PG_PORT, REDIS_PORT = "127.0.0.1", 5432, 6379
NC = [sys.executable, "-m", "netcompress.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    url: str
    key: str
    env: dict[str, str]
    home: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key or self.key}"}, timeout=60)

    def new_key(self, team: str) -> str:
        out = subprocess.run(NC + ["keys", "create", "--team", team], env=self.env, capture_output=True,
                             text=True, check=True)
        return out.stdout.strip().splitlines()[-1]

    def add_worker(self) -> subprocess.Popen:
        """Start one more worker process (its own log file) and return it."""
        n = len(self.procs)
        log = open(self.home / f"worker{n}.log", "w")
        p = subprocess.Popen(NC + ["worker", "--concurrency", "1"], env=self.env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _wait_ready(url: str, procs: list[subprocess.Popen], timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"service process exited with {p.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError("service did not become ready")


def base_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NETCOMPRESS_")}
    env.update(NETCOMPRESS_HOME=str(home), NETCOMPRESS_HEARTBEAT_S="1", NETCOMPRESS_WORKER_THREADS="1",
               NETCOMPRESS_MAX_UPLOAD_BYTES=str(20 * 1024 * 1024),
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start_stack(home: Path, *, database_url: str, broker_url: str, workers: int = 1, **extra_env: str) -> Stack:
    env = base_env(home, NETCOMPRESS_DATABASE_URL=database_url, NETCOMPRESS_BROKER_URL=broker_url,
                   NETCOMPRESS_QUEUE=f"nc-test-{uuid.uuid4().hex[:8]}", **extra_env)
    home.mkdir(parents=True, exist_ok=True)
    subprocess.run(NC + ["migrate"], env=env, check=True, capture_output=True)
    port = free_port()
    log = open(home / "api.log", "w")
    procs = [subprocess.Popen(NC + ["api", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)]
    url = f"http://127.0.0.1:{port}"
    stack = Stack(url=url, key="", env=env, home=home, procs=procs)
    for _ in range(workers):
        stack.add_worker()
    try:
        _wait_ready(url, procs)
        stack.key = stack.new_key("team-a")
    except Exception:
        stack.stop()
        raise
    return stack


def start_embedded(home: Path, **extra_env: str) -> Stack:
    home.mkdir(parents=True, exist_ok=True)
    env = base_env(home / "var", **extra_env)
    port = free_port()
    log_path = home / "serve.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(NC + ["serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=home)
    url = f"http://127.0.0.1:{port}"
    stack = Stack(url=url, key="", env=env, home=home / "var", procs=[proc])
    try:
        _wait_ready(url, [proc], timeout=90)
        m = re.search(r"^(nc_\S+)$", log_path.read_text(), re.M)
        assert m, "serve printed no API key"
        stack.key = m.group(1)
    except Exception:
        stack.stop()
        raise
    return stack


def upload(client: httpx.Client, path: Path) -> dict:
    """POST a model (``.onnx``/``.zip``/``.pt2``) or a dataset (``.npz``) file; asserts 201, returns the row."""
    route = "/v1/datasets" if str(path).endswith(".npz") else "/v1/models"
    with open(path, "rb") as f:
        r = client.post(route, files={"file": (Path(path).name, f)})
    assert r.status_code == 201, r.text
    return r.json()


def expect_problem(r: httpx.Response, status: int, code: str) -> dict:
    """Assert ``r`` is an RFC 9457 problem+json with this status and code; returns the body."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status and body["code"] == code and body["type"] == f"/problems/{code}"
    assert body["title"]
    return body


def upload_counts(stack: Stack) -> tuple[int, int, int, int]:
    """Models and datasets listed, upload files stored, temp files left: what a refused upload must not change."""
    c = stack.client()
    # uploads only: jobs of other tests may publish artifacts meanwhile
    files = sum(len(fs) for sub in ("models", "datasets") for _, _, fs in os.walk(stack.home / "artifacts" / sub))
    tmp = sum(len(fs) for _, _, fs in os.walk(stack.home / "tmp")) if (stack.home / "tmp").exists() else 0
    return (len(c.get("/v1/models?limit=100").json()["items"]), len(c.get("/v1/datasets?limit=100").json()["items"]),
            files, tmp)


def wait_job(client: httpx.Client, job_id: str, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} did not finish: {job}")


def tiny_classifier(folder: Path, *, samples: int = 300, extra_op: str | None = None) -> tuple[Path, Path]:
    """A small Gemm–Relu–Gemm classifier (16 features → 4 classes) as ONNX, and an ``.npz`` of inputs
    labelled by the model itself (so the original's accuracy is 1.0). Built with onnx.helper: no torch,
    no training, a second or less. ``extra_op`` adds a side output through that op on ``[N, 4, 4]``
    (e.g. ``"Det"``), to give the model an op the torch converter lacks."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.5, (16, 32)).astype(np.float32)
    w2 = rng.normal(0, 0.5, (32, 4)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.zeros(32, np.float32), "b1"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.zeros(4, np.float32), "b2")]
    nodes = [helper.make_node("Gemm", ["input", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("Gemm", ["a", "w2", "b2"], ["logits"], name="fc2")]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])]
    if extra_op:
        inits.append(numpy_helper.from_array(np.array([-1, 4, 4], np.int64), "shape44"))
        nodes += [helper.make_node("Slice", ["a", "s0", "s16", "s1"], ["a16"], name="slice"),
                  helper.make_node("Reshape", ["a16", "shape44"], ["m"], name="reshape"),
                  helper.make_node(extra_op, ["m"], ["side"], name="extra")]
        inits += [numpy_helper.from_array(np.array([0], np.int64), "s0"),
                  numpy_helper.from_array(np.array([16], np.int64), "s16"),
                  numpy_helper.from_array(np.array([1], np.int64), "s1")]
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, ["N"]))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / ("tiny.onnx" if not extra_op else f"tiny_{extra_op.lower()}.onnx")
    onnx.save(model, onnx_path)
    X = rng.normal(0, 1, (samples, 16)).astype(np.float32)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    y = sess.run(["logits"], {"input": X})[0].argmax(1).astype(np.int64)
    npz_path = folder / "tiny.npz"
    np.savez(npz_path, input=X, labels=y)
    return onnx_path, npz_path
