"""Studio configuration, read from the environment with embedded defaults.

Every real part (database, broker, artifact store) has a default that lives under ``STUDIO_DATA_DIR`` so that
one command runs the studio on a fresh machine; production points the variables at PostgreSQL, Redis and an
object store instead.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.precision import InferenceDtype

EMBEDDED_BROKER = "embedded"


class Settings(BaseSettings):
    """Environment variables (exact names, no prefix) with the embedded defaults of ARCHITECTURE.md."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", frozen=True)

    studio_data_dir: Path = Field(default=Path(".studio"), description="Where the embedded defaults live.")
    database_url: str | None = Field(default=None, description="Any SQLAlchemy URL; SQLite file by default.")
    broker_url: str | None = Field(default=None, description="redis://...; unset or 'embedded' = filesystem broker.")
    result_backend: str | None = Field(default=None, description="Celery result backend; derived when unset.")
    artifact_root: str | None = Field(default=None, description="Local folder or any fsspec URL.")
    max_upload_mb: int = Field(default=50, ge=1, le=10_000, description="Largest accepted upload, in MiB.")
    visibility_timeout_s: int = Field(default=86_400, ge=1, description="Redis visibility timeout (RELIABILITY §1).")
    base_cache_dir: Path | None = Field(
        default=None, description="Where built-in bases are materialised (default: the data dir); shareable."
    )
    lease_ttl_s: int = Field(default=60, ge=2, description="A worker's lease on its job; renewed every third of it.")
    queued_resend_s: int = Field(default=120, ge=1, description="Re-send a queued job's message after this long.")
    reap_every_s: float = Field(default=30.0, gt=0, description="How often app and workers sweep for lost jobs.")
    inference_dtype: InferenceDtype = Field(
        default="auto", description="Frozen base weights at inference: auto = bf16 where the hardware has it."
    )
    host: str = Field(default="127.0.0.1", description="Address the studio binds to.")
    port: int = Field(default=7860, ge=1, le=65_535)

    @field_validator("studio_data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @cached_property
    def db_url(self) -> str:
        """The database URL in force: ``DATABASE_URL`` or the SQLite file in the data dir."""
        return self.database_url or f"sqlite:///{self.studio_data_dir / 'studio.db'}"

    @property
    def embedded_broker(self) -> bool:
        """True when no real broker is configured and the studio runs its own worker."""
        return not self.broker_url or self.broker_url == EMBEDDED_BROKER

    @cached_property
    def broker_folder(self) -> Path:
        """Folder of Celery's filesystem transport in embedded mode."""
        return self.studio_data_dir / "broker"

    @cached_property
    def celery_broker_url(self) -> str:
        return "filesystem://" if self.embedded_broker else str(self.broker_url)

    @cached_property
    def celery_result_backend(self) -> str:
        """Results are only a convenience (the Job row is the truth): Redis with Redis, else a SQLite file."""
        if self.result_backend:
            return self.result_backend
        if not self.embedded_broker and str(self.broker_url).startswith(("redis://", "rediss://")):
            return str(self.broker_url)
        return f"db+sqlite:///{self.studio_data_dir / 'celery-results.db'}"

    @cached_property
    def artifact_url(self) -> str:
        """The artifact store root: ``ARTIFACT_ROOT`` or ``<data dir>/artifacts``."""
        return self.artifact_root or str(self.studio_data_dir / "artifacts")

    @property
    def bases_data_dir(self) -> Path:
        """The folder whose ``bases/`` holds materialised built-in bases (SmolLM2 in safetensors, the tiny base)."""
        return (self.base_cache_dir or self.studio_data_dir).expanduser().resolve()

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024


def get_settings() -> Settings:
    """A fresh read of the environment (cheap; callers that need a stable view keep the object)."""
    return Settings()
