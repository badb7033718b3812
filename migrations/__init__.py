"""Alembic migrations, and the helpers app and worker call at start-up to bring the database to head."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from models.registry import make_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent


class DatabaseAheadError(RuntimeError):
    """The database was migrated by a newer version of the studio than this one."""


def alembic_config(database_url: str) -> Config:
    """An Alembic config for ``database_url`` that works from any working directory and installed copy."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["database_url"] = database_url
    return cfg


def current_revision(database_url: str) -> str | None:
    with make_engine(database_url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade_head(database_url: str) -> None:
    """``alembic upgrade head``, refusing a database stamped with a revision this code does not know."""
    cfg = alembic_config(database_url)
    script = ScriptDirectory.from_config(cfg)
    revision = current_revision(database_url)
    if revision is not None and revision not in {r.revision for r in script.walk_revisions()}:
        raise DatabaseAheadError(
            f"the database is at revision {revision!r}, which this version of MoLE Studio does not know; "
            "upgrade the studio or point DATABASE_URL at another database"
        )
    command.upgrade(cfg, "head")
