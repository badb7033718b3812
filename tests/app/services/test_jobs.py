"""Jobs services against a real SQLite registry: the table, detail and curves of real tiny runs, cancel, retry."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from app.context import ServiceError, StudioContext
from app.services import jobs as services
from app.services.mixtures import save_mixture
from migrations import upgrade_head
from models.bases import BUILTIN_TINY
from models.demo import DEMO_TASKS, demo_spec
from models.registry import Job, JobEvent, JobState, Metric, Mixture, session_factory, utcnow
from models.settings import Settings
from tests.conftest import add_demo_datasets
from worker.dispatch import submit_training
from worker.jobs import run_job
from worker.lease import log_event
from worker.trainer import Progress

STEPS, FAIL_AT = 4, 3  # checkpoints every 2 steps: the failed attempt leaves one at step 2


def studio_context(folder: Path, bases_dir: Path) -> StudioContext:
    settings = Settings(studio_data_dir=folder, base_cache_dir=bases_dir)
    upgrade_head(settings.db_url)
    return StudioContext(settings=settings)


def new_mixture(ctx: StudioContext, steps: int = STEPS, name: str | None = None) -> uuid.UUID:
    """The demo mixture on the tiny base, trained jointly for ``steps`` steps (eval only at the end)."""
    spec = demo_spec(BUILTIN_TINY, router="softmax").model_dump(mode="json")
    spec["schedule"] |= {
        "kind": "joint",
        "stage_steps": [steps],
        "batch_size": 4,
        "checkpoint_every": 2,
        "eval_every": 1000,
        "max_length": 96,
    }
    name = name or f"m-{uuid.uuid4().hex[:6]}"
    return save_mixture(ctx=ctx, name=name, spec_json=spec, dataset_names=list(DEMO_TASKS)).id


class Boom(RuntimeError):
    """A failure in the middle of training (what an out-of-memory error would look like)."""


def fail_at(step: int):  # noqa: ANN201 - a progress hook
    def hook(progress: Progress) -> None:
        if progress.step == step:
            raise Boom(f"boom at step {step}")

    return hook


@dataclass
class Retried:
    """A job that failed at step 3 (checkpoint at 2), was retried, and ran to the end."""

    folder: Path
    job_id: uuid.UUID
    failed: services.JobDetail
    message: str
    steps_after_retry: list[int]


def fail_then_retry(folder: Path, bases_dir: Path) -> Retried:
    ctx = studio_context(folder, bases_dir)
    add_demo_datasets(ctx, lines=10)
    job_id = submit_training(ctx.settings, new_mixture(ctx, name="demo"), send=False)
    assert run_job(job_id, settings=ctx.settings, on_progress=fail_at(FAIL_AT)) == "failed"
    failed = services.job_detail(ctx=ctx, job=job_id.hex[:8])
    message = services.retry_job(ctx=ctx, job=job_id.hex[:8])
    steps: list[int] = []
    assert run_job(job_id, settings=ctx.settings, on_progress=lambda p: steps.append(p.step)) == "succeeded"
    return Retried(folder, job_id, failed, message, steps)


@pytest.fixture(scope="module")
def retried(tmp_path_factory: pytest.TempPathFactory, bases_dir: Path) -> Retried:
    return fail_then_retry(tmp_path_factory.mktemp("jobs-services") / "studio", bases_dir)


@pytest.fixture
def run_ctx(retried: Retried, tmp_path: Path, bases_dir: Path) -> StudioContext:
    """A private copy of the retried run's registry."""
    folder = tmp_path / "studio"
    shutil.copytree(retried.folder, folder)
    return studio_context(folder, bases_dir)


@pytest.fixture
def ctx(data_dir: Path, bases_dir: Path) -> StudioContext:
    context = studio_context(data_dir, bases_dir)
    add_demo_datasets(context, lines=10)
    return context


def _job(ctx: StudioContext, job_id: uuid.UUID) -> Job:
    with ctx.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def test_a_failed_job_shows_its_error_and_retry_resumes_from_its_checkpoint(retried: Retried, bases_dir: Path) -> None:
    short = retried.job_id.hex[:8]
    failed = retried.failed
    assert (failed.state, failed.error) == ("failed", f"Boom: boom at step {FAIL_AT}")
    assert 1 <= failed.step <= FAIL_AT and failed.checkpoint_step == 2 and failed.attempt == 1  # progress is throttled
    assert list(failed.events["event"]) == ["queued", "claimed", "checkpoint", "failed"]
    assert retried.message == f"Job {short} is queued again; it resumes from its checkpoint at step 2."
    assert retried.steps_after_retry == [3, 4]  # the step count continues from the checkpoint, not from 1
    ctx = studio_context(retried.folder, bases_dir)  # reading only
    detail = services.job_detail(ctx=ctx, job=short)
    assert (detail.state, detail.step, detail.progress, detail.attempt, detail.error) == ("succeeded", 4, 100, 2, "")
    events = list(detail.events["event"])
    assert events[events.index("failed") :] == ["failed", "retried", "claimed", "resumed", "checkpoint", "succeeded"]
    assert detail.events["message"][events.index("resumed")] == "resumed at step 2"


def test_curves_are_long_per_task_frames_with_the_resumed_steps_once(run_ctx: StudioContext, retried: Retried) -> None:
    curves = services.job_curves(ctx=run_ctx, job=retried.job_id.hex[:8])
    assert list(curves.loss.columns) == ["step", "value", "task"] == list(curves.evals.columns)
    assert set(curves.loss["task"]) == {*DEMO_TASKS, services.ALL_TASKS}
    for _task, steps in curves.loss.groupby("task")["step"]:  # a task is missing from the steps it had no rows in
        assert list(steps) == sorted(set(steps)) and set(steps) <= {1, 2, 3, 4}
    assert set(curves.loss[curves.loss["task"] == services.ALL_TASKS]["step"]) >= {1, STEPS}  # progress is throttled
    assert (curves.loss["value"] > 0).all()
    assert curves.metric == "exact_match" and {"exact_match", "token_f1", "task_weight"} <= set(curves.metrics)
    assert sorted(curves.evals["task"]) == sorted(DEMO_TASKS) and set(curves.evals["step"]) == {STEPS}
    assert curves.evals["value"].between(0, 1).all()
    weights = services.job_curves(ctx=run_ctx, job=str(retried.job_id), metric="task_weight")
    assert weights.metric == "task_weight" and len(weights.evals) == len(DEMO_TASKS)
    with pytest.raises(ServiceError, match="unknown eval metric 'bleu'"):
        services.job_curves(ctx=run_ctx, job=retried.job_id.hex[:8], metric="bleu")


def test_a_succeeded_job_is_not_retried_nor_cancelled(run_ctx: StudioContext, retried: Retried) -> None:
    short = retried.job_id.hex[:8]
    with pytest.raises(ServiceError, match=f"job {short} succeeded; there is nothing to retry"):
        services.retry_job(ctx=run_ctx, job=short)
    with pytest.raises(ServiceError, match=f"job {short} already succeeded; there is nothing to cancel"):
        services.cancel_job(ctx=run_ctx, job=short)
    job = _job(run_ctx, retried.job_id)
    assert job.state is JobState.SUCCEEDED and not job.cancel_requested


def test_the_table_shows_state_progress_step_stage_attempt_eta_and_error(ctx: StudioContext) -> None:
    mixture_id = new_mixture(ctx, name="shown")
    with ctx.session() as s:
        now = utcnow()
        common = {"mixture_id": mixture_id, "spec_json": {}, "total_steps": 40}
        running = Job(**common, state=JobState.RUNNING, step=10, stage="joint", attempt=1, queued_at=now)
        failed = Job(
            **common, state=JobState.FAILED, step=7, attempt=3, error="out of memory", queued_at=now - timedelta(1)
        )
        s.add_all([running, failed])
        s.flush()
        s.add_all(
            Metric(job_id=running.id, step=step, task=None, name="eta_s", value=eta)
            for step, eta in ((8, 200.0), (10, 95.4))
        )
        s.add(Metric(job_id=failed.id, step=7, task=None, name="eta_s", value=999.0))
    table = services.list_jobs(ctx=ctx)
    assert list(table.columns) == services.JOB_COLUMNS
    rows = table.set_index("job").to_dict("index")
    assert rows[running.id.hex[:8]] | {"queued": ""} == {
        "mixture": "shown",
        "state": "running",
        "progress": 25.0,
        "step": "10/40",
        "stage": "joint",
        "attempt": 1,
        "eta": "1m 35s",
        "queued": "",
        "error": "",
    }
    assert rows[failed.id.hex[:8]]["eta"] == "" and rows[failed.id.hex[:8]]["error"] == "out of memory"
    assert list(table["job"]) == [running.id.hex[:8], failed.id.hex[:8]]  # newest first
    poll = services.poll_jobs(ctx=ctx, job=running.id.hex[:8])
    assert poll.detail is not None and poll.detail.eta == "1m 35s" and poll.curves is not None
    statements: list[str] = []
    engine = session_factory(ctx.settings.db_url).kw["bind"]
    listener = lambda *args: statements.append(args[2])  # noqa: E731 - (conn, cursor, statement, ...)
    sa.event.listen(engine, "before_cursor_execute", listener)
    try:
        again = services.poll_jobs(ctx=ctx, job=running.id.hex[:8], seen=poll.seen)
    finally:
        sa.event.remove(engine, "before_cursor_execute", listener)
    assert again.detail is None and again.curves is None and again.table.equals(poll.table)
    assert len(statements) == 1  # an idle tick of the live view costs one query


def test_bad_job_ids_are_refused_with_a_message(ctx: StudioContext) -> None:
    for fn in (services.job_detail, services.job_curves, services.cancel_job, services.retry_job):
        with pytest.raises(ServiceError, match="choose a job first"):
            fn(ctx=ctx, job="")
        with pytest.raises(ServiceError, match="no job 'deadbeef'"):
            fn(ctx=ctx, job="deadbeef")
        with pytest.raises(ServiceError, match="no job '../etc'"):
            fn(ctx=ctx, job="../etc")
    job_id = submit_training(ctx.settings, new_mixture(ctx), send=False)
    with pytest.raises(ServiceError, match="no job"):
        services.job_detail(ctx=ctx, job=job_id.hex[:8], owner="someone-else")


def test_cancel_a_queued_job_then_again(ctx: StudioContext) -> None:
    job_id = submit_training(ctx.settings, new_mixture(ctx), send=False)
    short = job_id.hex[:8]
    assert services.cancel_job(ctx=ctx, job=short) == f"Cancelled job {short} before it started."
    assert _job(ctx, job_id).state is JobState.CANCELLED
    assert run_job(job_id, settings=ctx.settings) == "skipped: lease held"
    with pytest.raises(ServiceError, match=f"job {short} already cancelled"):
        services.cancel_job(ctx=ctx, job=short)
    message = services.retry_job(ctx=ctx, job=short)
    assert message == f"Job {short} is queued again; it starts from step 0 (no checkpoint)."
    job = _job(ctx, job_id)
    assert job.state is JobState.QUEUED and not job.cancel_requested and job.max_attempts == job.attempt + 3
    assert job.celery_task_id  # a real wake-up message in the embedded broker; cancelling revokes it
    with pytest.raises(ServiceError, match=f"job {short} is queued; only a failed or cancelled"):
        services.retry_job(ctx=ctx, job=short)
    assert services.cancel_job(ctx=ctx, job=short) == f"Cancelled job {short} before it started."


def test_a_running_job_is_asked_to_stop(ctx: StudioContext) -> None:
    job_id = submit_training(ctx.settings, new_mixture(ctx), send=False)
    with ctx.session() as s:
        s.execute(sa.update(Job).where(Job.id == job_id).values(state=JobState.RUNNING, worker="w"))
    short = job_id.hex[:8]
    assert services.cancel_job(ctx=ctx, job=short).startswith(f"Asked job {short} to stop")
    job = _job(ctx, job_id)
    assert job.state is JobState.RUNNING and job.cancel_requested
    with pytest.raises(ServiceError, match="already asked to stop"):
        services.cancel_job(ctx=ctx, job=short)


def test_a_job_whose_dataset_file_is_gone_fails_naming_it_and_is_not_retried(ctx: StudioContext) -> None:
    mixture_id = new_mixture(ctx)
    with ctx.session() as s:
        dataset = next(d for d in s.get(Mixture, mixture_id).datasets if d.name == "dates")
        key = dataset.artifact_key
    ctx.store.delete(key)
    job_id = submit_training(ctx.settings, mixture_id, send=False)
    assert run_job(job_id, settings=ctx.settings) == "failed"
    detail = services.job_detail(ctx=ctx, job=job_id.hex[:8])
    assert detail.state == "failed" and "dataset 'dates' is missing from the artifact store" in detail.error
    assert services.list_jobs(ctx=ctx)["error"][0] == detail.error
    with pytest.raises(ServiceError, match="the file of dataset 'dates' is missing"):
        services.retry_job(ctx=ctx, job=job_id.hex[:8])
    with ctx.session() as s:
        assert _job(ctx, job_id).state is JobState.FAILED
        kinds = list(s.scalars(sa.select(JobEvent.kind).where(JobEvent.job_id == job_id)))
        assert "retried" not in kinds


def test_events_are_listed_in_order(ctx: StudioContext) -> None:
    job_id = submit_training(ctx.settings, new_mixture(ctx), send=False)
    with ctx.session() as s:
        log_event(s, job_id, "note", "a <b>message</b>")
    detail = services.job_detail(ctx=ctx, job=str(job_id))
    assert list(detail.events["event"]) == ["queued", "note"] and detail.events["message"][1] == "a <b>message</b>"
    assert detail.job == services.short_id(job_id) == job_id.hex[:8] and detail.progress == 0
