"""Evaluate a finished job again: its trained experts on its held-out split, written as Metric rows.

Why a job of its own: metrics can be asked for after training (a longer evaluation, a changed metric set, experts
registered before a metric existed) on any worker of the ``eval`` queue, without training again. The held-out rows
are the trainer's: the same split of the same dataset files by the same seed, so no training row is scored.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

from models.data import split_holdout
from models.mixture import load_trained_mixture
from models.registry import Job, JobState, Metric, Mixture, session_scope
from models.settings import Settings
from models.spec import MixtureSpec
from models.storage import ArtifactStore
from worker.evaluate import evaluate_tasks
from worker.jobs import dataset_rows, download_folder, experts_prefix
from worker.lease import log_event
from worker.trainer import EVAL_MAX_PER_TASK, HOLDOUT_FRACTION


class EvaluationError(ValueError):
    """The job cannot be evaluated; the message says why."""


def evaluate_job(
    job_id: uuid.UUID, *, settings: Settings, max_per_task: int = EVAL_MAX_PER_TASK
) -> dict[str, dict[str, float]]:
    """Score a succeeded job's experts per task on its held-out rows; Metric rows at the job's last step."""
    store = ArtifactStore(settings.artifact_url)
    with session_scope(settings.db_url) as s:
        job = s.get(Job, job_id)
        if job is None:
            raise EvaluationError(f"no job {job_id.hex[:8]}")
        if job.state != JobState.SUCCEEDED:
            raise EvaluationError(f"job {job_id.hex[:8]} is {job.state.value}: only a succeeded job has experts")
        mixture = s.get(Mixture, job.mixture_id) if job.mixture_id else None
        if mixture is None or not mixture.datasets:
            raise EvaluationError(f"the datasets of job {job_id.hex[:8]} are gone: nothing to evaluate on")
        spec, step, owner = MixtureSpec.model_validate(job.spec_json), job.step, job.owner_id
        rows = [row for dataset in mixture.datasets for row in dataset_rows(store, dataset)]
        prefix = experts_prefix(job)
    _, holdout = split_holdout(rows, fraction=HOLDOUT_FRACTION, seed=spec.schedule.seed)
    with tempfile.TemporaryDirectory(prefix="mole-eval-") as tmp:
        folder = download_folder(store, prefix, Path(tmp) / "experts")
        mixture_model, tokenizer = load_trained_mixture(folder, data_dir=settings.bases_data_dir)  # fp32, as trained
    longest = max(len(tokenizer(row.output)["input_ids"]) for row in holdout) if holdout else 0
    metrics = evaluate_tasks(
        mixture_model, tokenizer, holdout, max_per_task=max_per_task, max_new_tokens=min(64, longest + 2)
    )
    with session_scope(settings.db_url) as s:
        s.add_all(
            Metric(job_id=job_id, owner_id=owner, step=step, task=task, name=name, value=value)
            for task, values in metrics.items()
            for name, value in values.items()
        )
        log_event(s, job_id, "evaluated", f"held-out scores of {len(metrics)} task(s) at step {step}")
    return metrics
