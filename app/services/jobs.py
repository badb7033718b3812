"""Jobs: the training queue as the UI shows it — progress, curves, events — and cancel / retry.

The Job row is the truth (RELIABILITY.md §1): everything here reads the registry the workers write
(``worker/jobs.py``: the Job's step/stage/error, ``Metric`` rows for losses, eval scores and the trainer's ETA,
``JobEvent`` rows for what happened), and acts through ``worker.dispatch`` so the UI and the CLI share one path.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.orm import Session, joinedload

from app.context import ServiceError, StudioContext
from models.registry import LOCAL_OWNER, TERMINAL_STATES, Job, JobEvent, JobState, Metric, Mixture
from worker import dispatch

log = logging.getLogger(__name__)

JOB_COLUMNS = ["job", "mixture", "state", "progress", "step", "stage", "attempt", "eta", "queued", "error"]
EVENT_COLUMNS = ["at", "event", "message"]
CURVE_COLUMNS = ["step", "value", "task"]
EVAL_METRICS = ("exact_match", "token_f1", "rouge_l", "accuracy", "task_weight")
DEFAULT_EVAL_METRIC = "exact_match"
ALL_TASKS = "all tasks"  # the series of the combined loss, beside the per-task ones
MAX_JOBS = 200  # the table shows the newest jobs; older ones stay in the registry
MAX_POINTS = 400  # steps per curve at most (long runs are thinned evenly, the last step always kept)
SHORT_ID = 8
_CHECKPOINT_STEP = re.compile(r"step-(\d+)$")


@dataclass
class JobDetail:
    """One job as the detail panel shows it."""

    job: str  # the short id the table shows
    id: str
    mixture: str
    state: str
    stage: str
    step: int
    total_steps: int
    progress: float  # percent
    attempt: int
    eta: str
    checkpoint_step: int | None
    error: str
    events: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=EVENT_COLUMNS))


@dataclass
class JobCurves:
    """Long-format curves for ``gr.LinePlot`` (x=step, y=value, color=task)."""

    loss: pd.DataFrame
    evals: pd.DataFrame  # the chosen eval metric only
    metric: str
    metrics: list[str]  # the eval metrics this job has recorded


@dataclass
class JobsPoll:
    """What one tick of the live view needs; ``detail`` and ``curves`` are None when the job did not move."""

    table: pd.DataFrame
    jobs: list[tuple[str, str]]  # (label, short id) for the job selector, newest first
    seen: str  # fingerprint of the selected job (state, step, attempt); unchanged = nothing new to draw
    detail: JobDetail | None = None
    curves: JobCurves | None = None


# --- reading ---------------------------------------------------------------------------------------------------


def list_jobs(*, ctx: StudioContext, owner: str = LOCAL_OWNER) -> pd.DataFrame:
    """The queue, newest first: state, progress (percent), step/total, stage, attempt, ETA and error."""
    with ctx.session() as s:
        return _table(_rows(s, owner))


def job_detail(*, ctx: StudioContext, job: str | None, owner: str = LOCAL_OWNER) -> JobDetail:
    """State, stage, progress, error and the event log of one job."""
    with ctx.session() as s:
        found = _find(s, job, owner)
        return _detail(found, _eta(s, found), _events(s, found.id))


def job_curves(
    *, ctx: StudioContext, job: str | None, metric: str = DEFAULT_EVAL_METRIC, owner: str = LOCAL_OWNER
) -> JobCurves:
    """Per-task training loss by step, and one eval metric per task by step, from the job's Metric rows."""
    metric = _check_metric(metric)
    with ctx.session() as s:
        found = _find(s, job, owner)
        return _curves(s, found.id, metric)


def poll_jobs(
    *,
    ctx: StudioContext,
    job: str | None = None,
    seen: str = "",
    metric: str = DEFAULT_EVAL_METRIC,
    owner: str = LOCAL_OWNER,
) -> JobsPoll:
    """One tick of the live view: a single query for the table; the selected job's events and curves are read
    only when it moved since ``seen`` (so an idle page costs one query per tick)."""
    metric = _check_metric(metric)
    with ctx.session() as s:
        rows = _rows(s, owner)
        poll = JobsPoll(table=_table(rows), jobs=[_choice(j) for j, _ in rows], seen="")
        match = [(j, eta) for j, eta in rows if job and j.id.hex.startswith(_key(job))]
        if len(match) != 1:
            return poll
        selected, eta = match[0]
        poll.seen = f"{selected.id.hex}:{selected.state.value}:{selected.step}:{selected.attempt}"
        if poll.seen != seen:
            poll.detail = _detail(selected, eta, _events(s, selected.id))
            poll.curves = _curves(s, selected.id, metric)
        return poll


def short_id(job: str | uuid.UUID) -> str:
    """The short id the table and the selector show for a job id (a UUID, its string, or a prefix of it)."""
    return (job.hex if isinstance(job, uuid.UUID) else _key(job))[:SHORT_ID]


def job_choices(*, ctx: StudioContext, owner: str = LOCAL_OWNER) -> list[tuple[str, str]]:
    """(label, short id) of the newest jobs, for a selector."""
    with ctx.session() as s:
        return [_choice(j) for j, _ in _rows(s, owner)]


# --- acting ----------------------------------------------------------------------------------------------------


def cancel_job(*, ctx: StudioContext, job: str | None, owner: str = LOCAL_OWNER) -> str:
    """Cancel a queued job, or ask a running one to stop (within a step, keeping its last checkpoint)."""
    with ctx.session() as s:
        found = _find(s, job, owner)
        job_id, short, state, asked = found.id, _short(found), found.state, found.cancel_requested
    if state in TERMINAL_STATES:
        raise ServiceError(f"job {short} already {state.value}; there is nothing to cancel")
    if asked:
        raise ServiceError(f"job {short} was already asked to stop; it stops at the end of its current step")
    try:
        now = dispatch.cancel(ctx.settings, job_id)
    except ValueError as error:
        raise ServiceError(f"job {short}: {error}") from error
    except Exception:  # the broker's revoke is only a courtesy: the Job row already says cancelled
        log.warning("cancel of job %s: revoking its message failed", job_id, exc_info=True)
        now = JobState.CANCELLED if state is JobState.QUEUED else state
    if now is JobState.CANCELLED:
        return f"Cancelled job {short} before it started."
    return f"Asked job {short} to stop: it stops within a step and keeps its last checkpoint; retry resumes it."


def retry_job(*, ctx: StudioContext, job: str | None, owner: str = LOCAL_OWNER) -> str:
    """Run a failed or cancelled job again, resuming from its last checkpoint when it has one."""
    with ctx.session() as s:
        found = _find(s, job, owner)
        short, state, ckpt = _short(found), found.state, _checkpoint_step(found.checkpoint_key)
        if state is JobState.SUCCEEDED:
            raise ServiceError(
                f"job {short} succeeded; there is nothing to retry (start a new run from the Compose tab)"
            )
        if state not in TERMINAL_STATES:
            raise ServiceError(f"job {short} is {state.value}; only a failed or cancelled job can be retried")
        _check_datasets(ctx, found)
        job_id = found.id
    if not dispatch.requeue(ctx.settings, job_id):
        raise ServiceError(f"job {short} changed state meanwhile; refresh and try again")
    start = f"resumes from its checkpoint at step {ckpt}" if ckpt is not None else "starts from step 0 (no checkpoint)"
    return f"Job {short} is queued again; it {start}."


# --- helpers ---------------------------------------------------------------------------------------------------


def _rows(s: Session, owner: str) -> list[tuple[Job, float | None]]:
    """The newest jobs with the trainer's latest ETA (running jobs only), in one query."""
    latest_eta = (
        sa.select(Metric.value)
        .where(Metric.job_id == Job.id, Metric.name == "eta_s")
        .order_by(Metric.step.desc(), Metric.created_at.desc())
        .limit(1)
        .correlate(Job)
        .scalar_subquery()
    )
    eta = sa.case((Job.state == JobState.RUNNING, latest_eta), else_=None)
    query = (
        sa.select(Job, eta)
        .options(joinedload(Job.mixture).lazyload(Mixture.datasets))
        .where(Job.owner_id == owner)
        .order_by(Job.queued_at.desc())
        .limit(MAX_JOBS)
    )
    return [(job, value) for job, value in s.execute(query).all()]


def _eta(s: Session, job: Job) -> float | None:
    if job.state is not JobState.RUNNING:
        return None
    return s.scalar(
        sa.select(Metric.value)
        .where(Metric.job_id == job.id, Metric.name == "eta_s")
        .order_by(Metric.step.desc(), Metric.created_at.desc())
        .limit(1)
    )


def _table(rows: Sequence[tuple[Job, float | None]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "job": _short(j),
                "mixture": j.mixture.name,
                "state": j.state.value,
                "progress": _progress(j),
                "step": f"{j.step}/{j.total_steps}",
                "stage": j.stage or "",
                "attempt": j.attempt,
                "eta": _format_eta(j, eta),
                "queued": _format_time(j.queued_at),
                "error": j.error or "",
            }
            for j, eta in rows
        ],
        columns=JOB_COLUMNS,
    ).astype({"progress": float, "attempt": int})


def _detail(job: Job, eta: float | None, events: pd.DataFrame) -> JobDetail:
    return JobDetail(
        job=_short(job),
        id=str(job.id),
        mixture=job.mixture.name,
        state=job.state.value,
        stage=job.stage or "",
        step=job.step,
        total_steps=job.total_steps,
        progress=_progress(job),
        attempt=job.attempt,
        eta=_format_eta(job, eta),
        checkpoint_step=_checkpoint_step(job.checkpoint_key),
        error=job.error or "",
        events=events,
    )


def _events(s: Session, job_id: uuid.UUID) -> pd.DataFrame:
    rows = s.execute(
        sa.select(JobEvent.created_at, JobEvent.kind, JobEvent.message)
        .where(JobEvent.job_id == job_id)
        .order_by(JobEvent.created_at, JobEvent.id)
    ).all()
    return pd.DataFrame([(_format_time(at), kind, message) for at, kind, message in rows], columns=EVENT_COLUMNS)


def _curves(s: Session, job_id: uuid.UUID, metric: str) -> JobCurves:
    """Latest value per (step, task, name): a resumed job re-records the steps after its checkpoint."""
    rows = s.execute(
        sa.select(Metric.step, Metric.task, Metric.name, Metric.value)
        .where(Metric.job_id == job_id, Metric.name != "eta_s")
        .order_by(Metric.created_at, Metric.id)
    ).all()
    frame = pd.DataFrame(rows, columns=["step", "task", "name", "value"])
    frame["task"] = frame["task"].fillna(ALL_TASKS)
    frame = frame.drop_duplicates(["step", "task", "name"], keep="last")
    loss = _long(frame[frame["name"] == "loss"])
    evals = frame[(frame["name"] != "loss") & (frame["task"] != ALL_TASKS)]
    metrics = [m for m in EVAL_METRICS if m in set(evals["name"])]
    return JobCurves(loss=loss, evals=_long(evals[evals["name"] == metric]), metric=metric, metrics=metrics)


def _long(frame: pd.DataFrame) -> pd.DataFrame:
    """step/value/task sorted by task then step, thinned to at most MAX_POINTS steps."""
    steps = sorted(frame["step"].unique())
    if len(steps) > MAX_POINTS:
        stride = -(-len(steps) // MAX_POINTS)
        keep = set(steps[::stride]) | {steps[-1]}
        frame = frame[frame["step"].isin(keep)]
    out = frame.sort_values(["task", "step"])[CURVE_COLUMNS].reset_index(drop=True)
    return out.astype({"step": int, "value": float, "task": str})


def _find(s: Session, job: str | None, owner: str) -> Job:
    """The owner's job whose id is ``job`` or starts with it (the table shows the first 8 hex digits)."""
    if not job or not str(job).strip():
        raise ServiceError("choose a job first")
    key = _key(job)
    if not re.fullmatch(r"[0-9a-f]{4,32}", key):
        raise ServiceError(f"no job '{job}'")
    ids = [i for i in s.scalars(sa.select(Job.id).where(Job.owner_id == owner)) if i.hex.startswith(key)]
    if not ids:
        raise ServiceError(f"no job '{job}'")
    if len(ids) > 1:
        raise ServiceError(f"'{job}' names {len(ids)} jobs; give more of the job id")
    found = s.get(Job, ids[0])
    assert found is not None
    return found


def _check_metric(metric: str | None) -> str:
    metric = metric or DEFAULT_EVAL_METRIC
    if metric not in EVAL_METRICS:
        raise ServiceError(f"unknown eval metric '{metric}' (one of: {', '.join(EVAL_METRICS)})")
    return metric


def _check_datasets(ctx: StudioContext, job: Job) -> None:
    """Refuse a retry that could only fail again for want of its data."""
    datasets = job.mixture.datasets
    if not datasets:
        raise ServiceError(f"mixture '{job.mixture.name}' has no datasets any more; attach one and train again")
    missing = [d.name for d in datasets if not ctx.store.exists(d.artifact_key)]
    if missing:
        names = ", ".join(f"'{n}'" for n in missing)
        raise ServiceError(f"the file of dataset {names} is missing from the artifact store; upload it again first")


def _key(job: str) -> str:
    return str(job).strip().lower().replace("-", "")


def _short(job: Job) -> str:
    return job.id.hex[:SHORT_ID]


def _choice(job: Job) -> tuple[str, str]:
    return f"{_short(job)} · {job.mixture.name}", _short(job)


def _progress(job: Job) -> float:
    if job.state is JobState.SUCCEEDED:
        return 100.0
    return round(100.0 * min(job.step, job.total_steps) / job.total_steps, 1) if job.total_steps else 0.0


def _checkpoint_step(key: str | None) -> int | None:
    match = _CHECKPOINT_STEP.search(key or "")
    return int(match.group(1)) if match else None


def _format_eta(job: Job, eta_s: float | None) -> str:
    if job.state is not JobState.RUNNING or eta_s is None:
        return ""
    seconds = max(0, round(eta_s))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def _format_time(at: datetime | None) -> str:
    """UTC, to the second (SQLite hands back naive datetimes; they are UTC too)."""
    if at is None:
        return ""
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
