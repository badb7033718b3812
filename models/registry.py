"""The registry: every table of the studio, declared once (SQLAlchemy 2 typed mappings).

Alembic generates its revisions from ``Base.metadata``; nothing else creates tables. Every row carries
``id`` (uuid4), ``owner_id`` and a timezone-aware ``created_at`` so hosted mode can scope everything by user.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

LOCAL_OWNER = "local"
NAME_LENGTH = 128
KEY_LENGTH = 512

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class ExpertKind(StrEnum):
    UNIVERSAL = "universal"
    SPECIFIC = "specific"


def _enum(cls: type[StrEnum], name: str) -> sa.Enum:
    """Portable enum column: a VARCHAR plus a CHECK constraint holding the values, on SQLite and PostgreSQL."""
    return sa.Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [m.value for m in members],
    )


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: sa.DateTime(timezone=True), dict[str, Any]: sa.JSON, list[str]: sa.JSON}


class _Row:
    """Columns every table has."""

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[str] = mapped_column(sa.String(64), default=LOCAL_OWNER, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Dataset(_Row, Base):
    """An uploaded, validated task dataset; the raw file lives in the artifact store."""

    __tablename__ = "datasets"
    __table_args__ = (sa.UniqueConstraint("owner_id", "name"),)

    name: Mapped[str] = mapped_column(sa.String(NAME_LENGTH))
    format: Mapped[str] = mapped_column(sa.String(16))
    tasks: Mapped[list[str]]
    task_counts: Mapped[dict[str, Any]]
    n_rows: Mapped[int]
    size_bytes: Mapped[int]
    artifact_key: Mapped[str] = mapped_column(sa.String(KEY_LENGTH))
    sha256: Mapped[str] = mapped_column(sa.String(64))


class Mixture(_Row, Base):
    """A named mixture blueprint: the ``MixtureSpec`` JSON, stored unchanged."""

    __tablename__ = "mixtures"
    __table_args__ = (sa.UniqueConstraint("owner_id", "name"),)

    name: Mapped[str] = mapped_column(sa.String(NAME_LENGTH))
    base_model: Mapped[str] = mapped_column(sa.String(KEY_LENGTH))
    spec_json: Mapped[dict[str, Any]]
    trained: Mapped[bool] = mapped_column(default=False)
    parent_id: Mapped[uuid.UUID | None] = mapped_column(sa.ForeignKey("mixtures.id", ondelete="SET NULL"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    datasets: Mapped[list[Dataset]] = relationship(secondary="mixture_datasets", lazy="selectin")


class MixtureDataset(Base):
    """Which datasets a mixture trains on; RESTRICT keeps a used dataset from being deleted."""

    __tablename__ = "mixture_datasets"

    mixture_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("mixtures.id", ondelete="CASCADE"), primary_key=True)
    dataset_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("datasets.id", ondelete="RESTRICT"), primary_key=True, index=True
    )


class Job(_Row, Base):
    """One training (or evaluation) run. The row, not the broker, is the truth about the job (RELIABILITY §1)."""

    __tablename__ = "jobs"
    __table_args__ = (
        sa.Index("ix_jobs_state_lease_until", "state", "lease_until"),
        sa.CheckConstraint("step >= 0 AND total_steps >= 0", name="steps_non_negative"),
    )

    mixture_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("mixtures.id", ondelete="RESTRICT"), index=True)
    kind: Mapped[str] = mapped_column(sa.String(16), default="train")
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"), default=JobState.QUEUED)
    spec_json: Mapped[dict[str, Any]]
    stage: Mapped[str | None] = mapped_column(sa.String(32))
    step: Mapped[int] = mapped_column(default=0)
    total_steps: Mapped[int] = mapped_column(default=0)
    error: Mapped[str | None] = mapped_column(sa.Text)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    worker: Mapped[str | None] = mapped_column(sa.String(255))
    lease_until: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    attempt: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int] = mapped_column(default=3)
    celery_task_id: Mapped[str | None] = mapped_column(sa.String(64))
    checkpoint_key: Mapped[str | None] = mapped_column(sa.String(KEY_LENGTH))
    queued_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    mixture: Mapped[Mixture] = relationship(lazy="joined")


class Expert(_Row, Base):
    """A trained LoRA expert (safetensors in the artifact store) with its lineage and metrics."""

    __tablename__ = "experts"
    __table_args__ = (
        sa.UniqueConstraint("owner_id", "name"),
        sa.CheckConstraint("rank > 0", name="rank_positive"),
    )

    name: Mapped[str] = mapped_column(sa.String(NAME_LENGTH))
    kind: Mapped[ExpertKind] = mapped_column(_enum(ExpertKind, "expert_kind"))
    tasks: Mapped[list[str]]
    rank: Mapped[int]
    alpha: Mapped[float]
    base_model: Mapped[str] = mapped_column(sa.String(KEY_LENGTH), index=True)
    adapter_key: Mapped[str] = mapped_column(sa.String(KEY_LENGTH))
    sha256: Mapped[str] = mapped_column(sa.String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    mixture_id: Mapped[uuid.UUID | None] = mapped_column(sa.ForeignKey("mixtures.id", ondelete="SET NULL"), index=True)
    job_id: Mapped[uuid.UUID | None] = mapped_column(sa.ForeignKey("jobs.id", ondelete="SET NULL"), index=True)


class JobEvent(_Row, Base):
    """Append-only log of what happened to a job: claimed, resumed at step k, checkpoint, skipped, failed."""

    __tablename__ = "job_events"

    job_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(sa.String(32))
    message: Mapped[str] = mapped_column(sa.Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Metric(_Row, Base):
    """One scalar of a job at a step: a per-task loss, an eval score, a task weight."""

    __tablename__ = "metrics"
    __table_args__ = (sa.Index("ix_metrics_job_name_step", "job_id", "name", "step"),)

    job_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int]
    task: Mapped[str | None] = mapped_column(sa.String(NAME_LENGTH))
    name: Mapped[str] = mapped_column(sa.String(64))
    value: Mapped[float]


# --- engine and sessions -------------------------------------------------------------------------------------


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Foreign keys on, WAL for concurrent readers, and a busy timeout instead of 'database is locked'."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=15000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets its pragmas on every connection and its folder created."""
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 15})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(url, pool_pre_ping=True)


@cache
def _factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(make_engine(url), expire_on_commit=False)


def session_factory(url: str) -> sessionmaker[Session]:
    """One cached session factory (and engine) per database URL."""
    return _factory(url)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error, so nothing half-written stays."""
    with session_factory(url)() as session, session.begin():
        yield session
