"""A forked child (Celery re-forks pool children every ``worker_max_tasks_per_child`` tasks) never uses the
parent's pooled PostgreSQL connections: sharing one socket between two processes corrupts both."""
from __future__ import annotations

import os

from sqlalchemy import text

from store.db import session_factory
from store.settings import Settings


def test_forked_child_opens_its_own_connections(pg_url):
    factory = session_factory(Settings(database_url=pg_url))
    with factory() as s:  # the parent's pool now holds a live connection
        parent_pid = s.execute(text("SELECT pg_backend_pid()")).scalar()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: query through the inherited factory
        try:
            with factory() as s:
                os.write(w, str(s.execute(text("SELECT pg_backend_pid()")).scalar()).encode())
        finally:
            os._exit(0)
    os.close(w)
    child_pid = int(os.read(r, 64) or b"0")
    os.waitpid(pid, 0)
    assert child_pid and child_pid != parent_pid
    with factory() as s:  # and the parent's connection is intact
        assert s.execute(text("SELECT pg_backend_pid()")).scalar() == parent_pid
