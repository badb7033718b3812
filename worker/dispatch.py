"""Creating jobs and waking workers for them. The Job row comes first; the Celery message is only a wake-up."""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import timedelta

import sqlalchemy as sa

from models.registry import Job, JobState, Mixture, session_scope, utcnow
from models.settings import Settings
from models.spec import MixtureSpec
from worker.lease import log_event, reap

log = logging.getLogger(__name__)
RETRY_ATTEMPTS = 3  # attempts a retried job gets, as many as a new one


def submit_training(settings: Settings, mixture_id: uuid.UUID, *, send: bool = True) -> uuid.UUID:
    """Queue a training job for a saved mixture, with a snapshot of its spec, then wake a worker."""
    with session_scope(settings.db_url) as s:
        mixture = s.get(Mixture, mixture_id)
        if mixture is None:
            raise ValueError("no such mixture")
        if not mixture.datasets:
            raise ValueError(f"mixture '{mixture.name}' has no datasets to train on")
        spec = MixtureSpec.model_validate(mixture.spec_json)  # the snapshot the trainer will get, unchanged
        total = sum(spec.schedule.stage_steps)
        job = Job(
            mixture_id=mixture.id, owner_id=mixture.owner_id, spec_json=spec.model_dump(mode="json"), total_steps=total
        )
        s.add(job)
        s.flush()
        log_event(s, job.id, "queued", f"{spec.schedule.kind} schedule, {total} steps")
        job_id = job.id
    if send:
        dispatch(settings, job_id)
    return job_id


def dispatch(settings: Settings, job_id: uuid.UUID) -> None:
    """Send the wake-up message; its task id is kept so a queued job can be revoked."""
    from worker.celery_app import create_celery

    result = create_celery(settings).send_task("studio.train", args=[str(job_id)])
    with session_scope(settings.db_url) as s:
        s.execute(sa.update(Job).where(Job.id == job_id).values(celery_task_id=result.id))


def cancel(settings: Settings, job_id: uuid.UUID) -> JobState:
    """Ask a job to stop: a running one stops within a step; a queued one is cancelled and its message revoked."""
    with session_scope(settings.db_url) as s:
        job = s.get(Job, job_id)
        if job is None:
            raise ValueError("no such job")
        job.cancel_requested = True
        if job.state is JobState.QUEUED:
            job.state = JobState.CANCELLED
            log_event(s, job.id, "cancelled", "cancelled before it started")
        state, task_id = job.state, job.celery_task_id
    if state is JobState.CANCELLED and task_id:
        from worker.celery_app import create_celery

        create_celery(settings).control.revoke(task_id)
    return state


def requeue(settings: Settings, job_id: uuid.UUID, *, send: bool = True) -> bool:
    """Put a failed or cancelled job back in the queue (a person's retry); it resumes from its last checkpoint.

    One conditional UPDATE, so two retries cannot both win and a job that is not failed or cancelled is left as is
    (returns False). The attempts it may still use start again from where it stands.
    """
    with session_scope(settings.db_url) as s:
        result = s.execute(
            sa.update(Job)
            .where(Job.id == job_id, Job.state.in_([JobState.FAILED, JobState.CANCELLED]))
            .values(
                state=JobState.QUEUED,
                cancel_requested=False,
                error=None,
                worker=None,
                lease_until=None,
                finished_at=None,
                celery_task_id=None,
                queued_at=utcnow(),
                max_attempts=Job.attempt + RETRY_ATTEMPTS,
            )
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:
            return False
        log_event(s, job_id, "retried", "queued again; resumes from its last checkpoint")
    if send:
        dispatch(settings, job_id)
    return True


def reap_and_resend(settings: Settings) -> None:
    """One reaper sweep, then wake workers for every job it put back in the queue."""
    with session_scope(settings.db_url) as s:
        reaped = reap(s, resend_after=timedelta(seconds=settings.queued_resend_s))
    for job_id in reaped.requeued + reaped.resend:
        dispatch(settings, job_id)
    if reaped.requeued or reaped.failed:
        log.warning("reaper: requeued %s, failed %s", reaped.requeued, reaped.failed)


class Reaper(threading.Thread):
    """Sweeps every ``interval`` seconds in the app and in every worker (RELIABILITY.md §1)."""

    def __init__(self, settings: Settings, interval: float | None = None) -> None:
        super().__init__(daemon=True, name="reaper")
        self.settings, self.stopped = settings, threading.Event()
        self.interval = interval or settings.reap_every_s

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                reap_and_resend(self.settings)
            except Exception:  # the reaper must outlive a database hiccup
                log.exception("reaper sweep failed")
