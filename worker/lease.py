"""Leases on Job rows: the database, not the broker, says who runs a job (RELIABILITY.md §1).

A worker claims a job with one conditional UPDATE (queued, or running with an expired lease), renews the lease
while it trains, and writes results only while it still holds it (fencing). A redelivered message for a job whose
lease is live finds nothing to claim and is dropped. The reaper puts jobs of dead workers back in the queue and
re-sends queued jobs whose message was lost; after ``max_attempts`` a job fails with the reason.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session, lazyload

from models.registry import Job, JobEvent, JobState, utcnow

LEASE_TTL = timedelta(seconds=60)
QUEUED_RESEND_AFTER = timedelta(seconds=120)


class LeaseLost(Exception):
    """Another worker took the job over (our lease expired): stop at once, write nothing."""


def log_event(session: Session, job_id: uuid.UUID, kind: str, message: str = "", **data: object) -> None:
    owner = session.scalar(sa.select(Job.owner_id).where(Job.id == job_id)) or "local"
    session.add(JobEvent(job_id=job_id, owner_id=owner, kind=kind, message=message, data=dict(data)))


def claim(
    session: Session, job_id: uuid.UUID, worker: str, *, ttl: timedelta = LEASE_TTL, now: datetime | None = None
) -> bool:
    """Take the job if it is queued or its lease expired; one UPDATE, so two workers cannot both win."""
    now = now or utcnow()
    claimable = sa.or_(Job.state == JobState.QUEUED, sa.and_(Job.state == JobState.RUNNING, Job.lease_until < now))
    result = session.execute(
        sa.update(Job)
        .where(Job.id == job_id, claimable, Job.cancel_requested.is_(False), Job.attempt < Job.max_attempts)
        .values(
            state=JobState.RUNNING,
            worker=worker,
            lease_until=now + ttl,
            heartbeat_at=now,
            attempt=Job.attempt + 1,
            started_at=sa.func.coalesce(Job.started_at, now),
        )
        .execution_options(synchronize_session=False)
    )
    won = result.rowcount == 1
    log_event(session, job_id, "claimed" if won else "skipped", "" if won else "skipped: lease held", worker=worker)
    return won


def heartbeat(
    session: Session,
    job_id: uuid.UUID,
    worker: str,
    *,
    ttl: timedelta = LEASE_TTL,
    now: datetime | None = None,
    **progress: object,
) -> None:
    """Renew the lease (and write progress) — only while we hold it; otherwise raise ``LeaseLost``."""
    now = now or utcnow()
    result = session.execute(
        sa.update(Job)
        .where(Job.id == job_id, Job.worker == worker, Job.state == JobState.RUNNING)
        .values(lease_until=now + ttl, heartbeat_at=now, **progress)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        raise LeaseLost(f"job {job_id} is no longer leased to {worker}")


def finish(session: Session, job_id: uuid.UUID, worker: str, state: JobState, *, error: str | None = None) -> None:
    """Move the job to a terminal state, fenced: only the lease holder may."""
    result = session.execute(
        sa.update(Job)
        .where(Job.id == job_id, Job.worker == worker, Job.state == JobState.RUNNING)
        .values(state=state, error=error, finished_at=utcnow(), lease_until=None)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        raise LeaseLost(f"job {job_id} is no longer leased to {worker}; not marking it {state.value}")
    log_event(session, job_id, state.value, error or "", worker=worker)


def release(session: Session, job_id: uuid.UUID, worker: str) -> None:
    """Give the job back to the queue (graceful shutdown): it resumes from its checkpoint elsewhere."""
    session.execute(
        sa.update(Job)
        .where(Job.id == job_id, Job.worker == worker, Job.state == JobState.RUNNING)
        .values(state=JobState.QUEUED, worker=None, lease_until=None, queued_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    log_event(session, job_id, "released", worker=worker)


@dataclass
class Reaped:
    requeued: list[uuid.UUID]  # running with an expired lease -> queued again (to be re-sent)
    resend: list[uuid.UUID]  # queued too long without a claim -> message re-sent
    failed: list[uuid.UUID]  # out of attempts


def reap(session: Session, *, now: datetime | None = None, resend_after: timedelta = QUEUED_RESEND_AFTER) -> Reaped:
    """One sweep: expired leases back to the queue, lost messages re-sent, jobs out of attempts failed."""
    now = now or utcnow()
    expired = session.scalars(
        sa.select(Job)
        .options(lazyload(Job.mixture))
        .where(Job.state == JobState.RUNNING, Job.lease_until < now)
        .with_for_update(skip_locked=True, of=Job)
    ).all()
    reaped = Reaped([], [], [])
    for job in expired:
        if job.attempt >= job.max_attempts:
            job.state, job.finished_at, job.lease_until = JobState.FAILED, now, None
            job.error = f"the worker was lost {job.attempt} times (out of memory or killed?); giving up"
            reaped.failed.append(job.id)
            log_event(session, job.id, "failed", job.error)
        else:
            job.state, job.worker, job.lease_until, job.queued_at = JobState.QUEUED, None, None, now
            reaped.requeued.append(job.id)
            log_event(session, job.id, "requeued", "lease expired: worker lost", attempt=job.attempt)
    stale = session.scalars(
        sa.select(Job).where(
            Job.state == JobState.QUEUED, Job.queued_at < now - resend_after, Job.cancel_requested.is_(False)
        )
    ).all()
    for job in stale:
        job.queued_at = now
        reaped.resend.append(job.id)
        log_event(session, job.id, "resent", "queued without a claim: message re-sent")
    return reaped
