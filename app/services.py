"""Plain functions behind the UI, the API and the CLI. Handlers stay thin and call these."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

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


# --- datasets and mixtures: all or nothing ---------------------------------------------------------------------


class ServiceError(ValueError):
    """A refusal with a message meant for the person who asked (shown as is in the UI and the API)."""


def create_dataset(
    *, ctx: StudioContext, filename: str, data: bytes, name: str | None = None, owner: str = LOCAL_OWNER
) -> Dataset:
    """Validate an upload, store the file under a generated key, then insert the row; nothing is kept on refusal."""
    from models.data import DataValidationError, task_name_from_filename, validate_upload
    from models.storage import new_key

    report = validate_upload(
        data, filename, default_task=task_name_from_filename(filename), max_bytes=ctx.settings.max_upload_bytes
    )
    if not report.ok:
        raise ServiceError(str(DataValidationError(report)))
    name = name or task_name_from_filename(filename)
    fmt = "parquet" if filename.lower().endswith((".parquet", ".pq")) else report.format
    key = new_key("datasets", owner)
    with ctx.session() as s:
        if s.scalar(sa.select(Dataset.id).where(Dataset.owner_id == owner, Dataset.name == name)):
            raise ServiceError(f"a dataset named '{name}' exists already; choose another name")
    digest = ctx.store.put_bytes(key, data)
    try:
        with ctx.session() as s:  # the row commits only with its file in place; on any failure the file goes
            dataset = Dataset(
                name=name,
                owner_id=owner,
                format=fmt,
                tasks=sorted(report.task_counts),
                task_counts=dict(report.task_counts),
                n_rows=report.n_rows,
                size_bytes=len(data),
                artifact_key=key,
                sha256=digest,
            )
            s.add(dataset)
    except IntegrityError as error:
        ctx.store.delete(key)
        raise ServiceError(f"a dataset named '{name}' exists already; choose another name") from error
    except BaseException:
        ctx.store.delete(key)
        raise
    return dataset


def save_mixture(
    *,
    ctx: StudioContext,
    name: str,
    spec_json: dict,
    dataset_names: list[str],
    owner: str = LOCAL_OWNER,
    parent: str | None = None,
) -> Mixture:
    """Validate the spec against its datasets and store it unchanged as a named mixture."""
    from models.spec import MixtureSpec, explain

    try:
        spec = MixtureSpec.model_validate(spec_json)
    except ValueError as error:
        raise ServiceError(explain(error)) from error
    with ctx.session() as s:
        datasets = s.scalars(
            sa.select(Dataset).where(Dataset.owner_id == owner, Dataset.name.in_(dataset_names))
        ).all()
        missing = sorted(set(dataset_names) - {d.name for d in datasets})
        if missing:
            raise ServiceError(f"no dataset named {', '.join(missing)}")
        data_tasks = sorted({t for d in datasets for t in d.tasks})
        if sorted(spec.tasks) != data_tasks:
            raise ServiceError(
                f"the mixture's tasks ({', '.join(spec.tasks)}) differ from its datasets' tasks "
                f"({', '.join(data_tasks)})"
            )
        if s.scalar(sa.select(Mixture.id).where(Mixture.owner_id == owner, Mixture.name == name)):
            raise ServiceError(f"a mixture named '{name}' exists already; choose another name")
        parent_id = (
            s.scalar(sa.select(Mixture.id).where(Mixture.owner_id == owner, Mixture.name == parent))
            if parent
            else None
        )
        mixture = Mixture(
            name=name,
            owner_id=owner,
            base_model=spec.base_model,
            spec_json=spec.model_dump(mode="json"),
            parent_id=parent_id,
        )
        mixture.datasets.extend(datasets)
        s.add(mixture)
        s.flush()
        return mixture


def register_demo(*, ctx: StudioContext, base_model: str, router: str = "modula", owner: str = LOCAL_OWNER) -> Mixture:
    """The bundled demo: its four task files as datasets and a mixture ready to train (idempotent)."""
    from models.demo import DEMO_TASKS, demo_files, demo_spec

    with ctx.session() as s:
        existing = s.scalars(sa.select(Mixture).where(Mixture.owner_id == owner, Mixture.name == "demo")).first()
        if existing is not None:
            return existing
        have = set(s.scalars(sa.select(Dataset.name).where(Dataset.owner_id == owner)))
    for path in demo_files():
        if path.stem not in have:
            create_dataset(ctx=ctx, filename=path.name, data=path.read_bytes(), name=path.stem, owner=owner)
    spec = demo_spec(base_model, router=router)
    return save_mixture(
        ctx=ctx, name="demo", spec_json=spec.model_dump(mode="json"), dataset_names=list(DEMO_TASKS), owner=owner
    )
