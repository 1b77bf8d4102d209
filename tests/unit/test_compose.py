"""docker-compose.yml, Dockerfile and Dockerfile.gpu agree with the settings and the queue routing.

No Docker engine here: the files are parsed and checked against ``store.settings.Settings`` and
``store.queue.queue_for``, the code that will read them.
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from store.queue import queue_for
from store.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def _resolve(value: str) -> str:
    """``${VAR:-default}`` -> ``default`` (what compose does when VAR is unset)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def _settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for k in list(__import__("os").environ):
        if k.startswith("NETCOMPRESS_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, _resolve(v))
    return Settings()


def _queues(service: dict) -> list[str]:
    cmd = service["command"]
    assert cmd[:2] == ["netcompress", "worker"], cmd
    return cmd[cmd.index("--queues") + 1].split(",")


def test_services_present(compose):
    assert {"api", "worker-gpu", "worker-cpu", "postgres", "redis", "minio", "migrate", "create-bucket"} <= set(compose["services"])


def test_every_netcompress_variable_is_a_setting(compose):
    fields = {f"NETCOMPRESS_{name.upper()}" for name in Settings.model_fields}
    for name, svc in compose["services"].items():
        unknown = {k for k in _env(svc) if k.startswith("NETCOMPRESS_")} - fields
        assert not unknown, f"{name}: {unknown} are not settings (typo, or a setting was renamed)"


def test_settings_point_at_the_compose_services(compose, monkeypatch):
    services = compose["services"]
    for name in ("api", "worker-cpu", "worker-gpu", "migrate"):
        s = _settings(_env(services[name]), monkeypatch)
        db = urlparse(s.database_url)
        pg = _env(services["postgres"])
        assert s.sqlalchemy_url.startswith("postgresql+psycopg://")
        assert db.hostname == "postgres" and db.port == 5432 and db.path == "/" + pg["POSTGRES_DB"]
        assert db.username == pg["POSTGRES_USER"] and db.password == _resolve(pg["POSTGRES_PASSWORD"])
        broker = urlparse(s.broker_url)
        assert broker.scheme == "redis" and broker.hostname == "redis" and broker.port == 6379
        assert s.artifact_is_s3 and urlparse(s.s3_endpoint_url).hostname == "minio"
        # the bucket the one-shot service creates is the one the settings name
        bucket, _ = s.s3_bucket_prefix
        assert f"store/{bucket}" in " ".join(services["create-bucket"]["command"])
        minio = _env(services["minio"])
        env = _env(services[name])
        assert _resolve(env["AWS_ACCESS_KEY_ID"]) == _resolve(minio["MINIO_ROOT_USER"])
        assert _resolve(env["AWS_SECRET_ACCESS_KEY"]) == _resolve(minio["MINIO_ROOT_PASSWORD"])
        assert s.route_by_device


def test_workers_listen_where_the_api_routes(compose, monkeypatch):
    services = compose["services"]
    api = _settings(_env(services["api"]), monkeypatch)
    training = {"steps": [{"method": "prune", "sparsity": 0.5, "finetune": {"epochs": 2}}]}
    onnx_only = {"steps": [{"method": "prune", "sparsity": 0.5, "finetune": None},
                           {"method": "quantize", "scheme": "int8", "mode": "dynamic"}]}
    assert queue_for(training, api) in _queues(services["worker-gpu"])
    assert queue_for(onnx_only, api) in _queues(services["worker-cpu"])
    assert queue_for(training, api) not in _queues(services["worker-cpu"])
    # both workers read the same settings as the API (one anchor), so they agree on names
    for w in ("worker-gpu", "worker-cpu"):
        ws = _settings(_env(services[w]), monkeypatch)
        assert (ws.gpu_queue, ws.cpu_queue) == (api.gpu_queue, api.cpu_queue)


def test_gpu_worker_reserves_an_nvidia_gpu_and_uses_the_cuda_image(compose):
    gpu = compose["services"]["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert gpu["build"]["dockerfile"] == "Dockerfile.gpu"
    for name in ("api", "worker-cpu", "migrate"):
        svc = compose["services"][name]
        assert svc["build"]["dockerfile"] == "Dockerfile" and "deploy" not in svc
        assert svc["image"] != gpu["image"]
    assert compose["services"]["api"]["ports"] == ["8000:8000"]
    assert "8000" in compose["services"]["api"]["command"]


def test_images_pin_the_projects_torch_and_install_the_package():
    torch_pin = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                     if d.startswith("torch=="))
    version = torch_pin.split("==")[1]
    cpu, gpu = (ROOT / "Dockerfile").read_text(), (ROOT / "Dockerfile.gpu").read_text()
    for text in (cpu, gpu):
        assert f"ARG TORCH_VERSION={version}" in text
        assert 'pip install "torch==${TORCH_VERSION}"' in text
        assert "RUN pip install . " in text
        for pkg in ("api", "client", "compression", "migrations", "netcompress", "store", "worker"):
            assert f"COPY {pkg} ./{pkg}" in text
    assert re.search(r"^FROM python:3\.1[1-9]-slim", cpu, re.M)
    assert "whl/cpu" in cpu
    assert re.search(r"^FROM nvidia/cuda:\S+", gpu, re.M) and "whl/cu" in gpu
    assert '"--queues", "gpu"' in gpu


@pytest.mark.parametrize("step,trains", [
    ({"method": "prune", "granularity": "weight", "finetune": None, "rewind": "none", "importance": "l1"}, False),
    ({"method": "prune", "finetune": {"epochs": 1}}, True),
    ({"method": "prune", "finetune": {"epochs": 0}}, False),
    # taylor scores need gradients even with no fine-tune epochs; rewinding needs finetune epochs anyway
    ({"method": "prune", "importance": "taylor", "finetune": {"epochs": 0}}, True),
    ({"method": "prune", "rewind": "init", "rewind_model_id": "m0", "finetune": {"epochs": 1}}, True),
    ({"method": "distill", "epochs": 5}, True),
    ({"method": "quantize", "scheme": "int8", "mode": "static", "finetune": None}, False),
    ({"method": "quantize", "scheme": "int8", "mode": "qat"}, True),
    ({"method": "quantize", "scheme": "binary", "finetune": {"epochs": 6}}, True),
    ({"method": "slimmable", "epochs": 3}, True),
])
def test_step_trains(step, trains):
    """Each technique's spec says whether it trains (the GPU queue); the table kept from ``step_trains``."""
    from compression.spec import parse_spec

    assert parse_spec({"steps": [step]}).trains is trains


def test_default_single_queue_without_routing():
    s = Settings(queue="jobs", route_by_device=False)
    assert queue_for({"steps": [{"method": "distill", "epochs": 5}]}, s) == "jobs"
    assert queue_for(None, s) == "jobs"


@pytest.mark.parametrize("steps,queue", [
    ([{"method": "prune", "sparsity": 0.5}, {"method": "quantize", "scheme": "int8", "mode": "dynamic"}], "cpu"),
    ([{"method": "quantize", "scheme": "cluster", "bits": 4}], "cpu"),
    ([{"method": "quantize", "scheme": "binary"}], "gpu"),  # its default fine-tune trains
    ([{"method": "quantize", "scheme": "int8", "mode": "qat"}], "gpu"),
    ([{"method": "prune", "sparsity": 0.5, "finetune": {"epochs": 1}}], "gpu"),
    ([{"method": "distill"}], "gpu"),
])
def test_routing_of_stored_specs(steps, queue):
    """The spec as the API stores it (defaults filled by the techniques' models) routes as expected."""
    from compression.spec import parse_spec

    stored = parse_spec({"steps": steps}).to_json()
    assert queue_for(stored, Settings(route_by_device=True)) == queue
