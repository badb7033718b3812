"""Running a training job: claim its lease, train from the job's spec snapshot, record the outcome — fenced.

Plain functions (the Celery tasks and the CLI call them). The Job row is the truth: a job runs only under a
live lease, renews it from a heartbeat thread while it trains, and writes Expert rows and its terminal state in
one transaction that only the lease holder can commit. Files reach the artifact store before that transaction,
so a registry row never points at a missing file.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from models.data import ExampleRow, load_rows
from models.mixture import read_manifest
from models.registry import Dataset, Expert, ExpertKind, Job, JobState, Metric, Mixture, session_scope
from models.settings import Settings
from models.spec import MixtureSpec
from models.storage import ArtifactNotFoundError, ArtifactStore
from worker.lease import LeaseLost, claim, finish, heartbeat, log_event
from worker.trainer import Progress, Trainer, TrainerHooks, TrainingCancelled

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 1.0


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def experts_prefix(job: Job) -> str:
    return f"runs/{job.owner_id}/{job.id.hex}/experts"


def checkpoint_prefix(job: Job) -> str:
    return f"checkpoints/{job.owner_id}/{job.id.hex}"


def dataset_rows(store: ArtifactStore, dataset: Dataset) -> list[ExampleRow]:
    """Rows of a registered dataset, read back from its file and validated again (the file is the truth)."""
    default_task = dataset.tasks[0] if len(dataset.tasks) == 1 else None
    filename = f"{dataset.name}.{dataset.format}"
    try:
        data = store.get_bytes(dataset.artifact_key)
    except ArtifactNotFoundError:
        raise ValueError(
            f"the file of dataset '{dataset.name}' is missing from the artifact store (deleted?); "
            "upload the dataset again"
        ) from None
    return load_rows(data, filename, default_task=default_task)


def download_folder(store: ArtifactStore, prefix: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    for key in store.list(prefix):
        store.get_file(key, into / key.rsplit("/", 1)[1])
    return into


class _Heartbeat(threading.Thread):
    """Renews the lease every TTL/3 while the job runs; remembers if the lease was lost."""

    def __init__(self, db_url: str, job_id: uuid.UUID, worker: str, ttl: timedelta) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job_id.hex[:8]}")
        self.db_url, self.job_id, self.worker, self.ttl = db_url, job_id, worker, ttl
        self.stopped, self.lost = threading.Event(), False
        self.progress: dict[str, object] = {}

    def run(self) -> None:
        while not self.stopped.wait(self.ttl.total_seconds() / 3):
            self.beat()

    def beat(self) -> None:
        try:
            with session_scope(self.db_url) as s:
                heartbeat(s, self.job_id, self.worker, ttl=self.ttl, **self.progress)
        except LeaseLost:
            self.lost = True
            self.stopped.set()


@dataclass
class _Recorder:
    """Trainer hooks that write progress, metrics and checkpoints to the registry (progress throttled)."""

    db_url: str
    job_id: uuid.UUID
    owner: str
    beat: _Heartbeat
    last_write: float = 0.0

    def progress(self, p: Progress) -> None:
        self.beat.progress = {"step": p.step, "total_steps": p.total, "stage": p.stage}
        now = time.monotonic()
        if now - self.last_write < PROGRESS_EVERY_S and p.step != p.total:
            return
        self.last_write = now
        rows = [
            Metric(job_id=self.job_id, owner_id=self.owner, step=p.step, task=t, name="loss", value=v)
            for t, v in p.task_losses.items()
        ]
        rows.append(Metric(job_id=self.job_id, owner_id=self.owner, step=p.step, task=None, name="loss", value=p.loss))
        if p.eta_s is not None:
            rows.append(Metric(job_id=self.job_id, owner_id=self.owner, step=p.step, name="eta_s", value=p.eta_s))
        with session_scope(self.db_url) as s:
            heartbeat(s, self.job_id, self.beat.worker, ttl=self.beat.ttl, **self.beat.progress)
            s.add_all(rows)

    def metrics(self, step: int, metrics: dict[str, dict[str, float]], weights: dict[str, float]) -> None:
        with session_scope(self.db_url) as s:
            for task, values in metrics.items():
                s.add_all(
                    Metric(job_id=self.job_id, owner_id=self.owner, step=step, task=task, name=name, value=value)
                    for name, value in values.items()
                )
            s.add_all(
                Metric(job_id=self.job_id, owner_id=self.owner, step=step, task=task, name="task_weight", value=value)
                for task, value in weights.items()
            )

    def resumed(self, step: int) -> None:
        with session_scope(self.db_url) as s:
            log_event(s, self.job_id, "resumed", f"resumed at step {step}", step=step)

    def checkpoint(self, step: int, key: str) -> None:
        with session_scope(self.db_url) as s:
            s.execute(sa.update(Job).where(Job.id == self.job_id).values(checkpoint_key=key))
            log_event(s, self.job_id, "checkpoint", f"checkpoint at step {step}", step=step, key=key)

    def should_stop(self) -> bool:
        if self.beat.lost:
            raise LeaseLost(f"job {self.job_id} was taken over by another worker")
        with session_scope(self.db_url) as s:
            return bool(s.scalar(sa.select(Job.cancel_requested).where(Job.id == self.job_id)))


def run_job(
    job_id: uuid.UUID,
    *,
    settings: Settings,
    worker: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> str:
    """Claim and run one training job to a terminal state; returns what happened (for logs and tests)."""
    worker = worker or worker_id()
    lease_ttl = timedelta(seconds=settings.lease_ttl_s)
    db = settings.db_url
    with session_scope(db) as s:
        if not claim(s, job_id, worker, ttl=lease_ttl):
            return "skipped: lease held"
    beat = _Heartbeat(db, job_id, worker, lease_ttl)
    beat.start()
    try:
        return _train(job_id, settings=settings, worker=worker, beat=beat, on_progress=on_progress)
    except LeaseLost as lost:
        log.warning("%s", lost)
        return "lost: another worker owns the job"
    finally:
        beat.stopped.set()


def _train(
    job_id: uuid.UUID,
    *,
    settings: Settings,
    worker: str,
    beat: _Heartbeat,
    on_progress: Callable[[Progress], None] | None,
) -> str:
    db, store = settings.db_url, ArtifactStore(settings.artifact_url)
    with session_scope(db) as s:
        job = s.get(Job, job_id)
        assert job is not None
        spec = MixtureSpec.model_validate(job.spec_json)
        owner, mixture_id = job.owner_id, job.mixture_id
        ckpt_prefix, out_prefix = checkpoint_prefix(job), experts_prefix(job)
        mixture = s.get(Mixture, mixture_id)
        datasets = list(mixture.datasets) if mixture else []
        parent_prefix = _parent_prefix(s, mixture) if spec.schedule.kind == "add_task" else None
    recorder = _Recorder(db, job_id, owner, beat)

    def progress(p: Progress) -> None:
        recorder.progress(p)
        if on_progress is not None:
            on_progress(p)

    hooks = TrainerHooks(
        on_progress=progress,
        on_metrics=recorder.metrics,
        on_checkpoint=recorder.checkpoint,
        on_resume=recorder.resumed,
        should_stop=recorder.should_stop,
    )
    with tempfile.TemporaryDirectory(prefix="mole-job-") as tmp:
        try:
            if not datasets:
                raise ValueError("the mixture has no datasets (deleted?); attach a dataset and train again")
            rows = [row for dataset in datasets for row in dataset_rows(store, dataset)]
            parent = download_folder(store, parent_prefix, Path(tmp) / "parent") if parent_prefix else None
            trainer = Trainer(
                spec,
                rows,
                data_dir=settings.bases_data_dir,
                work_dir=Path(tmp) / "work",
                store=store,
                checkpoint_prefix=ckpt_prefix,
                hooks=hooks,
                parent_experts=parent,
            )
            result = trainer.run()
        except TrainingCancelled as cancelled:
            with session_scope(db) as s:
                finish(s, job_id, worker, JobState.CANCELLED, error=str(cancelled))
            return "cancelled"
        except LeaseLost:
            raise
        except Exception as error:  # a readable reason in the Job row, the traceback in the worker log
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            with session_scope(db) as s:
                finish(s, job_id, worker, JobState.FAILED, error=_readable(error))
            return "failed"
        keys = _upload(store, result.experts_folder, out_prefix)
        with session_scope(db) as s:
            finish(s, job_id, worker, JobState.SUCCEEDED)
            _register_experts(s, spec, result.metrics, keys, job_id=job_id, mixture_id=mixture_id, owner=owner)
    return "succeeded"


def _parent_prefix(session: Session, mixture: Mixture | None) -> str:
    """Where the trained parent of an ``add_task`` mixture keeps its experts."""
    if mixture is None or mixture.parent_id is None:
        raise ValueError("add_task needs a trained parent mixture")
    parent_job = session.scalars(
        sa.select(Job)
        .where(Job.mixture_id == mixture.parent_id, Job.state == JobState.SUCCEEDED)
        .order_by(Job.finished_at.desc())
    ).first()
    if parent_job is None:
        raise ValueError("the parent mixture has no successful training job")
    return experts_prefix(parent_job)


def _upload(store: ArtifactStore, folder: Path, prefix: str) -> dict[str, tuple[str, str]]:
    """Every file of the trained mixture into the store; file name -> (key, sha256). The manifest goes last."""
    read_manifest(folder)  # refuses pickles, checks it is ours
    keys = {}
    files = sorted(folder.iterdir(), key=lambda p: p.name == "manifest.json")
    for path in files:
        key = f"{prefix}/{path.name}"
        keys[path.name] = (key, store.put_file(key, path))
    return keys


def _register_experts(
    session: Session,
    spec: MixtureSpec,
    metrics: dict[str, dict[str, float]],
    keys: dict[str, tuple[str, str]],
    *,
    job_id: uuid.UUID,
    mixture_id: uuid.UUID,
    owner: str,
) -> None:
    short = job_id.hex[:8]
    entries = [
        (f"universal-{i}", ExpertKind.UNIVERSAL, list(spec.tasks), spec.universal.rank, spec.universal.alpha)
        for i in range(spec.universal.count)
    ]
    entries += [(e.name, ExpertKind.SPECIFIC, list(e.tasks), e.rank, e.alpha) for e in spec.experts]
    for name, kind, tasks, rank, alpha in entries:
        key, digest = keys[f"expert-{name}.safetensors"]
        session.add(
            Expert(
                name=f"{name}-{short}",
                kind=kind,
                tasks=tasks,
                rank=rank,
                alpha=alpha,
                base_model=spec.base_model,
                adapter_key=key,
                sha256=digest,
                metrics={t: metrics.get(t, {}) for t in tasks},
                mixture_id=mixture_id,
                job_id=job_id,
                owner_id=owner,
            )
        )
    session.execute(sa.update(Mixture).where(Mixture.id == mixture_id).values(trained=True))


def _readable(error: Exception) -> str:
    """What the user reads in the Jobs tab: the error's own message, with its kind when that helps."""
    text = str(error).strip() or error.__class__.__name__
    return text if isinstance(error, ValueError | FileNotFoundError) else f"{error.__class__.__name__}: {text}"
