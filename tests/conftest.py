"""Shared fixtures: real PostgreSQL/Redis, real API and worker processes, trained reference models.

Under ``CI=true`` an unreachable PostgreSQL or Redis fails the run instead of skipping.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest

from testkit.stack import (METRICS_TOKEN, PG_HOST, PG_PORT, REDIS_PORT, Stack, fresh_database, start_embedded,
                           start_stack, upload_counts)

CI = os.environ.get("CI") == "true"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _need(name: str, host: str, port: int) -> None:
    if not _reachable(host, port):
        msg = f"{name} at {host}:{port} is unreachable"
        if CI:
            pytest.fail(msg + " (CI=true: not skipping)")
        pytest.skip(msg)


@pytest.fixture(scope="session")
def pg_url() -> str:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    _need("PostgreSQL", PG_HOST, PG_PORT)
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    _need("Redis", PG_HOST, REDIS_PORT)
    return f"redis://{PG_HOST}:{REDIS_PORT}/0"


@pytest.fixture(scope="session")
def mnist_data() -> tuple[np.ndarray, np.ndarray]:
    from testkit.refdata import mnist

    return mnist()


@pytest.fixture(scope="session")
def trained_cnn(mnist_data):
    """SmallCNN trained briefly on 4,000 MNIST images (≈97% on the rest).

    Trained on two torch threads whatever the count is when a test first asks: the same weights in any
    test order, the ones the early-exit bars were set on (one thread trains a CNN whose second exit holds
    out at 0.8925, under the 0.9 bar).
    """
    import torch

    from testkit.refdata import fit, torch_threads
    from testkit.zoo import SmallCNN

    with torch_threads(2):
        torch.manual_seed(0)
        X, y = mnist_data
        return fit(SmallCNN(), X[:4000], y[:4000], epochs=2)


@pytest.fixture(scope="session")
def cnn_onnx(trained_cnn, tmp_path_factory) -> dict[str, Path]:
    """The trained CNN exported by both torch exporters."""
    import torch

    from testkit.zoo import export_onnx

    d = tmp_path_factory.mktemp("cnn")
    ex = torch.zeros(2, 1, 28, 28)
    return {"dynamo": export_onnx(trained_cnn, ex, d / "cnn_dynamo.onnx", dynamo=True),
            "legacy": export_onnx(trained_cnn, ex, d / "cnn_legacy.onnx", dynamo=False)}


@pytest.fixture(scope="session")
def lenet_exports(mnist_data, tmp_path_factory) -> dict[str, bytes]:
    """The one trained LeNet-300-100 of the session, serialized as each exporter writes it (``dynamo``,
    ``legacy``): trained on the first 3,000 MNIST images (flattened) for 2 epochs, seed 0, on one torch
    thread. Every LeNet fixture (this one's variants: exporter, data split) loads its own copy."""
    import torch

    from testkit.refdata import fit, torch_threads
    from testkit.zoo import LeNet300100, export_onnx

    X, y = mnist_data
    with torch_threads(1):
        torch.manual_seed(0)
        net = fit(LeNet300100(), X.reshape(len(X), -1)[:3000], y[:3000], epochs=2)
    d = tmp_path_factory.mktemp("lenet")
    return {ex: export_onnx(net, torch.zeros(2, 784), d / f"{ex}.onnx", dynamo=ex == "dynamo").read_bytes()
            for ex in ("dynamo", "legacy")}


@pytest.fixture(scope="module")
def lenet_dynamo(lenet_exports, mnist_data):
    """The session's LeNet as dynamo exports it, and the next 1,000 images split 600 train / 400 held out:
    the technique contract's model (``tests/unit/test_techniques.py``)."""
    import onnx

    from compression.data import Arrays, split

    X, y = mnist_data
    Xf = X.reshape(len(X), -1)
    data = split(Arrays({"input": Xf[3000:4000]}, y[3000:4000]), holdout=0.4, seed=0, max_eval=1000)
    return onnx.load_from_string(lenet_exports["dynamo"]), data


@pytest.fixture(scope="module")
def lenet(lenet_dynamo):
    """The LeNet most tests use: :func:`lenet_dynamo`. A test package that needs another exporter or split
    overrides this name with a variant of :func:`lenet_exports`."""
    return lenet_dynamo


@pytest.fixture(scope="session")
def mnist_npz(mnist_data, tmp_path_factory) -> Path:
    """1,000 MNIST images + labels as the dataset upload (input name ``input``)."""
    X, y = mnist_data
    p = tmp_path_factory.mktemp("data") / "mnist.npz"
    np.savez(p, input=X[4000:5000], labels=y[4000:5000])
    return p


@pytest.fixture(scope="session")
def stack(pg_url, redis_url, tmp_path_factory) -> Stack:
    """API + one worker as separate processes, on PostgreSQL and Redis (a private queue)."""
    s = start_stack(tmp_path_factory.mktemp("stack"), database_url=pg_url, broker_url=redis_url,
                    NETCOMPRESS_METRICS_TOKEN=METRICS_TOKEN)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def embedded(tmp_path_factory) -> Stack:
    """``netcompress serve``: SQLite, filesystem broker, local artifacts, one worker — no servers."""
    s = start_embedded(tmp_path_factory.mktemp("embedded"))
    yield s
    s.stop()


@pytest.fixture()
def unchanged(stack):
    """The test's requests leave the stack's models, datasets, stored uploads and temp files as they were."""
    before = upload_counts(stack)
    yield
    assert upload_counts(stack) == before


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules that train tiny models in-process: one thread beats two threads spin-waiting on a busy
    shared machine (measured 20×). Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``
    (a module-scoped fixture that trains asks for it by name, so it runs first). Restored after the module."""
    from testkit.refdata import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def zoo_folder(tmp_path_factory) -> Path:
    """One folder of built real-architecture models (:mod:`testkit.real_zoo`) for the whole session: each
    (model, form) is trained and exported once, whichever test asks first."""
    return tmp_path_factory.mktemp("real-zoo")
