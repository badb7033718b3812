"""Celery tasks. Each is thin: it parses its arguments and calls a plain function."""

from __future__ import annotations

import os
import socket
import uuid

from celery import shared_task
from celery.signals import worker_ready, worker_shutdown

from models.settings import get_settings
from worker.dispatch import Reaper

_reaper: Reaper | None = None


@shared_task(name="studio.ping")
def ping() -> dict[str, object]:
    """Round trip check: answers with the worker's host and pid, so a caller sees a real worker replied."""
    return {"pong": True, "host": socket.gethostname(), "pid": os.getpid()}


@shared_task(name="studio.train", bind=True)
def train(self, job_id: str) -> str:  # noqa: ANN001 - celery's bound task
    """Run one training job under its lease; a duplicate delivery finds the lease held and returns at once."""
    from worker.jobs import run_job

    hostname = self.request.hostname or socket.gethostname()
    return run_job(uuid.UUID(job_id), settings=get_settings(), worker=f"{hostname}:{os.getpid()}")


@shared_task(name="studio.evaluate")
def evaluate(job_id: str) -> dict[str, dict[str, float]]:
    """Score a succeeded job's experts on its held-out rows again (Metric rows); returns the scores."""
    from worker.job_evaluation import evaluate_job

    return evaluate_job(uuid.UUID(job_id), settings=get_settings())


@shared_task(name="studio.infer")
def infer(
    mixture_id: str, prompt: str, input_text: str = "", task: str | None = None, max_new_tokens: int = 16
) -> dict[str, object]:
    """One playground request on a worker (a GPU one, say): the output and the mean routing weight per layer."""
    from worker.inference import infer as generate
    from worker.inference import load_trained

    loaded = load_trained(get_settings(), uuid.UUID(mixture_id))
    result = generate(loaded, prompt, input_text=input_text, task=task, max_new_tokens=max_new_tokens)
    weights = result.layer_weights
    return {
        "text": result.text,
        "generated_tokens": result.generated_tokens,
        "routed_names": result.routed_names,
        "layer_names": result.layer_names,
        "layer_weights": weights.tolist() if weights is not None else None,
    }


@worker_ready.connect
def _start_reaper(**_: object) -> None:
    global _reaper
    _reaper = Reaper(get_settings())
    _reaper.start()


@worker_shutdown.connect
def _stop_reaper(**_: object) -> None:
    if _reaper is not None:
        _reaper.stopped.set()
