"""Engine and session factory shared by the API and the worker."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from store.settings import Settings, get_settings


def make_engine(settings: Settings) -> Engine:
    """Create an engine; SQLite gets WAL and a busy timeout because API and worker write concurrently."""
    url = settings.sqlalchemy_url
    if url.startswith("sqlite"):
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    # pool_pre_ping: a restarted PostgreSQL must not leave dead connections in the pool.
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10, connect_args={"connect_timeout": 5})


_factories: dict[str, sessionmaker[Session]] = {}


def session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    """One engine per database URL per process (the pool is what makes sessions cheap)."""
    settings = settings or get_settings()
    url = settings.sqlalchemy_url
    if url not in _factories:
        _factories[url] = sessionmaker(bind=make_engine(settings), expire_on_commit=False)
    return _factories[url]


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = session_factory(settings)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
