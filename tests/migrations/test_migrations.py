"""Alembic on SQLite and on the real PostgreSQL: one head, a stairway up and down, no drift, start-up guard."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError

from migrations import DatabaseAheadError, alembic_config, current_revision, upgrade_head
from models.registry import Base, make_engine


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _revisions(url: str) -> list[str]:
    """Revisions oldest first."""
    return [r.revision for r in reversed(list(ScriptDirectory.from_config(alembic_config(url)).walk_revisions()))]


def test_single_head(sqlite_url: str) -> None:
    assert len(ScriptDirectory.from_config(alembic_config(sqlite_url)).get_heads()) == 1


def test_stairway_up_down_up(database_url: str) -> None:
    cfg = alembic_config(database_url)
    previous = "base"
    for revision in _revisions(database_url):
        command.upgrade(cfg, revision)
        command.downgrade(cfg, previous)
        command.upgrade(cfg, revision)
        assert current_revision(database_url) == revision
        previous = revision


def test_upgrade_creates_every_table_and_downgrade_removes_them(database_url: str) -> None:
    cfg = alembic_config(database_url)
    command.upgrade(cfg, "head")
    assert _tables(database_url) == set(Base.metadata.tables)
    command.downgrade(cfg, "base")
    assert _tables(database_url) == set()
    command.upgrade(cfg, "head")
    assert _tables(database_url) == set(Base.metadata.tables)


def test_no_drift_between_tables_and_migrations(database_url: str) -> None:
    upgrade_head(database_url)
    command.check(alembic_config(database_url))  # raises if autogenerate would emit anything


def test_check_detects_a_table_the_migrations_lack(database_url: str) -> None:
    """The drift check is live: a table declared in code but missing from the migrations is reported."""
    upgrade_head(database_url)
    extra = sa.Table("not_migrated", Base.metadata, sa.Column("id", sa.Integer, primary_key=True))
    try:
        with pytest.raises(CommandError, match="not_migrated|New upgrade operations"):
            command.check(alembic_config(database_url))
    finally:
        Base.metadata.remove(extra)


def test_upgrade_head_refuses_a_database_from_a_newer_studio(sqlite_url: str) -> None:
    upgrade_head(sqlite_url)
    engine = make_engine(sqlite_url)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE alembic_version SET version_num = 'ffffffffffff'"))
    engine.dispose()
    with pytest.raises(DatabaseAheadError, match="ffffffffffff"):
        upgrade_head(sqlite_url)


def test_upgrade_head_is_idempotent(sqlite_url: str) -> None:
    upgrade_head(sqlite_url)
    upgrade_head(sqlite_url)
    assert current_revision(sqlite_url) == _revisions(sqlite_url)[-1]
