"""Running jobs against a real database: registry writes on success, readable failures, cancel, no partial rows."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from app.context import ServiceError, StudioContext
from app.services.mixtures import save_mixture
from migrations import upgrade_head
from models.bases import BUILTIN_TINY
from models.demo import DEMO_TASKS, demo_spec
from models.registry import Expert, Job, JobEvent, JobState, Metric, Mixture, session_scope
from models.settings import Settings
from models.spec import MixtureSpec
from tests.conftest import add_demo_datasets
from worker.dispatch import cancel, submit_training
from worker.jobs import run_job


@pytest.fixture
def ctx(data_dir: Path, bases_dir: Path) -> StudioContext:
    settings = Settings(studio_data_dir=data_dir, base_cache_dir=bases_dir)
    upgrade_head(settings.db_url)
    context = StudioContext(settings=settings)
    add_demo_datasets(context)
    return context


def _mixture(ctx: StudioContext, steps: int = 4, **changes: object) -> uuid.UUID:
    spec = demo_spec(BUILTIN_TINY, router="softmax").model_dump(mode="json")
    spec["schedule"] |= {
        "kind": "joint",
        "stage_steps": [steps],
        "batch_size": 4,
        "checkpoint_every": 2,
        "eval_every": 1000,
        "max_length": 96,
    }
    mixture = save_mixture(
        ctx=ctx, name=f"m-{uuid.uuid4().hex[:6]}", spec_json=spec | changes, dataset_names=list(DEMO_TASKS)
    )
    return mixture.id


def _job(ctx: StudioContext, job_id: uuid.UUID) -> Job:
    with ctx.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def test_a_job_trains_and_registers_one_expert_per_trained_expert(ctx: StudioContext) -> None:
    mixture_id = _mixture(ctx)
    job_id = submit_training(ctx.settings, mixture_id, send=False)
    assert run_job(job_id, settings=ctx.settings) == "succeeded"
    job = _job(ctx, job_id)
    assert job.state is JobState.SUCCEEDED and job.step == job.total_steps == 4 and job.attempt == 1
    with ctx.session() as s:
        experts = s.scalars(sa.select(Expert).where(Expert.job_id == job_id)).all()
        assert sorted(e.name.rsplit("-", 1)[0] for e in experts) == sorted(
            ["universal-0", *[f"{t}-expert" for t in DEMO_TASKS]]
        )
        assert all(ctx.store.exists(e.adapter_key) for e in experts)
        assert s.get(Mixture, mixture_id).trained
        assert s.scalar(sa.select(sa.func.count()).select_from(Metric).where(Metric.job_id == job_id)) > 0
    assert run_job(job_id, settings=ctx.settings) == "skipped: lease held"  # a finished job is never run again


def test_a_queued_job_cancelled_never_runs(ctx: StudioContext) -> None:
    job_id = submit_training(ctx.settings, _mixture(ctx), send=False)
    assert cancel(ctx.settings, job_id) is JobState.CANCELLED
    assert run_job(job_id, settings=ctx.settings) == "skipped: lease held"
    assert _job(ctx, job_id).state is JobState.CANCELLED


def test_a_running_job_stops_within_a_step_of_cancel_and_keeps_its_checkpoint(ctx: StudioContext) -> None:
    job_id = submit_training(ctx.settings, _mixture(ctx, steps=400), send=False)
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(run_job(job_id, settings=ctx.settings)))
    thread.start()
    deadline = time.monotonic() + 300
    while _job(ctx, job_id).checkpoint_key is None and time.monotonic() < deadline:
        time.sleep(0.2)
    cancel(ctx.settings, job_id)
    step_at_cancel = _job(ctx, job_id).step
    thread.join(120)
    job = _job(ctx, job_id)
    assert outcome == ["cancelled"] and job.state is JobState.CANCELLED
    assert job.step <= step_at_cancel + 2  # stopped within about a step (one may be in flight)
    assert job.checkpoint_key and ctx.store.list(job.checkpoint_key)
    with ctx.session() as s:
        assert s.scalars(sa.select(Expert).where(Expert.job_id == job_id)).all() == []


def test_an_unknown_base_fails_with_its_name_and_registers_nothing(ctx: StudioContext) -> None:
    mixture_id = _mixture(ctx, base_model="nobody/no-such-model")
    job_id = submit_training(ctx.settings, mixture_id, send=False)
    assert run_job(job_id, settings=ctx.settings) == "failed"
    job = _job(ctx, job_id)
    assert job.state is JobState.FAILED and "nobody/no-such-model" in (job.error or "")
    with ctx.session() as s:
        assert s.scalars(sa.select(Expert)).all() == []
        assert not s.get(Mixture, mixture_id).trained
        kinds = list(s.scalars(sa.select(JobEvent.kind).where(JobEvent.job_id == job_id)))
        assert kinds[-1] == "failed"


def test_a_damaged_dataset_file_fails_the_job_with_a_reason(ctx: StudioContext) -> None:
    mixture_id = _mixture(ctx)
    with session_scope(ctx.settings.db_url) as s:
        key = s.get(Mixture, mixture_id).datasets[0].artifact_key
    ctx.store.put_bytes(key, b"\x00\x01 not json")
    job_id = submit_training(ctx.settings, mixture_id, send=False)
    assert run_job(job_id, settings=ctx.settings) == "failed"
    assert "binary" in (_job(ctx, job_id).error or "")


def test_a_mixture_naming_a_missing_dataset_is_refused_before_anything_is_stored(ctx: StudioContext) -> None:
    spec = demo_spec(BUILTIN_TINY).model_dump(mode="json")
    with pytest.raises(ServiceError, match="no dataset named nowhere"):
        save_mixture(ctx=ctx, name="broken", spec_json=spec, dataset_names=[*DEMO_TASKS[:3], "nowhere"])
    with ctx.session() as s:
        assert s.scalars(sa.select(Mixture).where(Mixture.name == "broken")).all() == []


def test_add_task_on_a_parent_with_a_pickle_adapter_fails_naming_it(ctx: StudioContext) -> None:
    parent_id = _mixture(ctx, steps=2)
    parent_job = submit_training(ctx.settings, parent_id, send=False)
    assert run_job(parent_job, settings=ctx.settings) == "succeeded"
    with ctx.session() as s:
        key = s.scalars(sa.select(Expert.adapter_key).where(Expert.job_id == parent_job)).first()
        parent = s.get(Mixture, parent_id)
        parent_spec, parent_name = MixtureSpec.model_validate(parent.spec_json), parent.name
    ctx.store.put_bytes(key.rsplit("/", 1)[0] + "/adapter_model.bin", b"\x80\x04not really a pickle")
    three = [t for t in DEMO_TASKS if t != "times"]
    child_spec = parent_spec.model_copy(
        update={"tasks": three, "experts": [e for e in parent_spec.experts if e.tasks != ["times"]]}
    )
    grown = MixtureSpec.model_validate(child_spec.model_dump()).with_task_expert("times", name="times-new")
    child = save_mixture(
        ctx=ctx,
        name="child",
        spec_json=grown.model_dump(mode="json"),
        dataset_names=list(DEMO_TASKS),
        parent=parent_name,
    )
    job_id = submit_training(ctx.settings, child.id, send=False)
    assert run_job(job_id, settings=ctx.settings) == "failed"
    assert "adapter_model.bin" in (_job(ctx, job_id).error or "")
    with ctx.session() as s:
        assert s.scalars(sa.select(Expert).where(Expert.job_id == job_id)).all() == []
