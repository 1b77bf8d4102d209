"""Run Alembic migrations programmatically (``netcompress migrate``, ``serve`` and the tests)."""
from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    return cfg


def upgrade(revision: str = "head") -> None:
    """Bring the database named by the settings up to ``revision``."""
    command.upgrade(alembic_config(), revision)
