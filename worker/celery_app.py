"""The Celery app, configured from the environment.

With ``BROKER_URL`` unset the studio uses Celery's ``filesystem://`` transport in its data dir (the embedded
default, one machine, no services); with ``redis://...`` it talks to real workers. The reliability settings
follow RELIABILITY.md §1: the broker is only a wake-up call, the Job row in the database is the truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from models.settings import Settings, get_settings

QUEUES = ("default", "train", "eval")


def _filesystem_transport_options(folder: Path) -> dict[str, Any]:
    """Producers and consumers share one folder; processed messages are not kept."""
    messages, control = folder / "messages", folder / "control"
    for path in (messages, control):
        path.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(messages),
        "data_folder_out": str(messages),
        "control_folder": str(control),
        "store_processed": False,
    }


def reliability_config(settings: Settings) -> dict[str, Any]:
    """Settings for long training jobs: at-least-once delivery, one job per process, JSON only."""
    vt = settings.visibility_timeout_s
    transport_options: dict[str, Any] = {
        "visibility_timeout": vt,
        "unacked_restore_interval": max(1, min(10, vt // 2)),
    }
    if settings.embedded_broker:
        transport_options = _filesystem_transport_options(settings.broker_folder)
    return {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "worker_max_tasks_per_child": 1,
        "task_track_started": True,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "result_extended": True,
        "broker_transport_options": transport_options,
        "result_backend_transport_options": {"visibility_timeout": vt},
        "visibility_timeout": vt,
        "task_default_queue": "default",
        "task_default_exchange": "default",
        "task_default_routing_key": "default",
        "task_queues": [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        "task_routes": {"studio.train": {"queue": "train"}, "studio.evaluate": {"queue": "eval"}},
        "worker_hijack_root_logger": False,
    }


def create_celery(settings: Settings | None = None) -> Celery:
    """A Celery app for ``settings`` (the environment when omitted), with the studio's tasks registered."""
    settings = settings or get_settings()
    settings.studio_data_dir.mkdir(parents=True, exist_ok=True)
    app = Celery(
        "mole_studio",
        broker=settings.celery_broker_url,
        backend=settings.celery_result_backend,
        include=["worker.tasks"],
    )
    app.conf.update(reliability_config(settings))
    return app


celery_app = create_celery()
