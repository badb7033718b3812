"""Plain functions behind the UI, the API and the CLI. Handlers stay thin and call these."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import pandas as pd
import sqlalchemy as sa

from models.registry import LOCAL_OWNER, Dataset, Expert, Job, Mixture, session_scope
from models.settings import Settings, get_settings
from models.storage import ArtifactStore


@dataclass
class StudioContext:
    """What every tab needs: the settings in force, the database and the artifact store."""

    settings: Settings = field(default_factory=get_settings)

    @cached_property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.settings.artifact_url)

    def session(self):  # noqa: ANN201 - a context manager of Session
        return session_scope(self.settings.db_url)


def list_datasets(*, ctx: StudioContext, owner: str = LOCAL_OWNER) -> pd.DataFrame:
    with ctx.session() as s:
        rows = s.scalars(sa.select(Dataset).where(Dataset.owner_id == owner).order_by(Dataset.created_at)).all()
        return pd.DataFrame(
            [{"name": d.name, "format": d.format, "tasks": ", ".join(d.tasks), "rows": d.n_rows} for d in rows],
            columns=["name", "format", "tasks", "rows"],
        )


def list_mixtures(*, ctx: StudioContext, owner: str = LOCAL_OWNER) -> pd.DataFrame:
    with ctx.session() as s:
        rows = s.scalars(sa.select(Mixture).where(Mixture.owner_id == owner).order_by(Mixture.created_at)).all()
        return pd.DataFrame(
            [{"name": m.name, "base model": m.base_model, "trained": m.trained} for m in rows],
            columns=["name", "base model", "trained"],
        )


def list_jobs(*, ctx: StudioContext, owner: str = LOCAL_OWNER) -> pd.DataFrame:
    with ctx.session() as s:
        rows = s.scalars(sa.select(Job).where(Job.owner_id == owner).order_by(Job.queued_at.desc())).all()
        return pd.DataFrame(
            [
                {
                    "job": str(j.id)[:8],
                    "mixture": j.mixture.name,
                    "state": j.state.value,
                    "step": f"{j.step}/{j.total_steps}",
                    "error": j.error or "",
                }
                for j in rows
            ],
            columns=["job", "mixture", "state", "step", "error"],
        )


def list_experts(*, ctx: StudioContext, owner: str = LOCAL_OWNER) -> pd.DataFrame:
    with ctx.session() as s:
        rows = s.scalars(sa.select(Expert).where(Expert.owner_id == owner).order_by(Expert.created_at)).all()
        return pd.DataFrame(
            [
                {
                    "name": e.name,
                    "kind": e.kind.value,
                    "tasks": ", ".join(e.tasks),
                    "rank": e.rank,
                    "base model": e.base_model,
                }
                for e in rows
            ],
            columns=["name", "kind", "tasks", "rank", "base model"],
        )
