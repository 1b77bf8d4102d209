"""Untrusted-model work in a child process with hard limits, no secrets and (as root) its own uid.

An uploaded model is hostile until it has been measured: a 208-byte ONNX can make ONNX Runtime fold a
constant of 512 MiB, a ``Loop`` can spin for seconds, a ``.pt2`` can carry a pickle. So nothing that parses,
loads or runs a user's model happens in a process that holds credentials (the API, the worker's Celery
process). :func:`run` starts a fresh interpreter (``python -m compression.sandbox``, never a fork of the
caller, whose memory holds settings and connections) that:

- gets an environment built from an allow-list (no database URL, no S3 or API keys);
- applies ``RLIMIT_AS`` (address space) or ``RLIMIT_DATA`` (when CUDA must map its device memory),
  ``RLIMIT_CPU`` and ``RLIMIT_FSIZE`` before it reads anything the user sent;
- when started by root, drops to a uid/gid of its own (a fresh one per run, so two sandboxes cannot read
  or trace each other) that owns only the run's folder;
- is killed, with its whole process group, at a wall-clock deadline.

The child talks to the parent over a pipe, one JSON object per line: ``ask`` messages (progress, a
checkpoint to store) that the parent answers, then one ``result`` or ``error``. Large things travel as files
in the run's folder. A limit that is hit comes back as :class:`LimitExceeded` naming the limit, an error
the task raised as the same :class:`~compression.errors.CompressionError` subclass, anything else as
:class:`SandboxCrashed` with the exception's type and message (never a traceback, never a server path).

Example:
    >>> run("read_upload", {"path": "upload", "filename": "m.onnx"}, limits=Limits(), workdir=folder)  # doctest: +SKIP
    {'format': 'onnx', 'inputs': [...], ...}
"""
from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from compression import errors

# What a child may inherit: locale, paths to find Python and its packages, and the numeric-library knobs
# some processors need to run at all (OPENBLAS_CORETYPE). Everything else — credentials above all — stays.
ENV_ALLOW = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH", "PYTHONHASHSEED", "VIRTUAL_ENV",
             "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
             "LD_LIBRARY_PATH")
# Fresh uids per run come from this range: far above any real account, never in /etc/passwd.
UID_BASE, UID_SPAN = 1_900_000_000, 100_000_000
MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one sandboxed run may use.

    Attributes:
        memory_bytes: address-space cap (``RLIMIT_AS``; ``RLIMIT_DATA`` when ``gpu``). None: no cap.
        cpu_seconds: CPU-time cap (``RLIMIT_CPU``: SIGXCPU, then SIGKILL a second later). None: no cap.
        wall_seconds: the parent kills the child's process group after this long.
        file_bytes: cap on any one file the child writes (``RLIMIT_FSIZE``). None: no cap.
        threads: torch / ONNX Runtime / OpenMP threads in the child (0: the library's default).
        drop_privileges: when the parent runs as root, the child runs as a fresh uid/gid.
        gpu: the child may use CUDA (its address space cannot be capped, so the data segment is).
    """

    memory_bytes: int | None = 4096 * MiB
    cpu_seconds: int | None = 300
    wall_seconds: float = 600.0
    file_bytes: int | None = None
    threads: int = 0
    drop_privileges: bool = True
    gpu: bool = False


class LimitExceeded(errors.CompressionError):
    """The model needed more than the sandbox allows (memory, CPU time, wall-clock time)."""

    code = "model_too_costly"

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


class SandboxCrashed(errors.CompressionError):
    """The child died or raised something that is not a :class:`CompressionError`."""

    code = "internal_error"


Handler = Callable[[dict[str, Any]], dict[str, Any] | None]


def run(task: str, args: dict[str, Any], *, limits: Limits, workdir: Path, on_ask: Handler | None = None) -> Any:
    """Run ``TASKS[task](args, channel)`` in a sandboxed child and return its (JSON) result.

    Args:
        task: a name in :data:`TASKS` (the child imports nothing else of ours by name).
        args: JSON-able arguments; file paths in them should lie inside ``workdir``.
        limits: the caps for this run.
        workdir: the run's private folder. The child's cwd, HOME and TMPDIR; handed to the child's uid.
        on_ask: answers the child's ``ask`` messages (progress, checkpoints). An exception raised here
            (a cancel, a time limit) kills the child and propagates.

    Returns:
        What the task returned.

    Raises:
        LimitExceeded: a memory, CPU or wall-clock limit was hit.
        CompressionError: the task raised one (same class, same code, same message).
        SandboxCrashed: the child died another way.
    """
    workdir = Path(workdir).resolve()
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    uid = _child_uid(limits)
    if uid is not None:
        _hand_over(workdir, uid)
    log_path = workdir / "sandbox.log"
    read_fd, write_fd = os.pipe()
    request = json.dumps({"task": task, "args": args, "limits": asdict(limits), "uid": uid, "fd": write_fd})
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "compression.sandbox"], stdin=subprocess.PIPE, stdout=log,
                                stderr=log, cwd=workdir, env=_child_env(workdir, limits), pass_fds=(write_fd,),
                                start_new_session=True, close_fds=True)
    os.close(write_fd)
    deadline = time.monotonic() + limits.wall_seconds
    try:
        assert proc.stdin is not None
        proc.stdin.write(request.encode() + b"\n")
        proc.stdin.flush()
        outcome = _converse(proc, read_fd, deadline, on_ask)
    except BaseException:
        _kill(proc)
        raise
    finally:
        os.close(read_fd)
    if outcome is None:  # the child hung up without a result: how did it end?
        _kill(proc, wait_s=5.0)
        raise _death(proc.returncode, limits, _tail(log_path), timed_out=time.monotonic() >= deadline)
    proc.wait()
    if outcome["kind"] == "result":
        return outcome["value"]
    raise _rebuild(outcome)


def _converse(proc: subprocess.Popen, read_fd: int, deadline: float, on_ask: Handler | None) -> dict | None:
    """Relay the child's asks until its result or error (or until it dies or overruns the deadline)."""
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([read_fd], [], [], min(left, 1.0))
        if not ready:
            if proc.poll() is not None:
                return None
            continue
        chunk = os.read(read_fd, 1 << 16)
        if not chunk:
            return None
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            msg = json.loads(line)
            if msg["kind"] != "ask":
                return msg
            reply = (on_ask(msg["body"]) if on_ask else None) or {}
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(reply).encode() + b"\n")
            proc.stdin.flush()


def _kill(proc: subprocess.Popen, wait_s: float = 10.0) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        pass


def _death(rc: int | None, limits: Limits, tail: str, *, timed_out: bool) -> errors.CompressionError:
    """Name the limit that ended a child that sent no result."""
    if timed_out:
        return LimitExceeded("wall_seconds", f"the model exceeded the wall-clock limit of {limits.wall_seconds:.0f} s")
    if rc in (-signal.SIGXCPU, -signal.SIGKILL) and limits.cpu_seconds and "MemoryError" not in tail:
        return LimitExceeded("cpu_seconds", f"the model exceeded the CPU-time limit of {limits.cpu_seconds} s")
    if limits.memory_bytes and (rc in (-signal.SIGSEGV, -signal.SIGABRT, -signal.SIGKILL, -signal.SIGBUS)
                                or "MemoryError" in tail or "bad_alloc" in tail):
        return LimitExceeded("memory_bytes", f"the model exceeded the memory limit of "
                                             f"{limits.memory_bytes // MiB} MiB")
    if rc == -signal.SIGXFSZ:
        return LimitExceeded("file_bytes", f"the model wrote a file over the limit of {limits.file_bytes} bytes")
    return SandboxCrashed(f"the model's sandbox ended unexpectedly (exit status {rc})")


def _rebuild(err: dict[str, Any]) -> errors.CompressionError:
    """The child's error as the same exception class, with its code and message."""
    if err.get("limit"):
        return LimitExceeded(err["limit"], err["message"])
    cls = getattr(errors, err.get("class", ""), None)
    if isinstance(cls, type) and issubclass(cls, errors.CompressionError):
        e = cls.__new__(cls)
        errors.CompressionError.__init__(e, err["message"], details=err.get("details"))
        e.code = err.get("code", cls.code)
        return e
    return SandboxCrashed(err["message"])


def _tail(path: Path, n: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _child_uid(limits: Limits) -> int | None:
    if not limits.drop_privileges or os.geteuid() != 0 or not _code_readable_by_others():
        return None
    return UID_BASE + secrets.randbelow(UID_SPAN)


_readable: list[bool] = []


def _code_readable_by_others() -> bool:
    """Whether a uid of no account can run our Python: the interpreter, the packages, this code. A checkout
    under a private folder (``/root``) is not; the child then keeps the caller's uid, with a warning (it still
    has no secrets in its environment and all the other limits)."""
    if not _readable:
        import logging
        import sysconfig

        paths = [Path(sys.executable).resolve(), Path(__file__).resolve().parent.parent,
                 Path(sysconfig.get_paths()["purelib"]), Path(sysconfig.get_paths()["stdlib"])]
        ok = all(_others_can_reach(p) for p in paths)
        if not ok:
            logging.getLogger(__name__).warning("the sandbox cannot drop privileges: the code is not readable by "
                                                "other users (install it outside a private folder)")
        _readable.append(ok)
    return _readable[0]


def _others_can_reach(path: Path) -> bool:
    need = 0o005 if path.is_dir() or os.access(path, os.X_OK) else 0o004
    if (path.stat().st_mode & need) != need:
        return False
    return all(p.stat().st_mode & 0o001 for p in path.parents)


def _hand_over(workdir: Path, uid: int) -> None:
    """The run's folder (and what the parent put in it) belongs to the child's uid, and only to it."""
    for root, dirs, files in os.walk(workdir):
        for name in (*dirs, *files):
            os.lchown(os.path.join(root, name), uid, uid)
    os.chown(workdir, uid, uid)
    os.chmod(workdir, 0o700)


def _child_env(workdir: Path, limits: Limits) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ENV_ALLOW}
    env.update(HOME=str(workdir), TMPDIR=str(workdir / "tmp"), PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    if limits.threads:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[k] = str(limits.threads)
    if not limits.gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


# ---------------------------------------------------------------------------------------------------------
# The child's side.


class Channel:
    """The child's end of the pipe: ``ask`` the parent and wait for its answer."""

    def __init__(self, fd: int) -> None:
        self._out = os.fdopen(fd, "w", buffering=1)

    def ask(self, body: dict[str, Any]) -> dict[str, Any]:
        self.send({"kind": "ask", "body": body})
        line = sys.stdin.readline()
        if not line:  # the parent went away: nothing left to do for
            os._exit(1)
        return json.loads(line)

    def send(self, msg: dict[str, Any]) -> None:
        self._out.write(json.dumps(msg, default=_json_default) + "\n")
        self._out.flush()


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-able: {type(o).__name__}")


def _apply_limits(limits: dict[str, Any], uid: int | None) -> None:
    import resource

    if limits["memory_bytes"]:
        kind = resource.RLIMIT_DATA if limits["gpu"] else resource.RLIMIT_AS
        resource.setrlimit(kind, (limits["memory_bytes"], limits["memory_bytes"]))
    if limits["cpu_seconds"]:
        resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_seconds"], limits["cpu_seconds"] + 1))
    if limits["file_bytes"]:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"], limits["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    _die_with_parent()


def _die_with_parent() -> None:
    """SIGKILL when the parent dies (a worker SIGKILLed mid-job must not leave its pipeline running on).
    Set after the uid change, which clears it."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent is already gone
        os._exit(1)


def _child_main() -> None:
    request = json.loads(sys.stdin.readline())
    _apply_limits(request["limits"], request["uid"])
    channel = Channel(request["fd"])
    try:
        from compression.sandbox_tasks import TASKS

        value = TASKS[request["task"]](request["args"], channel, request["limits"])
        channel.send({"kind": "result", "value": value})
    except MemoryError:
        channel.send({"kind": "error", "limit": "memory_bytes", "message": "the model exceeded the memory limit of "
                      f"{(request['limits']['memory_bytes'] or 0) // MiB} MiB"})
    except errors.CompressionError as e:
        channel.send({"kind": "error", "class": type(e).__name__, "code": e.code, "message": str(e),
                      "details": getattr(e, "details", {})})
    except Exception as e:  # a library's failure: its type and message, for the parent to word
        text = str(e)
        if "bad_alloc" in text or "Failed to allocate" in text:
            channel.send({"kind": "error", "limit": "memory_bytes", "message": "the model exceeded the memory limit "
                          f"of {(request['limits']['memory_bytes'] or 0) // MiB} MiB"})
        else:
            import traceback

            traceback.print_exc()  # into sandbox.log, for the operator
            channel.send({"kind": "error", "class": "", "message": f"{type(e).__name__}: {text[:2000]}"})


if __name__ == "__main__":
    _child_main()
