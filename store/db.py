"""Engine and session factory shared by the API and the worker."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from store.settings import Settings


def make_engine(settings: Settings) -> Engine:
    """Create an engine; SQLite gets WAL and a busy timeout because API and worker write concurrently."""
    url = settings.sqlalchemy_url
    if url.startswith("sqlite"):
        db_file = Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None
        if db_file is not None:
            db_file.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
            # keys, jobs, every team's rows: readable by this service's uid only (never by a sandbox's)
            for f in (db_file, *(db_file.with_name(db_file.name + x) for x in ("-wal", "-shm"))) if db_file else ():
                if f.exists() and f.stat().st_mode & 0o077:
                    f.chmod(0o600)

        return engine
    # pool_pre_ping: a restarted PostgreSQL must not leave dead connections in the pool.
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10, connect_args={"connect_timeout": 5})


_factories: dict[str, sessionmaker[Session]] = {}


def _forget_inherited_connections() -> None:
    """In a forked child (Celery's prefork pool re-forks a child every ``worker_max_tasks_per_child`` tasks),
    the parent's pooled connections must not be used: two processes on one socket corrupt the protocol
    ("prepared statement already exists", results of the other's queries). Drop them here without closing
    them (they are still the parent's); the child opens its own."""
    for factory in _factories.values():
        engine = factory.kw.get("bind")
        if engine is not None:
            engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_inherited_connections)


def session_factory(settings: Settings) -> sessionmaker[Session]:
    """One engine per database URL per process (the pool is what makes sessions cheap)."""
    url = settings.sqlalchemy_url
    if url not in _factories:
        _factories[url] = sessionmaker(bind=make_engine(settings), expire_on_commit=False)
    return _factories[url]


_readers: dict[str, sessionmaker[Session]] = {}


def read_session_factory(settings: Settings) -> sessionmaker[Session]:
    """Sessions for read-only request paths: autocommit, so no BEGIN/ROLLBACK round trips around the
    reads (a job poll is two SELECTs; the transaction bracketing cost as much as one of them). Same pool."""
    url = settings.sqlalchemy_url
    if url not in _readers:
        engine = session_factory(settings).kw["bind"]
        if not settings.is_sqlite:
            engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        _readers[url] = sessionmaker(bind=engine, expire_on_commit=False)
    return _readers[url]


@contextmanager
def session_scope(settings: Settings) -> Iterator[Session]:
    """A session on ``settings``' database that commits on success and rolls back on error."""
    session = session_factory(settings)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
