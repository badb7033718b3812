"""Registry tables after a real ``alembic upgrade head``: constraints, foreign keys, enums, SQLite pragmas."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from migrations import upgrade_head
from models.registry import (
    Dataset,
    Expert,
    ExpertKind,
    Job,
    JobEvent,
    JobState,
    Metric,
    Mixture,
    MixtureDataset,
    make_engine,
    session_scope,
)


@pytest.fixture
def db(database_url: str) -> str:
    upgrade_head(database_url)
    return database_url


def _dataset(name: str = "dates", owner: str = "local") -> Dataset:
    return Dataset(
        name=name,
        owner_id=owner,
        format="jsonl",
        tasks=["dates"],
        task_counts={"dates": 3},
        n_rows=3,
        size_bytes=10,
        artifact_key=f"datasets/{uuid.uuid4().hex}",
        sha256="0" * 64,
    )


def _mixture(name: str = "mix", owner: str = "local") -> Mixture:
    return Mixture(name=name, owner_id=owner, base_model="tiny", spec_json={"base_model": "tiny"})


def test_round_trip_of_every_table(db: str) -> None:
    with session_scope(db) as s:
        dataset, mixture = _dataset(), _mixture()
        mixture.datasets.append(dataset)
        s.add_all([dataset, mixture])
        s.flush()
        job = Job(mixture_id=mixture.id, spec_json=mixture.spec_json, total_steps=10)
        s.add(job)
        s.flush()
        s.add_all(
            [
                Expert(
                    name="dates-expert",
                    kind=ExpertKind.SPECIFIC,
                    tasks=["dates"],
                    rank=8,
                    alpha=16.0,
                    base_model="tiny",
                    adapter_key="experts/x",
                    sha256="1" * 64,
                    mixture_id=mixture.id,
                    job_id=job.id,
                ),
                JobEvent(job_id=job.id, kind="claimed", data={"worker": "w1"}),
                Metric(job_id=job.id, step=1, task="dates", name="loss", value=1.5),
            ]
        )
        job_id = job.id
    with session_scope(db) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state is JobState.QUEUED and job.attempt == 0
        assert job.mixture.datasets[0].task_counts == {"dates": 3}
        expert = s.scalars(sa.select(Expert)).one()
        assert expert.kind is ExpertKind.SPECIFIC and expert.job_id == job_id and expert.metrics == {}
        assert s.scalars(sa.select(Metric.value)).one() == 1.5


def test_names_are_unique_per_owner(db: str) -> None:
    with session_scope(db) as s:
        s.add_all([_dataset("a"), _dataset("a", owner="someone-else")])
    with pytest.raises(IntegrityError), session_scope(db) as s:
        s.add(_dataset("a"))


def test_a_job_needs_an_existing_mixture(db: str) -> None:
    with pytest.raises(IntegrityError), session_scope(db) as s:
        s.add(Job(mixture_id=uuid.uuid4(), spec_json={}))


def test_a_dataset_used_by_a_mixture_cannot_be_deleted(db: str) -> None:
    with session_scope(db) as s:
        dataset, mixture = _dataset(), _mixture()
        mixture.datasets.append(dataset)
        s.add_all([dataset, mixture])
        s.flush()
        dataset_id = dataset.id
    with pytest.raises(IntegrityError), session_scope(db) as s:
        s.execute(sa.delete(Dataset).where(Dataset.id == dataset_id))
    with session_scope(db) as s:  # the mixture goes, its link goes with it, then the dataset may go
        s.execute(sa.delete(Mixture))
        assert s.scalars(sa.select(MixtureDataset)).all() == []
        s.execute(sa.delete(Dataset).where(Dataset.id == dataset_id))


def test_job_state_outside_the_enum_is_rejected_by_the_database(db: str) -> None:
    with session_scope(db) as s:
        mixture = _mixture()
        s.add(mixture)
        s.flush()
        job = Job(mixture_id=mixture.id, spec_json={})
        s.add(job)
        s.flush()
        job_id = job.id
    with pytest.raises(IntegrityError), session_scope(db) as s:
        s.execute(
            sa.text("UPDATE jobs SET state = 'exploded' WHERE id = :id"),
            {"id": job_id.hex if db.startswith("sqlite") else str(job_id)},
        )


def test_session_scope_rolls_back_everything_on_error(db: str) -> None:
    with pytest.raises(RuntimeError), session_scope(db) as s:
        s.add(_dataset("half-written"))
        s.flush()
        raise RuntimeError("boom")
    with session_scope(db) as s:
        assert s.scalars(sa.select(Dataset)).all() == []


def test_sqlite_connections_have_foreign_keys_wal_and_busy_timeout(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 15000
    engine.dispose()
