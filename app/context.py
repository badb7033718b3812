"""What every service and tab shares: the settings in force, the database, the artifact store, and refusals."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from models.registry import session_scope
from models.settings import Settings, get_settings
from models.storage import ArtifactStore


class ServiceError(ValueError):
    """A refusal with a message meant for the person who asked (shown as is in the UI and the API)."""


@dataclass
class StudioContext:
    """The settings in force, with the database session and the artifact store they name."""

    settings: Settings = field(default_factory=get_settings)

    @cached_property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.settings.artifact_url)

    def session(self):  # noqa: ANN201 - a context manager of Session
        return session_scope(self.settings.db_url)
