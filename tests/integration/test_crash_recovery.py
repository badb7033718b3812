"""Real worker processes, real Redis: kill -9, Redis restart, a job longer than the visibility timeout, cancel,
and the embedded default — every job ends exactly once with one set of experts (RELIABILITY.md §1)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from app.context import StudioContext
from app.services.mixtures import save_mixture
from migrations import upgrade_head
from models.bases import BUILTIN_TINY
from models.demo import DEMO_TASKS, demo_spec
from models.registry import Expert, Job, JobEvent, JobState
from models.settings import Settings
from tests import services
from tests.conftest import add_demo_datasets
from worker.dispatch import cancel, submit_training

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FAST_RECOVERY = {"LEASE_TTL_S": "6", "QUEUED_RESEND_S": "4", "REAP_EVERY_S": "1"}


def _ctx(data_dir: Path, bases_dir: Path, broker_url: str | None) -> StudioContext:
    settings = Settings(
        studio_data_dir=data_dir,
        base_cache_dir=bases_dir,
        broker_url=broker_url,
        lease_ttl_s=6,
        queued_resend_s=4,
        reap_every_s=1,
    )
    upgrade_head(settings.db_url)
    ctx = StudioContext(settings=settings)
    add_demo_datasets(ctx)
    return ctx


def _env(ctx: StudioContext, **extra: str) -> dict[str, str]:
    env = {"STUDIO_DATA_DIR": str(ctx.settings.studio_data_dir), "BASE_CACHE_DIR": str(ctx.settings.bases_data_dir)}
    if ctx.settings.broker_url:
        env["BROKER_URL"] = ctx.settings.broker_url
    return env | FAST_RECOVERY | extra


def _mixture(ctx: StudioContext, steps: int, checkpoint_every: int = 15) -> uuid.UUID:
    spec = demo_spec(BUILTIN_TINY, router="softmax").model_dump(mode="json")
    spec["schedule"] |= {
        "kind": "joint",
        "stage_steps": [steps],
        "batch_size": 4,
        "checkpoint_every": checkpoint_every,
        "eval_every": 10_000,
        "max_length": 96,
    }
    return save_mixture(ctx=ctx, name=f"m-{uuid.uuid4().hex[:6]}", spec_json=spec, dataset_names=list(DEMO_TASKS)).id


def _job(ctx: StudioContext, job_id: uuid.UUID) -> Job:
    with ctx.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def _wait(ctx: StudioContext, job_id: uuid.UUID, done: Callable[[Job], bool], seconds: float) -> Job:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job = _job(ctx, job_id)
        if done(job):
            return job
        time.sleep(0.3)
    pytest.fail(f"job {job_id} did not get there in {seconds} s: {_job(ctx, job_id).state}")


def _events(ctx: StudioContext, job_id: uuid.UUID) -> list[JobEvent]:
    with ctx.session() as s:
        return list(s.scalars(sa.select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.created_at)))


def _one_set_of_experts(ctx: StudioContext, job_id: uuid.UUID) -> None:
    with ctx.session() as s:
        names = sorted(s.scalars(sa.select(Expert.name).where(Expert.job_id == job_id)))
    assert len(names) == len(DEMO_TASKS) + 1, names
    assert [e.kind for e in _events(ctx, job_id)].count("succeeded") == 1


def _terminal(job: Job) -> bool:
    return job.state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


def test_kill_9_of_the_worker_resumes_from_the_last_checkpoint(
    data_dir: Path, bases_dir: Path, redis_url: str, start_worker: Callable[..., subprocess.Popen]
) -> None:
    ctx = _ctx(data_dir, bases_dir, redis_url)
    first = start_worker(**_env(ctx))
    job_id = submit_training(ctx.settings, _mixture(ctx, steps=240))
    _wait(ctx, job_id, lambda j: j.checkpoint_key is not None and j.step >= 15, 240)
    os.killpg(first.pid, signal.SIGKILL)  # main process and pool child, like a container kill
    first.wait()
    start_worker(**_env(ctx))
    job = _wait(ctx, job_id, _terminal, 300)
    assert job.state is JobState.SUCCEEDED, job.error
    assert job.attempt == 2
    resumed = [e for e in _events(ctx, job_id) if e.kind == "resumed"]
    assert resumed and resumed[0].data["step"] >= 15  # from the checkpoint, not from step 0
    _one_set_of_experts(ctx, job_id)


@pytest.fixture
def own_redis(tmp_path: Path) -> Callable[[], str]:
    """A Redis of this test's own on a free port (never the shared one), without persistence, restartable."""
    if shutil.which("redis-server") is None:
        services.missing("redis-server")
    port = services.free_port()
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> str:
        for old in processes:
            old.terminate()
            old.wait(10)
        processes.append(
            subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(tmp_path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        deadline = time.monotonic() + 10
        while not services.port_open("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.1)
        return f"redis://127.0.0.1:{port}/0"

    yield start
    for process in processes:
        process.terminate()
        process.wait(10)


def test_a_queued_job_survives_a_redis_restart(
    data_dir: Path, bases_dir: Path, own_redis: Callable[[], str], start_worker: Callable[..., subprocess.Popen]
) -> None:
    url = own_redis()
    ctx = _ctx(data_dir, bases_dir, url)
    job_id = submit_training(ctx.settings, _mixture(ctx, steps=20))  # no worker yet: the message waits in Redis
    own_redis()  # restart without persistence: the queued message is gone
    start_worker(**_env(ctx))
    job = _wait(ctx, job_id, _terminal, 240)
    assert job.state is JobState.SUCCEEDED, job.error
    assert "resent" in [e.kind for e in _events(ctx, job_id)]
    _one_set_of_experts(ctx, job_id)


def test_a_job_longer_than_the_visibility_timeout_runs_once(
    data_dir: Path, bases_dir: Path, redis_url: str, start_worker: Callable[..., subprocess.Popen]
) -> None:
    ctx = _ctx(data_dir, bases_dir, redis_url)
    start_worker(concurrency=2, **_env(ctx, VISIBILITY_TIMEOUT_S="2"))
    job_id = submit_training(ctx.settings, _mixture(ctx, steps=500, checkpoint_every=100))
    job = _wait(ctx, job_id, _terminal, 600)
    assert job.state is JobState.SUCCEEDED, job.error
    assert job.attempt == 1
    assert "skipped" in [e.kind for e in _events(ctx, job_id)]  # Redis redelivered it; the lease turned it away
    _one_set_of_experts(ctx, job_id)


def test_cancel_stops_a_running_job_on_a_real_worker(
    data_dir: Path, bases_dir: Path, redis_url: str, start_worker: Callable[..., subprocess.Popen]
) -> None:
    ctx = _ctx(data_dir, bases_dir, redis_url)
    start_worker(**_env(ctx))
    job_id = submit_training(ctx.settings, _mixture(ctx, steps=2000))
    _wait(ctx, job_id, lambda j: j.step >= 3, 240)
    cancel(ctx.settings, job_id)
    job = _wait(ctx, job_id, _terminal, 60)
    assert job.state is JobState.CANCELLED and job.step < 2000
    with ctx.session() as s:
        assert s.scalars(sa.select(Expert).where(Expert.job_id == job_id)).all() == []


def test_the_embedded_default_runs_the_same_job_end_to_end(
    data_dir: Path, bases_dir: Path, start_worker: Callable[..., subprocess.Popen]
) -> None:
    ctx = _ctx(data_dir, bases_dir, None)
    start_worker(**_env(ctx))
    job_id = submit_training(ctx.settings, _mixture(ctx, steps=20))
    job = _wait(ctx, job_id, _terminal, 240)
    assert job.state is JobState.SUCCEEDED, job.error
    _one_set_of_experts(ctx, job_id)
