"""The sandbox itself: real children, real limits, errors that come back as what they were."""
from __future__ import annotations

import os
import resource
import time

import pytest

from compression import sandbox
from compression.errors import Cancelled, InvalidModel
from testkit.hostile import constant_bomb, run_time_bomb, spinning_loop

MiB = 1024 * 1024


def _upload_args(folder, data: bytes, name: str = "m.onnx") -> dict:
    (folder / "upload").write_bytes(data)
    return {"path": str(folder / "upload"), "filename": name, "workdir": str(folder), "out": str(folder / "model.onnx"),
            "max_unpacked_bytes": 1 << 30, "lazy_above": 16 * MiB}


def _probe_args(folder, data: bytes) -> dict:
    (folder / "model.onnx").write_bytes(data)
    return {"path": str(folder / "model.onnx"), "workdir": str(folder), "probe_macs": True,
            "prunable_ops": ["Conv", "Gemm", "MatMul"], "quantizable_ops": ["Conv", "Gemm", "MatMul"]}


def test_child_environment_carries_no_secrets(monkeypatch, tmp_path):
    monkeypatch.setenv("NETCOMPRESS_DATABASE_URL", "postgresql://user:secret@db/prod")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("NETCOMPRESS_METRICS_TOKEN", "tok")
    env = sandbox._child_env(tmp_path, sandbox.Limits(threads=1))
    assert not any(k.startswith(("NETCOMPRESS_", "AWS_")) for k in env)
    assert "secret" not in " ".join(env.values()) and "s3cr3t" not in " ".join(env.values())
    assert env["HOME"] == str(tmp_path) and env["OMP_NUM_THREADS"] == "1"


def test_a_model_is_described_by_the_child(tmp_path):
    info = sandbox.run("read_upload", _upload_args(tmp_path, constant_bomb(8)), limits=sandbox.Limits(),
                       workdir=tmp_path)
    assert info["format"] == "onnx" and info["store"] == "upload"
    assert info["inputs"] == [{"name": "x", "shape": ["n"], "dtype": "float32"}]


def test_memory_limit_is_named_after_the_structure_was_sent(tmp_path):
    asks = []
    with pytest.raises(sandbox.LimitExceeded) as e:
        sandbox.run("preflight_probe", _probe_args(tmp_path, run_time_bomb(2**31)),
                    limits=sandbox.Limits(memory_bytes=1024 * MiB), workdir=tmp_path, on_ask=asks.append)
    assert e.value.limit == "memory_bytes" and e.value.code == "model_too_costly"
    assert "1024 MiB" in str(e.value)
    assert asks[0]["structure"]["op_types"]["Expand"] == 1


def test_onnx_runtime_skips_folding_a_constant_past_the_limit(tmp_path):
    """ConstantOfShape([2^28]) folds to 1 GiB; under a 1 GiB cap ONNX Runtime skips the fold and the model
    is described in a fraction of a second instead of costing 2 GiB and 6 s. Measured in the reaped child's
    CPU-seconds, not wall time, so a busy machine cannot fail it."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    info = sandbox.run("read_upload", _upload_args(tmp_path, constant_bomb(2**28)),
                       limits=sandbox.Limits(memory_bytes=1024 * MiB), workdir=tmp_path)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert info["params"] == 0 and child_cpu < 4.0, child_cpu


def test_cpu_limit_stops_a_spinning_model_after_its_structure_was_sent(tmp_path):
    asks = []
    t0 = time.monotonic()
    with pytest.raises(sandbox.LimitExceeded) as e:
        sandbox.run("preflight_probe", {**_probe_args(tmp_path, spinning_loop(10**9)), "probe_cpu_seconds": 1},
                    limits=sandbox.Limits(cpu_seconds=60, wall_seconds=60), workdir=tmp_path, on_ask=asks.append)
    assert e.value.limit == "cpu_seconds"
    assert time.monotonic() - t0 < 30
    assert asks and asks[0]["structure"]["op_types"]["Loop"] == 1


def test_wall_clock_limit_kills_the_child(tmp_path):
    with pytest.raises(sandbox.LimitExceeded) as e:
        sandbox.run("preflight_probe", _probe_args(tmp_path, spinning_loop(10**9)),
                    limits=sandbox.Limits(cpu_seconds=None, wall_seconds=3), workdir=tmp_path)
    assert e.value.limit == "wall_seconds"


def test_library_errors_come_back_as_the_same_class(tmp_path):
    with pytest.raises(InvalidModel) as e:
        sandbox.run("read_upload", _upload_args(tmp_path, os.urandom(4000)), limits=sandbox.Limits(),
                    workdir=tmp_path)
    assert e.value.code == "invalid_model" and "not a readable ONNX model" in str(e.value)


def test_an_exception_in_the_parent_handler_ends_the_child(tmp_path):
    def stop(msg: dict) -> None:
        raise Cancelled("cancelled by user")

    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        sandbox.run("preflight_probe", _probe_args(tmp_path, spinning_loop(10**9)),
                    limits=sandbox.Limits(cpu_seconds=None, wall_seconds=60), workdir=tmp_path, on_ask=stop)
    assert time.monotonic() - t0 < 20
