"""Shared fixtures: an isolated data dir per test, SQLite always, PostgreSQL and Redis when asked for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Before any studio module reads the environment: offline, no analytics, no writes to ./.studio.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["STUDIO_DATA_DIR"] = tempfile.mkdtemp(prefix="mole-test-session-")
for _name in ("DATABASE_URL", "BROKER_URL", "ARTIFACT_ROOT", "RESULT_BACKEND"):
    os.environ.pop(_name, None)
# Built-in bases are built once per checkout (the tiny one is pre-trained), then reused by every test and worker.
BASE_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "test-bases"
os.environ.setdefault("BASE_CACHE_DIR", str(BASE_CACHE))

import pytest  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from models.settings import Settings  # noqa: E402
from tests import services  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS_DIR = ROOT / "test-artifacts"


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh STUDIO_DATA_DIR for this test, also set in the environment for code that reads it."""
    folder = tmp_path / "studio"
    monkeypatch.setenv("STUDIO_DATA_DIR", str(folder))
    return folder


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return Settings(studio_data_dir=data_dir)


@pytest.fixture
def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'test.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test, dropped afterwards."""
    admin_url = services.ensure_postgres()
    name = f"mole_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as error:
        admin.dispose()
        services.missing(f"PostgreSQL ({error.orig})")
    yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Runs the test on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The real Redis, on a database number of its own for this test, flushed before and after."""
    import redis

    base = services.ensure_redis()
    db = 1 + uuid.uuid4().int % 14
    url = f"{base}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def bases_dir() -> Path:
    """The shared folder of built-in bases (see BASE_CACHE)."""
    path = Path(os.environ["BASE_CACHE_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def artifacts_dir() -> Path:
    """Where tests leave files a person should look at (screenshots); kept after the run."""
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    return ARTIFACTS_DIR


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start real ``mole-studio worker`` processes (own process group) with extra environment; stopped at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*, concurrency: int = 1, **env: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"worker-{len(started)}.log", "ab")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", "--loglevel=INFO", f"--concurrency={concurrency}"],
            cwd=ROOT,
            env=os.environ | env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def add_demo_datasets(ctx: object, lines: int = 40) -> None:
    """Register the first ``lines`` rows of each bundled demo task as a dataset named after the task."""
    from app.services.datasets import create_dataset
    from models.demo import demo_files

    for path in demo_files():
        data = b"".join(path.read_bytes().splitlines(keepends=True)[:lines])
        create_dataset(ctx=ctx, filename=path.name, data=data, name=path.stem)  # type: ignore[arg-type]


def demo_studio(data_dir: Path, bases_dir: Path, lines: int = 20) -> Any:
    """A migrated studio in ``data_dir`` whose datasets are the first ``lines`` rows of each demo task."""
    from app.context import StudioContext
    from migrations import upgrade_head

    settings = Settings(studio_data_dir=data_dir, base_cache_dir=bases_dir)
    upgrade_head(settings.db_url)
    ctx = StudioContext(settings=settings)
    add_demo_datasets(ctx, lines=lines)
    return ctx


def train_now(settings: Settings, mixture_id: uuid.UUID) -> uuid.UUID:
    """Queue a training job without sending it and run it here, to success; returns the job's id."""
    from worker.dispatch import submit_training
    from worker.jobs import run_job

    job_id = submit_training(settings, mixture_id, send=False)
    assert run_job(job_id, settings=settings) == "succeeded"
    return job_id
