"""Fuzz every operation of /openapi.json with schemathesis: no 500s, no response that breaks the schema."""
from __future__ import annotations

import uuid

import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from schemathesis.specs.openapi.checks import positive_data_acceptance

from testkit.stack import PG_HOST, PG_PORT


@pytest.fixture(scope="module")
def fuzz_app(pg_url, redis_url, tmp_path_factory):
    """The API in-process on its own database and a queue no worker reads (fuzzed jobs never run)."""
    from api.app import create_app
    from store.auth import create_key, get_or_create_team
    from store.db import session_scope
    from store.migrate import alembic_config
    from store.settings import Settings, get_settings

    name = f"nc_fuzz_{uuid.uuid4().hex[:8]}"
    admin = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{name}"
    mp = pytest.MonkeyPatch()
    mp.setenv("NETCOMPRESS_DATABASE_URL", url)
    mp.setenv("NETCOMPRESS_BROKER_URL", redis_url)
    mp.setenv("NETCOMPRESS_HOME", str(tmp_path_factory.mktemp("fuzz")))
    mp.setenv("NETCOMPRESS_QUEUE", f"nc-fuzz-{uuid.uuid4().hex[:8]}")
    get_settings.cache_clear()
    from alembic import command

    command.upgrade(alembic_config(), "head")
    s = Settings()
    with session_scope(s) as session:
        key = create_key(session, get_or_create_team(session, "fuzz"))
    app = create_app(s)
    yield app, key
    mp.undo()
    get_settings.cache_clear()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_api_fuzz(fuzz_app):
    """Every operation, 40 generated cases each (schemathesis's pytest plugin does not load under pytest 9,
    so the operations are driven through Hypothesis directly)."""
    from hypothesis import given

    app, key = fuzz_app
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) >= 12
    checked = []
    for op in ops:

        @given(case=op.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {key}"}
            # positive_data_acceptance is off: a schema-valid file or spec can still be semantically invalid
            # (random bytes as ONNX, an empty spec), and those are 422s by design.
            response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
            assert response.status_code < 500

        run()
        checked.append(f"{op.method.upper()} {op.path}")
    assert "POST /v1/jobs" in checked
