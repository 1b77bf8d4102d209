"""Hostile models through HTTP: they cost the API nothing, never run a payload, and fail only their own job.

Upload checks, preflight's probe and the worker's pipeline run in sandboxed children
(:mod:`compression.sandbox`). These tests send what an attacker with an ordinary key would, and measure the
API process itself (peak RSS from ``/proc/<pid>/status``, CPU time from ``/proc/<pid>/stat``).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from testkit.hostile import constant_bomb, poison_program, run_time_bomb, save_program, spinning_loop
from testkit.stack import expect_problem, send_upload, start_stack, tiny_classifier, upload, wait_job

MiB = 1024 * 1024
# What a hostile model may cost the API process itself, in its own CPU-seconds (utime + stime, children
# excluded): the sandboxed child does the work. CPU time, not wall time, so a busy machine cannot fail it.
API_CPU_S = 1.0


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.fixture(scope="module")
def tight(pg_url, redis_url, tmp_path_factory):
    """API + worker with small sandbox limits: 1 GiB for a model check, 1 CPU-second for preflight's probe,
    3 GiB for a job's pipeline."""
    s = start_stack(tmp_path_factory.mktemp("tight"), database_url=pg_url, broker_url=redis_url,
                    NETCOMPRESS_SANDBOX_MEMORY_BYTES=str(1024 * MiB), NETCOMPRESS_SANDBOX_PROBE_CPU_S="1",
                    NETCOMPRESS_SANDBOX_JOB_MEMORY_BYTES=str(3072 * MiB))
    s.key = s.new_key("sandbox-team")
    # Warm up: the API imports the technique registry (and torch) on its first spec; measure models, not that.
    onnx_path, _ = tiny_classifier(tmp_path_factory.mktemp("warm"))
    _preflight(s, upload(s.client(), onnx_path)["id"]).raise_for_status()
    yield s
    s.stop()


def test_pt2_with_a_pickled_weight_is_refused_and_its_payload_never_runs(stack, tmp_path):
    real = save_program(tmp_path / "real.pt2")
    marker = tmp_path / "pwned-weight"
    bad = poison_program(real, tmp_path / "bad.pt2", marker, where="weight")
    body = expect_problem(send_upload(stack.client(), "bad.pt2", bad.read_bytes()), 415, "unsupported_format")
    assert "pickle" in body["detail"] and "fc.bias" in body["detail"]
    assert not marker.exists()


def test_pt2_with_pickled_example_inputs_loads_without_running_them(stack, tmp_path):
    """``torch.export.load`` retries such example inputs with ``weights_only=False``; we never read them."""
    real = save_program(tmp_path / "real.pt2")
    marker = tmp_path / "pwned-inputs"
    bad = poison_program(real, tmp_path / "bad.pt2", marker, where="sample_inputs")
    r = send_upload(stack.client(), "bad.pt2", bad.read_bytes())
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["format"] == "pt2" and model["params"] == 4 * 3 + 3
    assert model["inputs"][0]["shape"][1] == 4 and not isinstance(model["inputs"][0]["shape"][0], int)
    assert not marker.exists()


def _preflight(stack, model_id: str):
    return stack.client().post("/v1/jobs/preflight", json={
        "model_id": model_id, "spec": {"steps": [{"method": "quantize", "scheme": "fp16"}]}})


def test_constant_bomb_costs_the_api_nothing_on_upload_or_preflight(tight):
    """ConstantOfShape([2^28]): 216 bytes, 1 GiB once folded (2 GiB and 6 s of ONNX Runtime in the API before).
    In the 1 GiB sandbox ONNX Runtime skips the fold: accepted at once, and the API never holds it."""
    api = tight.procs[0].pid
    peak = _peak_rss(api)
    cpu = _cpu_s(api)
    r = send_upload(tight.client(), "bomb.onnx", constant_bomb(2**28))
    assert r.status_code == 201, r.text
    assert _cpu_s(api) - cpu < API_CPU_S
    for _ in range(3):
        cpu = _cpu_s(api)
        pre = _preflight(tight, r.json()["id"])
        assert pre.status_code == 200, pre.text
        assert _cpu_s(api) - cpu < API_CPU_S
    assert _peak_rss(api) - peak < 128 * MiB


def test_preflight_of_a_model_that_needs_gigabytes_to_run_names_the_memory_limit(tight):
    """Expand to [1, 2^31] needs 8 GiB for one forward: the MAC probe stops at the sandbox's 1 GiB."""
    api = tight.procs[0].pid
    r = send_upload(tight.client(), "runbomb.onnx", run_time_bomb(2**31))
    assert r.status_code == 201, r.text
    peak = _peak_rss(api)
    cpu = _cpu_s(api)
    pre = _preflight(tight, r.json()["id"])
    assert pre.status_code == 200, pre.text
    assert _cpu_s(api) - cpu < API_CPU_S
    report = pre.json()
    assert report["model"]["macs_source"] == "estimated"
    assert any("memory limit of 1024 MiB" in n for n in report["steps"][0]["notes"]), report["steps"][0]["notes"]
    assert _peak_rss(api) - peak < 128 * MiB


def test_spinning_loop_costs_the_api_no_cpu_in_preflight(tight):
    """A Loop of 10^8 turns loads in no time; preflight's MAC probe stops at its 1 CPU-second limit and the
    report says MACs were estimated, naming the limit. The API process spends none of that CPU."""
    r = send_upload(tight.client(), "loop.onnx", spinning_loop(10**8))
    assert r.status_code == 201, r.text
    api = tight.procs[0].pid
    cpu = _cpu_s(api)
    pre = _preflight(tight, r.json()["id"])
    assert pre.status_code == 200, pre.text
    report = pre.json()
    assert report["model"]["macs_source"] == "estimated"
    assert report["model"]["op_types"] == {"Add": 1, "Identity": 1, "Loop": 1}
    assert any("CPU-time limit of 1 s" in n for n in report["steps"][0]["notes"]), report["steps"][0]["notes"]
    assert _cpu_s(api) - cpu < API_CPU_S


def test_hostile_model_fails_its_own_job_and_the_next_job_succeeds(tight, tmp_path):
    """Expand(x[N,1], [N, 2^27]): cheap to check, 32 GiB to run on 64 samples. Its job fails with the memory
    limit named; the same worker then runs an ordinary job to success."""
    c = tight.client()
    bomb = send_upload(tight.client(), "runbomb.onnx", run_time_bomb(2**27))
    assert bomb.status_code == 201, bomb.text
    job = c.post("/v1/jobs", json={"model_id": bomb.json()["id"],
                                   "spec": {"steps": [{"method": "quantize", "scheme": "fp16"}]}}).json()
    done = wait_job(c, job["id"], timeout=300)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "model_too_costly"
    assert "memory limit of 3072 MiB" in done["error"]["message"]
    assert "/" not in done["error"]["message"]  # no server path

    onnx_path, _ = tiny_classifier(tmp_path)
    model = upload(c, onnx_path)
    ok = c.post("/v1/jobs", json={"model_id": model["id"],
                                  "spec": {"steps": [{"method": "quantize", "scheme": "fp16"}]}}).json()
    good = wait_job(c, ok["id"], timeout=300)
    assert good["status"] == "succeeded", good["error"]
    assert good["metrics"]["result"]["file_bytes"] < good["metrics"]["original"]["file_bytes"]
    assert tight.procs[1].poll() is None  # the worker process itself lived through both
    assert not any((tight.home / "work").iterdir()), "job work folders are removed at every terminal state"

