"""The Celery app: reliability settings, routing, and a ping round trip through a real worker process."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from models.settings import Settings
from worker.celery_app import create_celery, reliability_config

ROUND_TRIP_TIMEOUT_S = 90


def test_reliability_settings_for_long_jobs(settings: Settings) -> None:
    config = reliability_config(settings)
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"] and config["task_track_started"]
    assert config["worker_prefetch_multiplier"] == 1
    assert config["accept_content"] == ["json"]


def test_visibility_timeout_is_set_in_all_three_places_for_redis(data_dir: Path) -> None:
    settings = Settings(broker_url="redis://127.0.0.1:6379/0", visibility_timeout_s=123)
    config = reliability_config(settings)
    assert config["visibility_timeout"] == 123
    assert config["broker_transport_options"]["visibility_timeout"] == 123
    assert config["result_backend_transport_options"]["visibility_timeout"] == 123


def test_embedded_broker_uses_folders_in_the_data_dir(settings: Settings) -> None:
    app = create_celery(settings)
    assert app.conf.broker_url == "filesystem://"
    options = app.conf.broker_transport_options
    assert Path(options["data_folder_in"]).is_dir() and options["data_folder_in"] == options["data_folder_out"]
    assert Path(options["data_folder_in"]).is_relative_to(settings.studio_data_dir)


def test_training_tasks_route_to_their_own_queue(settings: Settings) -> None:
    app = create_celery(settings)
    router = app.amqp.router
    assert router.route({}, "studio.train")["queue"].name == "train"
    assert router.route({}, "studio.evaluate")["queue"].name == "eval"
    assert router.route({}, "studio.ping")["queue"].name == "default"


def _round_trip(settings: Settings, start_worker: Callable[..., object], **env: str) -> None:
    app = create_celery(settings)
    worker = start_worker(STUDIO_DATA_DIR=str(settings.studio_data_dir), **env)
    reply = app.send_task("studio.ping").get(timeout=ROUND_TRIP_TIMEOUT_S)
    assert reply["pong"] is True
    # The answer came from the worker's pool child, not from this process or an eager shortcut.
    assert reply["pid"] not in (None, os.getpid())
    assert worker.poll() is None  # type: ignore[attr-defined]


def test_ping_round_trip_on_the_embedded_broker(settings: Settings, start_worker: Callable[..., object]) -> None:
    _round_trip(settings, start_worker)


@pytest.mark.integration
def test_ping_round_trip_on_real_redis(data_dir: Path, redis_url: str, start_worker: Callable[..., object]) -> None:
    settings = Settings(studio_data_dir=data_dir, broker_url=redis_url)
    _round_trip(settings, start_worker, BROKER_URL=redis_url)
