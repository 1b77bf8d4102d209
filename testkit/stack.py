"""Start the real service processes for tests: ``netcompress api`` + ``worker``, or ``netcompress serve``."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PG_HOST, PG_PORT, REDIS_PORT = "127.0.0.1", 5432, 6379
NC = [sys.executable, "-m", "netcompress.cli"]
METRICS_TOKEN = "nc-test-metrics-token"  # the `stack` fixture's NETCOMPRESS_METRICS_TOKEN (/metrics is off without one)
TERMINAL = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def fresh_database(prefix: str = "nc_test") -> Iterator[str]:
    """A new PostgreSQL database (its URL), dropped on the way out: a stack whose workers must not see
    another stack's jobs (every worker's sweeper dispatches every queued job of its database)."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Pause:
    """Drives the worker's test-only pause hook (``worker/pause.py``) through the stack's pause file.

    A test holds a job at a progress message, acts on it mid-way (cancel, kill its worker, read its
    state) and releases it: it waits for events, never for the clock, so a fast job cannot finish first.
    """

    def __init__(self, file: Path) -> None:
        self.file = file
        self.reached = file.with_name(file.name + ".reached")
        self.held: dict | None = None  # what the last wait saw: {"job_id", "pid", "progress"}

    def arm(self, match: str) -> None:
        """Hold the next job whose progress matches: a substring of the message, or ``phase:<name>``.

        Re-arming with another match lets a held job go on; it then holds at the new match. Re-arming with
        the same match keeps a held job held and clears ``reached``: the next job (or attempt) to say it
        is held is another one.
        """
        self.reached.unlink(missing_ok=True)
        tmp = self.file.with_name(self.file.name + ".tmp")
        tmp.write_text(match)
        os.replace(tmp, self.file)  # atomic: the worker never reads half a match (empty matches anything)

    def wait(self, client: httpx.Client | None = None, job_id: str | None = None, timeout: float = 300) -> dict:
        """Wait until a job is held; returns the progress it is held at (and keeps the whole record in
        ``held``: the job id, and the pid of the worker process running it). With ``client`` and ``job_id``:
        it must be that job, and the wait fails at once if the job ends without reaching the match."""
        deadline = time.time() + timeout
        while not self.reached.exists():
            if client is not None and job_id is not None:
                job = client.get(f"/v1/jobs/{job_id}").json()
                assert job["status"] not in TERMINAL, f"the job ended before it reached the pause: {job}"
            assert time.time() < deadline, f"no job reached the pause {self.file.read_text()!r} in {timeout} s"
            time.sleep(0.2)
        held = json.loads(self.reached.read_text())
        assert job_id is None or held["job_id"] == job_id, held
        self.held = held
        return held["progress"]

    def holder_pid(self, job_id: str) -> int:
        """The pid of the worker process (the Celery pool child) that ran ``job_id`` when the last wait saw
        it held: the hook writes its own pid, so no log or free-text reason is parsed for it."""
        assert self.held is not None and self.held["job_id"] == job_id, (job_id, self.held)
        return int(self.held["pid"])

    def release(self) -> None:
        """Let the held job go on (and hold no other)."""
        self.file.unlink(missing_ok=True)


def wait_log(paths: list[Path], text: str, timeout: float = 120) -> Path:
    """Wait until one of the log files says ``text`` (an event only a process's log shows); returns it."""
    deadline = time.time() + timeout
    while True:
        for path in paths:
            if path.exists() and text in path.read_text(errors="replace"):
                return path
        assert time.time() < deadline, f"no log of {[p.name for p in paths]} said {text!r} in {timeout} s"
        time.sleep(0.2)


@dataclass
class Stack:
    url: str
    key: str
    env: dict[str, str]
    home: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    worker_logs: dict[int, Path] = field(default_factory=dict)  # worker pid -> its log file

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key or self.key}"}, timeout=60)

    def new_key(self, team: str) -> str:
        out = subprocess.run(NC + ["keys", "create", "--team", team], env=self.env, capture_output=True,
                             text=True, check=True)
        return out.stdout.strip().splitlines()[-1]

    @contextmanager
    def paused(self, match: str) -> Iterator[Pause]:
        """Arm the pause at ``match`` (see :class:`Pause`); released on the way out, whatever happens, so a
        failing test leaves no job of the next test held."""
        pause = Pause(Path(self.env["NETCOMPRESS_TEST_PAUSE_FILE"]))
        pause.arm(match)
        try:
            yield pause
        finally:
            pause.release()

    def add_worker(self) -> subprocess.Popen:
        """Start one more worker process (its own log file) and return it."""
        path = self.home / f"worker{len(self.procs)}.log"
        log = open(path, "w")
        p = subprocess.Popen(NC + ["worker", "--concurrency", "1"], env=self.env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        self.worker_logs[p.pid] = path
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
               # the pause hook is on in every test stack, and holds nothing until a test writes the file
               NETCOMPRESS_TEST_PAUSE_FILE=str(home / "pause"),
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


def send_upload(client: httpx.Client, path: Path | str, content: bytes | None = None, *,
                name: str | None = None) -> httpx.Response:
    """POST a model (``.onnx``/``.zip``/``.pt2``) or a dataset (``.npz``): the file at ``path``, or
    ``content`` under the file name ``path``, with a ``name`` form field when given. Returns the response as
    it is (for uploads a test expects refused)."""
    route = "/v1/datasets" if str(path).endswith(".npz") else "/v1/models"
    fields = {"name": name} if name is not None else None
    if content is not None:
        return client.post(route, files={"file": (Path(path).name, content)}, data=fields)
    with open(path, "rb") as f:
        return client.post(route, files={"file": (Path(path).name, f)}, data=fields)


def upload(client: httpx.Client, path: Path | str, content: bytes | None = None, *, name: str | None = None) -> dict:
    """:func:`send_upload`, asserting a 201; returns the row."""
    r = send_upload(client, path, content, name=name)
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


def jobs_count(stack: Stack) -> int:
    """The jobs the stack's team lists (up to 100): what a refused submit must not change."""
    return len(stack.client().get("/v1/jobs?limit=100").json()["items"])


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
        if job["status"] in TERMINAL:
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

    def weights(shape: tuple[int, int]) -> np.ndarray:
        # as a trained net's: most weights near zero, a few large, so magnitude pruning up to ~60% keeps its
        # predictions (within the quality gate) as it does on real models; plain Gaussian weights would not
        w = rng.normal(0, 0.5, shape)
        w[rng.random(shape) < 0.7] *= 0.02
        return w.astype(np.float32)

    w1, w2 = weights((16, 32)), weights((32, 4))
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
