"""Leases on the Job row, on SQLite and PostgreSQL: one owner at a time, fencing, and the reaper's sweeps."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa

from migrations import upgrade_head
from models.registry import Job, JobEvent, JobState, Mixture, session_scope, utcnow
from worker.lease import LeaseLost, claim, finish, heartbeat, reap, release


@pytest.fixture
def db(database_url: str) -> str:
    upgrade_head(database_url)
    return database_url


def _job(db: str, **values: object) -> uuid.UUID:
    with session_scope(db) as s:
        mixture = Mixture(name=f"m-{uuid.uuid4().hex[:6]}", base_model="tiny", spec_json={})
        s.add(mixture)
        s.flush()
        job = Job(mixture_id=mixture.id, spec_json={}, **values)
        s.add(job)
        s.flush()
        return job.id


def _get(db: str, job_id: uuid.UUID) -> Job:
    with session_scope(db) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def test_only_one_worker_wins_a_claim_and_the_loser_logs_a_skip(db: str) -> None:
    job_id = _job(db)
    with session_scope(db) as s:
        assert claim(s, job_id, "w1")
    with session_scope(db) as s:
        assert not claim(s, job_id, "w2")
    job = _get(db, job_id)
    assert job.state is JobState.RUNNING and job.worker == "w1" and job.attempt == 1
    with session_scope(db) as s:
        kinds = s.scalars(sa.select(JobEvent.kind).where(JobEvent.job_id == job_id).order_by(JobEvent.created_at))
        assert list(kinds) == ["claimed", "skipped"]


def test_an_expired_lease_can_be_taken_over_and_the_old_owner_is_fenced_out(db: str) -> None:
    job_id = _job(db)
    start = utcnow()
    with session_scope(db) as s:
        claim(s, job_id, "w1", ttl=timedelta(seconds=5), now=start)
    later = start + timedelta(seconds=6)
    with session_scope(db) as s:
        assert claim(s, job_id, "w2", now=later)
    with pytest.raises(LeaseLost), session_scope(db) as s:
        heartbeat(s, job_id, "w1", now=later)
    with pytest.raises(LeaseLost), session_scope(db) as s:
        finish(s, job_id, "w1", JobState.SUCCEEDED)
    with session_scope(db) as s:
        heartbeat(s, job_id, "w2", step=5, total_steps=10)
        finish(s, job_id, "w2", JobState.SUCCEEDED)
    job = _get(db, job_id)
    assert job.state is JobState.SUCCEEDED and job.step == 5 and job.attempt == 2 and job.worker == "w2"


def test_a_cancelled_job_or_one_out_of_attempts_is_not_claimed(db: str) -> None:
    cancelled, exhausted = _job(db, cancel_requested=True), _job(db, attempt=3, max_attempts=3)
    with session_scope(db) as s:
        assert not claim(s, cancelled, "w1") and not claim(s, exhausted, "w1")


def test_reaper_requeues_expired_fails_exhausted_and_resends_stale_queued(db: str) -> None:
    now = utcnow()
    alive, dead, exhausted = _job(db), _job(db), _job(db, max_attempts=1)
    stale, fresh = _job(db, queued_at=now - timedelta(minutes=10)), _job(db)
    with session_scope(db) as s:
        claim(s, alive, "w1", ttl=timedelta(minutes=5), now=now)
        claim(s, dead, "w2", ttl=timedelta(seconds=1), now=now - timedelta(minutes=1))
        claim(s, exhausted, "w3", ttl=timedelta(seconds=1), now=now - timedelta(minutes=1))
    with session_scope(db) as s:
        reaped = reap(s, now=now, resend_after=timedelta(minutes=2))
    assert reaped.requeued == [dead] and reaped.failed == [exhausted] and reaped.resend == [stale]
    assert _get(db, alive).state is JobState.RUNNING
    assert _get(db, dead).state is JobState.QUEUED and _get(db, dead).worker is None
    assert "lost 1 times" in (_get(db, exhausted).error or "")
    assert _get(db, fresh).state is JobState.QUEUED
    with session_scope(db) as s:  # the requeued job is claimable again: attempt 2
        assert claim(s, dead, "w4") and s.get(Job, dead).attempt == 2


def test_release_puts_the_job_back_for_another_worker(db: str) -> None:
    job_id = _job(db)
    with session_scope(db) as s:
        claim(s, job_id, "w1")
        release(s, job_id, "w1")
    with session_scope(db) as s:
        assert claim(s, job_id, "w2")
