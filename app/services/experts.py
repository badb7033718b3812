"""Experts: the registry of trained experts — filter, trace, export as PEFT adapters, delete, reuse.

An expert's file lives with the rest of its training run under ``runs/<owner>/<job>/experts/`` (``worker.jobs``):
one safetensors file per expert next to the run's manifest, routers and shared factors. The Playground, exports
and mixtures grown with ``add_task`` load a mixture's newest successful run as a whole, which is what the delete
rule protects (``_in_use``).
"""

from __future__ import annotations

import html
import json
import shutil
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.context import ServiceError, StudioContext
from models.registry import LOCAL_OWNER, Expert, ExpertKind, Job, JobState, Metric, Mixture
from models.spec import MixtureSpec

DEFAULT_METRIC = "exact_match"
BASE_COLUMNS = ["name", "kind", "tasks", "rank", "base model", "mixture", "job", "trained (UTC)"]
EXPORT_PREFIX = "mole-export-"
EXPORT_MAX_AGE_S = 3600.0  # older export folders of ours are removed at the next export (Gradio has copied them)
MAX_PARENTS = 16


# --- the table ---------------------------------------------------------------------------------------------------


def list_experts(
    *,
    ctx: StudioContext,
    base_model: str = "",
    task: str = "",
    kind: str = "",
    mixture: str = "",
    search: str = "",
    metric: str = DEFAULT_METRIC,
    owner: str = LOCAL_OWNER,
) -> pd.DataFrame:
    """The registry, newest first, narrowed by the filters (empty = any); ``metric`` is the column of scores shown.

    The score of an expert is its mean over its tasks of that held-out metric from its training run.
    """
    metric = metric or DEFAULT_METRIC
    if kind and kind not in {k.value for k in ExpertKind}:
        raise ServiceError(f"unknown expert kind '{kind}'; choose {' or '.join(k.value for k in ExpertKind)}")
    columns = [*BASE_COLUMNS, metric, "in use"]
    with ctx.session() as s:
        known = _metric_names(s, owner)
        if metric not in known:
            raise ServiceError(f"unknown metric '{metric}'; the experts have: {', '.join(sorted(known))}")
        query = (
            sa.select(Expert, Mixture.name)
            .outerjoin(Mixture, Expert.mixture_id == Mixture.id)
            .where(Expert.owner_id == owner)
            .order_by(Expert.created_at.desc(), Expert.name)
        )
        if base_model:
            query = query.where(Expert.base_model == base_model)
        if kind:
            query = query.where(Expert.kind == ExpertKind(kind))
        if mixture:
            query = query.where(Mixture.name == mixture)
        usage = _usage(s, owner)
        rows = [
            _row(expert, mixture_name, metric, usage)
            for expert, mixture_name in s.execute(query).all()
            if (not task or task in expert.tasks) and _matches(search, expert, mixture_name)
        ]
    return pd.DataFrame(rows, columns=columns)


def _row(expert: Expert, mixture_name: str | None, metric: str, usage: _Usage) -> dict[str, Any]:
    return {
        "name": expert.name,
        "kind": expert.kind.value,
        "tasks": ", ".join(expert.tasks),
        "rank": expert.rank,
        "base model": expert.base_model,
        "mixture": mixture_name or "(deleted)",
        "job": expert.job_id.hex[:8] if expert.job_id else "",
        "trained (UTC)": expert.created_at.strftime("%Y-%m-%d %H:%M"),
        metric: _score(expert, metric),
        "in use": "yes" if _in_use(expert, usage) else "no",
    }


def _matches(search: str, expert: Expert, mixture_name: str | None) -> bool:
    """Case-insensitive substring over the name, tasks, mixture and base model."""
    needle = search.strip().lower()
    haystack = " ".join([expert.name, *expert.tasks, mixture_name or "", expert.base_model]).lower()
    return not needle or needle in haystack


def _score(expert: Expert, metric: str) -> float | None:
    values = [v[metric] for v in (expert.metrics or {}).values() if isinstance(v, dict) and metric in v]
    return round(sum(values) / len(values), 3) if values else None


def _metric_names(session: Session, owner: str) -> set[str]:
    names = {DEFAULT_METRIC}
    for metrics in session.scalars(sa.select(Expert.metrics).where(Expert.owner_id == owner)):
        names.update(name for values in (metrics or {}).values() if isinstance(values, dict) for name in values)
    return names


@dataclass(frozen=True)
class ExpertFilters:
    """The values the filter dropdowns offer: what the registry holds now."""

    base_models: list[str]
    tasks: list[str]
    kinds: list[str]
    mixtures: list[str]
    metrics: list[str]
    experts: list[str]


def expert_filters(*, ctx: StudioContext, owner: str = LOCAL_OWNER) -> ExpertFilters:
    with ctx.session() as s:
        experts = s.scalars(sa.select(Expert).where(Expert.owner_id == owner).order_by(Expert.created_at.desc()))
        experts = list(experts)
        mixtures = s.scalars(
            sa.select(Mixture.name).join(Expert, Expert.mixture_id == Mixture.id).where(Expert.owner_id == owner)
        )
        return ExpertFilters(
            base_models=sorted({e.base_model for e in experts}),
            tasks=sorted({t for e in experts for t in e.tasks}),
            kinds=[k.value for k in ExpertKind],
            mixtures=sorted(set(mixtures)),
            metrics=sorted(_metric_names(s, owner)),
            experts=[e.name for e in experts],
        )


# --- what an expert is used by -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Usage:
    current_run: dict[uuid.UUID, uuid.UUID]  # mixture -> its newest successful job (what loaders read)
    busy: dict[uuid.UUID, str]  # mixture -> the mixture whose queued/running job needs it (itself or a child)
    names: dict[uuid.UUID, str]


def _usage(session: Session, owner: str) -> _Usage:
    mixtures = session.execute(sa.select(Mixture.id, Mixture.parent_id, Mixture.name).where(Mixture.owner_id == owner))
    parent_of, names = {}, {}
    for mixture_id, parent_id, name in mixtures:
        parent_of[mixture_id], names[mixture_id] = parent_id, name
    jobs = session.execute(
        sa.select(Job.mixture_id, Job.id, Job.state, Job.finished_at, Job.queued_at).where(Job.owner_id == owner)
    ).all()
    current: dict[uuid.UUID, uuid.UUID] = {}
    for mixture_id, job_id, _, _, _ in sorted(
        (j for j in jobs if j.state is JobState.SUCCEEDED), key=lambda j: j.finished_at or j.queued_at
    ):
        current[mixture_id] = job_id  # the last one wins, as in worker.jobs._parent_prefix
    busy: dict[uuid.UUID, str] = {}
    for mixture_id, _, state, _, _ in jobs:
        if state in (JobState.QUEUED, JobState.RUNNING):
            busy[mixture_id] = names.get(mixture_id, "?")
            if parent_of.get(mixture_id) is not None:
                busy[parent_of[mixture_id]] = names.get(mixture_id, "?")
    return _Usage(current, busy, names)


def _in_use(expert: Expert, usage: _Usage) -> str | None:
    """Why ``expert`` must stay, or None. See the module docstring and ``strings.EXPERTS_DELETE_RULE``."""
    if expert.mixture_id is None:
        return None
    mixture = usage.names.get(expert.mixture_id, "?")
    if expert.mixture_id in usage.busy:
        return f"a training job of mixture '{usage.busy[expert.mixture_id]}' is queued or running and reads it"
    if expert.job_id is not None and usage.current_run.get(expert.mixture_id) == expert.job_id:
        return (
            f"it belongs to the newest training run of mixture '{mixture}', which the Playground, exports and "
            "mixtures grown from it load as a whole"
        )
    return None


# --- one expert: lookup, lineage, metrics ------------------------------------------------------------------------


def _get(session: Session, expert: str, owner: str) -> Expert:
    name = (expert or "").strip()
    if not name:
        raise ServiceError("choose an expert first")
    row = session.scalars(sa.select(Expert).where(Expert.owner_id == owner, Expert.name == name)).first()
    if row is None:
        raise ServiceError(f"no expert named '{name}'")
    return row


@dataclass(frozen=True)
class Link:
    """One step of an expert's lineage, as the lineage table shows it."""

    kind: str
    name: str
    id: str
    date: str
    details: str


def expert_lineage(*, ctx: StudioContext, expert: str, owner: str = LOCAL_OWNER) -> str:
    """Markdown: the chain dataset(s) → (parent mixtures →) mixture → job → expert, then one table row per step."""
    links = lineage(ctx=ctx, expert=expert, owner=owner)
    datasets = " · ".join(f"**{_md(link.name)}**" for link in links if link.kind == "dataset")
    steps = [f"{link.kind} **{_md(link.name)}**" for link in links if link.kind != "dataset"]
    chain = " → ".join([f"dataset {datasets}", *steps])
    table = ["| step | name | id | date | details |", "|---|---|---|---|---|"]
    table += [
        f"| {link.kind} | {_md(link.name)} | `{link.id}` | {link.date} | {_md(link.details)} |" for link in links
    ]
    return "\n".join([chain, "", *table])


def lineage(*, ctx: StudioContext, expert: str, owner: str = LOCAL_OWNER) -> list[Link]:
    """The steps from the data to ``expert``, oldest first; missing steps (deleted rows) are named as such."""
    with ctx.session() as s:
        row = _get(s, expert, owner)
        mixture = s.get(Mixture, row.mixture_id) if row.mixture_id else None
        job = s.get(Job, row.job_id) if row.job_id else None
        links = _dataset_links(mixture) + _parent_links(s, mixture)
        links.append(_mixture_link(mixture, "mixture") if mixture else _gone("mixture"))
        links.append(_job_link(s, job) if job else _gone("job"))
        links.append(_expert_link(row))
    return links


def _dataset_links(mixture: Mixture | None) -> list[Link]:
    if mixture is None or not mixture.datasets:
        return [_gone("dataset")]
    return [
        Link(
            "dataset",
            d.name,
            d.id.hex[:8],
            _date(d.created_at),
            f"{d.n_rows} rows · {d.format} · tasks: {', '.join(d.tasks)}",
        )
        for d in sorted(mixture.datasets, key=lambda d: d.name)
    ]


def _parent_links(session: Session, mixture: Mixture | None) -> list[Link]:
    """Ancestors of an ``add_task`` mixture, oldest first (a cycle or a very deep chain stops the walk)."""
    found: list[Link] = []
    seen = {mixture.id} if mixture else set()
    parent_id = mixture.parent_id if mixture else None
    while parent_id is not None and parent_id not in seen and len(found) < MAX_PARENTS:
        seen.add(parent_id)
        parent = session.get(Mixture, parent_id)
        if parent is None:
            break
        found.append(_mixture_link(parent, "parent mixture"))
        parent_id = parent.parent_id
    return found[::-1]


def _mixture_link(mixture: Mixture, kind: str) -> Link:
    spec = mixture.spec_json
    details = [
        "trained" if mixture.trained else "not trained",
        f"base {mixture.base_model}",
        f"router {spec.get('router', {}).get('kind', '?')}",
        f"schedule {spec.get('schedule', {}).get('kind', '?')}",
        f"{len(spec.get('experts', []))} task experts + {spec.get('universal', {}).get('count', 0)} universal",
    ]
    return Link(kind, mixture.name, mixture.id.hex[:8], _date(mixture.created_at), " · ".join(details))


def _job_link(session: Session, job: Job) -> Link:
    loss = session.scalars(
        sa.select(Metric.value)
        .where(Metric.job_id == job.id, Metric.name == "loss", Metric.task.is_(None))
        .order_by(Metric.step.desc())
    ).first()
    details = [job.state.value, f"{job.step}/{job.total_steps} steps", f"attempt {job.attempt}"]
    if loss is not None:
        details.append(f"final loss {loss:.3f}")
    if job.started_at and job.finished_at:
        details.append(f"{(job.finished_at - job.started_at).total_seconds():.0f} s")
    when = job.finished_at or job.queued_at
    return Link("job", job.id.hex[:8], job.id.hex[:8], _date(when), " · ".join(details))


def _expert_link(expert: Expert) -> Link:
    details = [expert.kind.value, f"rank {expert.rank}", f"α {expert.alpha:g}", f"tasks: {', '.join(expert.tasks)}"]
    for task, values in sorted((expert.metrics or {}).items()):
        if isinstance(values, dict) and values:
            details.append(f"{task}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(values.items())))
    return Link("expert", expert.name, expert.id.hex[:8], _date(expert.created_at), " · ".join(details))


def _gone(kind: str) -> Link:
    return Link(kind, "(deleted)", "-", "-", "no longer in the registry")


def expert_metrics(*, ctx: StudioContext, expert: str, owner: str = LOCAL_OWNER) -> pd.DataFrame:
    """One row per task of ``expert``: its held-out scores from the end of its training run."""
    with ctx.session() as s:
        row = _get(s, expert, owner)
        metrics = {t: v for t, v in (row.metrics or {}).items() if isinstance(v, dict)}
    names = sorted({name for values in metrics.values() for name in values})
    return pd.DataFrame(
        [{"task": task, **{n: values.get(n) for n in names}} for task, values in sorted(metrics.items())],
        columns=["task", *names],
    )


# --- actions -----------------------------------------------------------------------------------------------------


def expert_to_spec(*, ctx: StudioContext, expert: str, owner: str = LOCAL_OWNER) -> dict[str, Any]:
    """The spec that trained ``expert`` (the job's snapshot), as the composer's starting point for a new mixture.

    A new mixture has no parent, so an ``add_task`` schedule becomes ``joint`` over the same number of steps.
    """
    with ctx.session() as s:
        row = _get(s, expert, owner)
        job = s.get(Job, row.job_id) if row.job_id else None
        mixture = s.get(Mixture, row.mixture_id) if row.mixture_id else None
        data = job.spec_json if job else mixture.spec_json if mixture else None
        key = row.adapter_key
    if data is None:
        data = json.loads(ctx.store.get_bytes(f"{_run_prefix(key)}/manifest.json"))["spec"]
    spec = MixtureSpec.model_validate(data)
    if spec.schedule.kind == "add_task":
        schedule = spec.schedule.model_dump() | {"kind": "joint", "stage_steps": [sum(spec.schedule.stage_steps)]}
        spec = MixtureSpec.model_validate(spec.model_dump() | {"schedule": schedule})
    return spec.model_dump(mode="json")


def delete_expert(*, ctx: StudioContext, expert: str, owner: str = LOCAL_OWNER) -> str:
    """Remove the row and the expert's file (and the run's shared files with its last expert); refused while used."""
    with ctx.session() as s:
        row = _get(s, expert, owner)
        reason = _in_use(row, _usage(s, owner))
        if reason:
            raise ServiceError(f"expert '{row.name}' is in use and was not deleted: {reason}")
        name, key = row.name, row.adapter_key
        s.delete(row)
        s.flush()
        siblings = s.scalar(
            sa.select(sa.func.count())
            .select_from(Expert)
            .where(Expert.adapter_key.startswith(f"{_run_prefix(key)}/", autoescape=True))
        )
    ctx.store.delete(key)  # after the commit: a row never points at a missing file
    if not siblings:
        ctx.store.delete(_run_prefix(key))
    return f"Deleted expert '{name}' and its adapter file."


def export_expert(*, ctx: StudioContext, expert: str, with_universal: bool = True, owner: str = LOCAL_OWNER) -> Path:
    """A zip of ``expert`` as a plain PEFT LoRA adapter, in a fresh temporary folder (never in the data dir).

    With ``with_universal`` a task expert is joined with the run's universal expert(s) in rank space, so the adapter
    computes what the mixture computes when routed to that expert alone (``models.mixture.export_route``).
    """
    with ctx.session() as s:
        row = _get(s, expert, owner)
        name, key = row.name, row.adapter_key
        readme = _readme(row)
    _prune_old_exports()
    with tempfile.TemporaryDirectory(prefix="mole-export-work-") as work:
        adapter = _export_adapter(ctx, key, Path(work), with_universal=with_universal)
        (adapter / "README.md").write_text(readme)
        target = Path(tempfile.mkdtemp(prefix=EXPORT_PREFIX)) / f"{name}-peft.zip"
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(adapter.iterdir()):
                archive.write(path, arcname=path.name)
    return target


def _export_adapter(ctx: StudioContext, key: str, work: Path, *, with_universal: bool) -> Path:
    """Rebuild the run's mixture on its base with just the files the export needs, then write the PEFT adapter."""
    from models.bases import load_base
    from models.mixture import (
        MANIFEST,
        SHARED_FILE,
        attach_mixture,
        expert_file,
        export_peft_adapter,
        load_experts,
        read_manifest,
        universal_names,
    )

    prefix, file_name = _run_prefix(key), key.rsplit("/", 1)[1]
    spec_name = file_name.removeprefix("expert-").removesuffix(".safetensors")
    run = work / "run"
    run.mkdir()
    try:
        ctx.store.get_file(f"{prefix}/{MANIFEST}", run / MANIFEST)
        manifest = read_manifest(run)
        spec = MixtureSpec.model_validate(manifest["spec"])
        universal = universal_names(spec)
        chosen = [spec_name] + (universal if with_universal and spec_name not in universal else [])
        wanted = [expert_file(n) for n in chosen] + ([SHARED_FILE] if SHARED_FILE in manifest["files"] else [])
        for wanted_file in wanted:
            if not ctx.store.exists(f"{prefix}/{wanted_file}"):
                raise ServiceError(_missing_message(wanted_file, universal))
            ctx.store.get_file(f"{prefix}/{wanted_file}", run / wanted_file)
        model, _ = load_base(spec.base_model, ctx.settings.bases_data_dir)
        mixture = attach_mixture(model, spec)
        load_experts(mixture, run, experts=chosen)
        return export_peft_adapter(mixture, spec_name, work / "adapter", with_universal=with_universal)
    except FileNotFoundError as error:
        raise ServiceError(f"the expert's training run is incomplete in the artifact store: {error}") from error
    except ServiceError:
        raise
    except ValueError as error:  # MixtureError, UnknownBaseModelError, a damaged manifest or spec
        raise ServiceError(f"the expert could not be exported: {error}") from error


def _missing_message(file_name: str, universal: list[str]) -> str:
    if any(file_name == f"expert-{u}.safetensors" for u in universal):
        return "the universal expert of this run was deleted; export the expert without joining the universal expert"
    return f"{file_name} is missing from the expert's training run; it cannot be exported"


def _readme(expert: Expert) -> str:
    return (
        f"# {expert.name}\n\nA LoRA adapter exported from MoLE Studio ({expert.kind.value} expert, tasks: "
        f"{', '.join(expert.tasks)}).\n\nBase model: `{expert.base_model}`\n\n"
        "```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, 'this-folder')\n```\n"
    )


def _prune_old_exports() -> None:
    """Our own export folders older than an hour: Gradio has copied their zip into its cache by then."""
    cutoff = time.time() - EXPORT_MAX_AGE_S
    for folder in Path(tempfile.gettempdir()).glob(f"{EXPORT_PREFIX}*"):
        try:
            if folder.is_dir() and not folder.is_symlink() and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue


# --- small helpers -----------------------------------------------------------------------------------------------


def _run_prefix(adapter_key: str) -> str:
    return adapter_key.rsplit("/", 1)[0]


def _date(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "-"


def _md(text: str) -> str:
    """Plain text inside a Markdown table cell: HTML escaped, pipes and emphasis characters neutralised."""
    escaped = html.escape(str(text), quote=False)
    for char in "\\`*_[]|#":
        escaped = escaped.replace(char, f"\\{char}")
    return escaped
