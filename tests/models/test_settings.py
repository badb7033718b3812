"""Settings: embedded defaults under the data dir, environment overrides, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from models.settings import Settings


def test_embedded_defaults_live_in_the_data_dir(data_dir: Path) -> None:
    settings = Settings()
    assert settings.studio_data_dir == data_dir.resolve()
    assert settings.db_url == f"sqlite:///{data_dir.resolve() / 'studio.db'}"
    assert settings.embedded_broker and settings.celery_broker_url == "filesystem://"
    assert settings.celery_result_backend.startswith("db+sqlite:///")
    assert settings.artifact_url == str(data_dir.resolve() / "artifacts")


def test_environment_overrides(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    monkeypatch.setenv("BROKER_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("ARTIFACT_ROOT", "s3://bucket/prefix")
    monkeypatch.setenv("MAX_UPLOAD_MB", "7")
    settings = Settings()
    assert settings.db_url.startswith("postgresql+psycopg://")
    assert not settings.embedded_broker
    assert settings.celery_broker_url == settings.celery_result_backend == "redis://127.0.0.1:6379/0"
    assert settings.artifact_url == "s3://bucket/prefix"
    assert settings.max_upload_bytes == 7 * 1024 * 1024


def test_bad_values_are_refused_with_the_variable_named(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    monkeypatch.setenv("MAX_UPLOAD_MB", "0")
    with pytest.raises(ValidationError, match="max_upload_mb"):
        Settings()
