"""Evaluating a finished job again, as a function and as the ``studio.evaluate`` / ``studio.infer`` Celery tasks."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from app.services.mixtures import save_mixture
from models.demo import DEMO_TASKS
from models.registry import Job, JobEvent, JobState, Metric, session_scope
from models.settings import Settings
from tests.conftest import demo_studio, train_now
from tests.worker.test_inference import _spec
from worker import inference
from worker.celery_app import create_celery
from worker.dispatch import submit_training
from worker.job_evaluation import EvaluationError, evaluate_job

TASK_TIMEOUT_S = 120


@dataclass
class Finished:
    settings: Settings
    job_id: uuid.UUID
    mixture_id: uuid.UUID


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, bases_dir: Path) -> Iterator[Finished]:
    """A tiny mixture trained 4 steps through the real job path, its held-out scores written at the last step."""
    ctx = demo_studio(tmp_path_factory.mktemp("studio"), bases_dir)
    mixture = save_mixture(ctx=ctx, name="evaluated", spec_json=_spec("softmax", steps=4), dataset_names=DEMO_TASKS)
    settings = ctx.settings
    job_id = train_now(settings, mixture.id)
    yield Finished(settings, job_id, mixture.id)
    inference.clear_cache()


def _scores(settings: Settings, job_id: uuid.UUID) -> list[tuple[int, str | None, str, float]]:
    with session_scope(settings.db_url) as s:
        rows = s.execute(
            sa.select(Metric.step, Metric.task, Metric.name, Metric.value).where(
                Metric.job_id == job_id, Metric.name.in_(["exact_match", "token_f1", "rouge_l"])
            )
        )
        return sorted(tuple(row) for row in rows)


def test_evaluation_scores_the_trainers_held_out_rows_again(finished: Finished) -> None:
    before = _scores(finished.settings, finished.job_id)  # the trainer's evaluation at its last step
    assert len({step for step, *_ in before}) == 1 and len(before) == 3 * len(DEMO_TASKS)
    metrics = evaluate_job(finished.job_id, settings=finished.settings)
    assert sorted(metrics) == sorted(DEMO_TASKS)
    after = _scores(finished.settings, finished.job_id)
    assert len(after) == 2 * len(before) and {step for step, *_ in after} == {step for step, *_ in before}
    # The same held-out rows, the same experts, greedy decoding: the numbers the trainer wrote.
    trainer = {(task, name): value for _, task, name, value in before}
    for task, values in metrics.items():
        for name in ("exact_match", "token_f1", "rouge_l"):
            assert values[name] == pytest.approx(trainer[(task, name)]), (task, name)
    with session_scope(finished.settings.db_url) as s:
        kinds = s.scalars(sa.select(JobEvent.kind).where(JobEvent.job_id == finished.job_id)).all()
    assert "evaluated" in kinds


def test_only_a_succeeded_job_can_be_evaluated(finished: Finished) -> None:
    with pytest.raises(EvaluationError, match="no job"):
        evaluate_job(uuid.uuid4(), settings=finished.settings)
    queued = submit_training(finished.settings, finished.mixture_id, send=False)
    try:
        with pytest.raises(EvaluationError, match="is queued: only a succeeded job has experts"):
            evaluate_job(queued, settings=finished.settings)
    finally:
        with session_scope(finished.settings.db_url) as s:
            s.get(Job, queued).state = JobState.CANCELLED


def test_evaluate_and_infer_tasks_run_on_a_real_worker(
    finished: Finished, bases_dir: Path, start_worker: Callable[..., object]
) -> None:
    settings = finished.settings
    start_worker(STUDIO_DATA_DIR=str(settings.studio_data_dir), BASE_CACHE_DIR=str(bases_dir))
    app = create_celery(settings)
    scores = app.send_task("studio.evaluate", args=[str(finished.job_id)]).get(timeout=TASK_TIMEOUT_S)
    assert sorted(scores) == sorted(DEMO_TASKS) and all(0 <= v["exact_match"] <= 1 for v in scores.values())
    reply = app.send_task(
        "studio.infer",
        args=[str(finished.mixture_id), "Rewrite the date as DD/MM/YYYY."],
        kwargs={"input_text": "2031-07-19", "max_new_tokens": 3},
    ).get(timeout=TASK_TIMEOUT_S)
    assert len(reply["generated_tokens"]) <= 3 and reply["routed_names"] == [f"{t}-expert" for t in DEMO_TASKS]
    weights = reply["layer_weights"]
    assert len(weights) == len(reply["layer_names"]) and all(abs(sum(row) - 1) < 1e-4 for row in weights)
