"""Mixtures: the composer's form to a ``MixtureSpec`` and back, the chosen base's layers and parameter count, and the
actions on saved mixtures (save, open, duplicate, add a task, start training); the bundled demo.

The base is inspected without its weights: its config builds the model on PyTorch's ``meta`` device, which gives
the real linear-layer names and shapes, and attaching the mixture to a copy of that skeleton gives the exact
trainable-parameter count (whatever the router kind) in well under a second, with no memory for weights.
"""

from __future__ import annotations

import copy
import json
import os
import re
import threading
import typing
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.context import ServiceError, StudioContext
from app.services.datasets import create_dataset
from models.bases import BUILTIN_SMOLLM2, BUILTIN_TINY, TINY_CONFIG, UnknownBaseModelError, catalogue, resolve_base
from models.registry import LOCAL_OWNER, Dataset, Job, JobState, Mixture
from models.routers import ROUTER_KINDS
from models.spec import NAME, SCHEDULE_STAGES, LossSpec, MixtureSpec, ScheduleSpec, TaskExpert, UniversalExperts
from models.spec import explain as explain_spec

EXPERT_COLUMNS = ["name", "tasks", "rank", "alpha", "group"]
OPTION_COLUMNS = ["option", "value", "about"]
WEIGHTINGS = list(typing.get_args(LossSpec.model_fields["weighting"].annotation))
SCHEDULE_KINDS = list(SCHEDULE_STAGES)
DEFAULT_STAGE_STEPS = {"joint": [200], "modula": [100, 100, 50], "at_moe": [150, 50], "add_task": [100, 50]}
ADD_TASK_STEPS = (100, 50)
_UNIVERSAL, _LOSS, _SCHEDULE = UniversalExperts(), LossSpec(), ScheduleSpec()
_EXPERT = TaskExpert(name="x", tasks=["x"])
_SPLIT = re.compile(r"[,\s]+")
_ROW = re.compile(r"^experts\.(\d+)(\.?)")


# --------------------------------------------------------------------------------------------------------------------
# Saved mixtures: list and save (used by the other tabs, the CLI and the demo)
# --------------------------------------------------------------------------------------------------------------------


def list_mixtures(*, ctx: StudioContext, owner: str = LOCAL_OWNER) -> pd.DataFrame:
    with ctx.session() as s:
        rows = s.scalars(sa.select(Mixture).where(Mixture.owner_id == owner).order_by(Mixture.created_at)).all()
        return pd.DataFrame(
            [{"name": m.name, "base model": m.base_model, "trained": m.trained} for m in rows],
            columns=["name", "base model", "trained"],
        )


def mixture_names(*, ctx: StudioContext, owner: str = LOCAL_OWNER, trained: bool | None = None) -> list[str]:
    """Names of the saved mixtures (only the trained ones, or only the untrained, when ``trained`` says so)."""
    query = sa.select(Mixture.name).where(Mixture.owner_id == owner).order_by(Mixture.name)
    if trained is not None:
        query = query.where(Mixture.trained.is_(trained))
    with ctx.session() as s:
        return list(s.scalars(query))


def save_mixture(
    *,
    ctx: StudioContext,
    name: str,
    spec_json: dict,
    dataset_names: list[str],
    owner: str = LOCAL_OWNER,
    parent: str | None = None,
    check_base: bool = False,
) -> Mixture:
    """Validate the spec against its datasets and store it unchanged as a named mixture.

    With ``check_base`` the base model is inspected too, so an unknown model or a target module the base lacks is
    refused now rather than when a worker starts training.
    """
    name = _check_name(name)
    if isinstance(spec_json, str):
        spec_json = _parse_json(spec_json)
    try:
        spec = MixtureSpec.model_validate(spec_json)
    except ValueError as error:
        raise ServiceError(explain(error)) from error
    if check_base:
        parameter_count(ctx=ctx, spec=spec)
    dataset_names = list(dataset_names or [])
    if not dataset_names:
        raise ServiceError("the mixture has no datasets: pick the datasets it trains on")
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
        parent_id = None
        if parent:
            parent_id = s.scalar(sa.select(Mixture.id).where(Mixture.owner_id == owner, Mixture.name == parent))
            if parent_id is None:
                raise ServiceError(f"no mixture named '{parent}' to grow from")
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
    from models.demo import DEMO_TASKS, demo_files, tuned_demo_spec

    with ctx.session() as s:
        existing = s.scalars(sa.select(Mixture).where(Mixture.owner_id == owner, Mixture.name == "demo")).first()
        if existing is not None:
            return existing
        have = set(s.scalars(sa.select(Dataset.name).where(Dataset.owner_id == owner)))
    for path in demo_files():
        if path.stem not in have:
            create_dataset(ctx=ctx, filename=path.name, data=path.read_bytes(), name=path.stem, owner=owner)
    spec = tuned_demo_spec(base_model, router=router)  # what bench.demo_learns measured on this base
    return save_mixture(
        ctx=ctx, name="demo", spec_json=spec.model_dump(mode="json"), dataset_names=list(DEMO_TASKS), owner=owner
    )


def _check_name(name: str | None, what: str = "mixture name") -> str:
    name = (name or "").strip()
    rule = "use 1-64 letters, digits, '_' or '-', starting with a letter or digit"
    if not name:
        raise ServiceError(f"the {what} is empty; {rule}")
    if not NAME.fullmatch(name):
        raise ServiceError(f"{what} {name!r} is not allowed; {rule}")
    return name


def _parse_json(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as error:
        raise ServiceError(f"the spec is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise ServiceError("the spec must be a JSON object")
    return value


def explain(error: Exception) -> str:
    """``models.spec.explain``, with task-expert rows numbered as the composer's table shows them (from 1)."""
    lines = explain_spec(error).splitlines()
    return "\n".join(
        _ROW.sub(lambda m: f"experts row {int(m.group(1)) + 1}" + (", " if m.group(2) else ""), line) for line in lines
    )


# --------------------------------------------------------------------------------------------------------------------
# Bases: the catalogue, and each base's linear layers read from a weightless (meta-device) skeleton
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseLayout:
    """What the composer needs of a base: its linear layers (leaf name -> d_in, d_out, how many) and its size."""

    name: str
    linear_modules: list[str]
    shapes: dict[str, tuple[int, int, int]]
    parameters: int
    n_layers: int | None
    skeleton: Any = field(repr=False, compare=False)  # the model on the meta device; copied, never changed


_layouts: dict[tuple[str, str], BaseLayout] = {}
_layouts_lock = threading.Lock()


def base_choices(*, ctx: StudioContext) -> list[tuple[str, str]]:
    """The picker's (label, value) pairs: the built-ins (SmolLM2 first, the default), then local model folders."""
    return [(f"{b.label} ({b.id})" if b.kind == "builtin" else b.label, b.id) for b in _catalogue(ctx)]


def _catalogue(ctx: StudioContext) -> list[Any]:
    return catalogue(ctx.settings.bases_data_dir)


def inspect_base(*, ctx: StudioContext, base_model: str | None) -> BaseLayout:
    """The base's linear layers and size, cached per base name (the first look at a built-in may build it once)."""
    name = (base_model or "").strip()
    key = (name, str(ctx.settings.bases_data_dir))
    with _layouts_lock:
        if key not in _layouts:
            _layouts[key] = _read_layout(name, ctx.settings.bases_data_dir)
        return _layouts[key]


def _read_layout(name: str, data_dir: Path) -> BaseLayout:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from models.bases import linear_module_names

    where = "the Hugging Face hub"
    try:
        if name == BUILTIN_TINY:  # its config is fixed: no need to build (pre-train) it just to look at it
            config = LlamaConfig(**TINY_CONFIG)
        else:
            target = resolve_base(name, data_dir)
            where = f"folder {target}" if isinstance(target, Path) else where
            config = AutoConfig.from_pretrained(target, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except UnknownBaseModelError as error:
        raise ServiceError(str(error)) from error
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        hint = " (offline: HF_HUB_OFFLINE is set and the model is not in the local cache)" if offline else ""
        detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise ServiceError(f"base model {name!r} could not be read from {where}{hint}: {detail}") from error
    names = linear_module_names(model)
    if not names:
        raise ServiceError(f"base model {name!r} has no linear layers a LoRA expert could target")
    return BaseLayout(
        name=name,
        linear_modules=names,
        shapes=_shapes(model, names),
        parameters=sum(p.numel() for p in model.parameters()),
        n_layers=getattr(config, "num_hidden_layers", None),
        skeleton=model,
    )


def _shapes(model: Any, names: list[str]) -> dict[str, tuple[int, int, int]]:
    """Leaf name -> (d_in, d_out of its first occurrence, number of occurrences)."""
    found: dict[str, tuple[int, int, int]] = {}
    for path, module in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        weight = getattr(module, "weight", None)
        if leaf in names and weight is not None and weight.dim() == 2:
            d_in, d_out, count = found.get(leaf, (int(weight.shape[1]), int(weight.shape[0]), 0))
            found[leaf] = (d_in, d_out, count + 1)
    return found


def target_choices(
    *, ctx: StudioContext, base_model: str | None, current: list[str] | None = None
) -> tuple[list[str], list[str]]:
    """The base's linear layers, and the targets to tick: the current ones the base has, else the default pair
    (``q_proj``, ``v_proj``) where it has them, else its first layer."""
    names = inspect_base(ctx=ctx, base_model=base_model).linear_modules
    ticked = [n for n in (current or []) if n in names]
    ticked = ticked or [n for n in ComposeForm().target_modules or [] if n in names] or names[:1]
    return names, ticked


def parameter_count(*, ctx: StudioContext, spec: MixtureSpec) -> tuple[int, int, float]:
    """(trainable mixture parameters, base parameters, trainable as % of the base): the spec attached for real to a
    weightless copy of the base, so every router kind and option counts exactly. Raises ``ServiceError`` for an
    unknown base or a target module the base lacks."""
    layout = inspect_base(ctx=ctx, base_model=spec.base_model)
    shape = spec.model_dump(mode="json", exclude={"schedule", "loss", "base_model"})  # what the count depends on
    trainable, base = _count(layout.name, str(ctx.settings.bases_data_dir), json.dumps(shape, sort_keys=True))
    return trainable, base, 100.0 * trainable / base if base else 0.0


@lru_cache(maxsize=256)
def _count(base_model: str, data_dir: str, shape_json: str) -> tuple[int, int]:
    from models.mixture import MixtureError, attach_mixture

    layout = _layouts[(base_model, data_dir)]
    spec = MixtureSpec.model_validate(json.loads(shape_json) | {"base_model": base_model or "-"})
    try:
        mixture = attach_mixture(copy.deepcopy(layout.skeleton), spec)
    except MixtureError as error:
        raise ServiceError(f"target_modules: {error}") from error
    return mixture.trainable_parameter_count()


# --------------------------------------------------------------------------------------------------------------------
# The composer's form and the spec
# --------------------------------------------------------------------------------------------------------------------


def _stage_text(steps: list[int]) -> str:
    return ", ".join(str(s) for s in steps)


@dataclass
class ComposeForm:
    """Every value of the composer's form, in the order of the tab's inputs; ``build_spec`` makes it a spec.

    Values arrive as the widgets give them (numbers as floats or None, tables as data frames or lists of rows,
    comma-separated text); the spec's own validation judges them, so its messages name the field.
    """

    base_model: str | None = BUILTIN_SMOLLM2
    tasks: str | list[str] | None = ""
    target_modules: list[str] | None = field(default_factory=lambda: ["q_proj", "v_proj"])
    universal_count: float | None = _UNIVERSAL.count
    universal_rank: float | None = _UNIVERSAL.rank
    universal_alpha: float | None = _UNIVERSAL.alpha
    train_embeddings: bool | None = _UNIVERSAL.train_embeddings
    train_head: bool | None = _UNIVERSAL.train_head
    lora_dropout: float | None = 0.0
    experts: Any = None  # rows of EXPERT_COLUMNS
    router_kind: str | None = "task"
    router_options: Any = None  # rows of OPTION_COLUMNS; blank value = the option's default
    weighting: str | None = _LOSS.weighting
    temperature: float | None = _LOSS.temperature
    gamma: float | None = _LOSS.gamma
    epsilon: float | None = _LOSS.epsilon
    targets: str | None = ""  # "task=0.9, other=0.8"
    schedule_kind: str | None = _SCHEDULE.kind
    stage_steps: str | None = _stage_text(_SCHEDULE.stage_steps)
    batch_size: float | None = _SCHEDULE.batch_size
    grad_accum: float | None = _SCHEDULE.grad_accum
    learning_rate: float | None = _SCHEDULE.learning_rate
    router_learning_rate: float | None = _SCHEDULE.router_learning_rate or 0.0  # 0 = the learning rate
    warmup_steps: float | None = _SCHEDULE.warmup_steps
    max_length: float | None = _SCHEDULE.max_length
    seed: float | None = _SCHEDULE.seed
    eval_every: float | None = _SCHEDULE.eval_every
    checkpoint_every: float | None = _SCHEDULE.checkpoint_every


FORM_FIELDS = [f.name for f in ComposeForm.__dataclass_fields__.values()]


def build_spec(*, form: ComposeForm) -> MixtureSpec:
    """The form's values as a validated ``MixtureSpec``; ``ServiceError`` naming the field otherwise."""
    tasks = split_names(form.tasks)
    if not tasks:
        raise ServiceError("tasks: pick at least one dataset; its tasks become the mixture's tasks")
    kind = (form.router_kind or "").strip()
    options = _options(form.router_options)
    if kind in ROUTER_KINDS:
        try:
            options = ROUTER_KINDS[kind].Options.model_validate(options).model_dump()
        except ValueError as error:
            raise ServiceError("\n".join(f"router.options.{line}" for line in explain(error).splitlines())) from error
    data = {
        "base_model": (form.base_model or "").strip(),
        "tasks": tasks,
        "target_modules": list(form.target_modules or []),
        "universal": {
            "count": form.universal_count,
            "rank": form.universal_rank,
            "alpha": form.universal_alpha,
            "train_embeddings": bool(form.train_embeddings),
            "train_head": bool(form.train_head),
        },
        "experts": _experts(form.experts),
        "router": {"kind": kind, "options": options},
        "lora_dropout": form.lora_dropout,
        "loss": {
            "weighting": form.weighting,
            "temperature": form.temperature,
            "gamma": form.gamma,
            "epsilon": form.epsilon,
            "targets": _targets(form.targets),
        },
        "schedule": {
            "kind": form.schedule_kind,
            "stage_steps": [s for s in _SPLIT.split(str(form.stage_steps or "")) if s],
            **{name: getattr(form, name) for name in ("batch_size", "grad_accum", "learning_rate", "warmup_steps")},
            "router_learning_rate": form.router_learning_rate or None,  # empty or 0: the learning rate
            **{name: getattr(form, name) for name in ("max_length", "seed", "eval_every", "checkpoint_every")},
        },
    }
    try:
        return MixtureSpec.model_validate(data)
    except ValueError as error:
        raise ServiceError(explain(error)) from error


def form_from_spec(spec: MixtureSpec | dict | str) -> ComposeForm:
    """The form showing ``spec`` (open a saved mixture, or prefill from an expert's spec)."""
    spec = _as_spec(spec)
    u, loss, sch = spec.universal, spec.loss, spec.schedule
    return ComposeForm(
        base_model=spec.base_model,
        tasks=", ".join(spec.tasks),
        target_modules=list(spec.target_modules),
        universal_count=u.count,
        universal_rank=u.rank,
        universal_alpha=u.alpha,
        train_embeddings=u.train_embeddings,
        train_head=u.train_head,
        lora_dropout=spec.lora_dropout,
        experts=expert_rows([e.model_dump() for e in spec.experts]),
        router_kind=spec.router.kind,
        router_options=router_option_rows(spec.router.kind, spec.router.options),
        weighting=loss.weighting,
        temperature=loss.temperature,
        gamma=loss.gamma,
        epsilon=loss.epsilon,
        targets=", ".join(f"{task}={value:g}" for task, value in loss.targets.items()),
        schedule_kind=sch.kind,
        stage_steps=_stage_text(sch.stage_steps),
        batch_size=sch.batch_size,
        grad_accum=sch.grad_accum,
        learning_rate=sch.learning_rate,
        router_learning_rate=sch.router_learning_rate or 0.0,
        warmup_steps=sch.warmup_steps,
        max_length=sch.max_length,
        seed=sch.seed,
        eval_every=sch.eval_every,
        checkpoint_every=sch.checkpoint_every,
    )


def _as_spec(spec: MixtureSpec | dict | str | None) -> MixtureSpec:
    if isinstance(spec, MixtureSpec):
        return spec
    if spec is None or spec == "":
        raise ServiceError("no spec given")
    try:
        return MixtureSpec.model_validate(_parse_json(spec) if isinstance(spec, str) else spec)
    except ValueError as error:
        raise ServiceError(explain(error)) from error


def split_names(value: str | list[str] | None) -> list[str]:
    """Names from comma/space-separated text or a list, in order, blanks dropped."""
    items = value if isinstance(value, list | tuple) else _SPLIT.split(str(value or ""))
    return [str(item).strip() for item in items if str(item).strip()]


def _rows(table: Any) -> list[list[Any]]:
    """A table as a list of rows, however it arrives: data frame, list of rows, or ``{"data": ...}``; blank rows go."""
    if table is None:
        return []
    if isinstance(table, pd.DataFrame):
        rows = table.astype(object).where(table.notna(), None).values.tolist()
    elif isinstance(table, dict):
        rows = list(table.get("data") or [])
    else:
        rows = [list(row) for row in table]
    return [row for row in rows if any(_blank(cell) is not None for cell in row)]


def _blank(cell: Any) -> Any:
    """None for an empty cell (None, NaN, blank text), else the cell, text stripped."""
    if cell is None or (isinstance(cell, float) and cell != cell):
        return None
    if isinstance(cell, str):
        return cell.strip() or None
    return cell


def _experts(table: Any) -> list[dict[str, Any]]:
    experts = []
    for row in _rows(table):
        name, tasks, rank, alpha, group = ([*row, None, None, None, None, None])[:5]
        experts.append(
            {
                "name": str(_blank(name) or ""),
                "tasks": split_names(_blank(tasks)),
                "rank": _blank(rank),
                "alpha": _blank(alpha),
                "group": None if _blank(group) is None else str(_blank(group)),
            }
        )
    return experts


def _options(table: Any) -> dict[str, Any]:
    options = {}
    for row in _rows(table):
        option, value = _blank(row[0]), _blank(row[1]) if len(row) > 1 else None
        if option is not None and value is not None:
            options[str(option)] = value
    return options


def _targets(text: str | None) -> dict[str, Any]:
    targets = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        task, sep, value = item.partition("=")
        if not sep or not task.strip() or not value.strip():
            raise ServiceError(
                f"loss.targets: write task=value pairs separated by commas, e.g. dates=0.9; got {item!r}"
            )
        targets[task.strip()] = value.strip()
    return targets


def expert_rows(experts: list[dict[str, Any]]) -> pd.DataFrame:
    """The task-expert table: one row per expert (name, tasks comma-separated, rank, alpha, group)."""
    rows = [
        [
            e["name"],
            ", ".join(e["tasks"]),
            e.get("rank", _EXPERT.rank),
            e.get("alpha", _EXPERT.alpha),
            e.get("group") or "",
        ]
        for e in experts
    ]
    return pd.DataFrame(rows, columns=EXPERT_COLUMNS)


def experts_for_tasks(table: Any, tasks: list[str]) -> pd.DataFrame:
    """Keep the rows whose tasks are all still chosen; add one default expert for each task no row covers."""
    kept = [e for e in _experts(table) if e["tasks"] and all(t in tasks for t in e["tasks"])]
    covered = {t for e in kept for t in e["tasks"]}
    names = {e["name"] for e in kept}
    for task in tasks:
        if task not in covered and f"{task}-expert" not in names:
            kept.append({"name": f"{task}-expert", "tasks": [task], "rank": _EXPERT.rank, "alpha": _EXPERT.alpha})
    return expert_rows(kept)


def router_option_rows(kind: str | None, options: dict[str, Any] | None = None) -> pd.DataFrame:
    """The option table of a router kind, generated from its ``Options`` model: name, value (default), what it is."""
    cls = ROUTER_KINDS.get(kind or "")
    if cls is None:
        return pd.DataFrame([], columns=OPTION_COLUMNS)
    values = cls.Options.model_validate(options or {}).model_dump()
    rows = []
    for name, info in cls.Options.model_fields.items():
        rows.append([name, _show(values.get(name)), _about(info)])
    return pd.DataFrame(rows, columns=OPTION_COLUMNS)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _about(info: Any) -> str:
    """A field's description, allowed values (a Literal) and bounds, for the option table."""
    parts = [info.description] if info.description else []
    allowed = typing.get_args(info.annotation) if typing.get_origin(info.annotation) is typing.Literal else ()
    if allowed:
        parts.append("one of: " + ", ".join(str(a) for a in allowed))
    bounds = []
    for item in info.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if getattr(item, attr, None) is not None:
                bounds.append(f"{sign} {getattr(item, attr)}")
    if bounds:
        parts.append(", ".join(bounds))
    return "; ".join(parts)


def router_defaults(
    *, kind: str | None, options: Any, tasks: str | list[str] | None, experts: Any
) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """For the router kind now chosen: its option table and the expert table it fits (none for ``single``, one per
    task when there were none). ``None`` keeps a table as it is: the option table when it already fits the kind
    (a mixture just opened), the experts when they already fit."""
    cls = ROUTER_KINDS.get(kind or "")
    keep_options = cls is None
    if cls is not None and [row[0] for row in _rows(options)] == list(cls.Options.model_fields):
        try:
            cls.Options.model_validate(_options(options))
            keep_options = True
        except ValueError:
            keep_options = False
    rows = _rows(experts)
    if kind == "single":
        table = expert_rows([]) if rows else None
    else:
        table = None if rows or not split_names(tasks) else experts_for_tasks(None, split_names(tasks))
    return (None if keep_options else router_option_rows(kind)), table


def choose_datasets(
    *,
    ctx: StudioContext,
    dataset_names: list[str] | None,
    tasks: str | list[str] | None,
    experts: Any,
    owner: str = LOCAL_OWNER,
) -> tuple[str | None, pd.DataFrame | None]:
    """The tasks of the datasets now chosen and an expert table that covers them (edited rows kept); ``None`` each
    when the tasks are the ones already shown (a mixture just opened keeps its task order and experts)."""
    chosen = tasks_of_datasets(ctx=ctx, dataset_names=dataset_names, owner=owner)
    if set(chosen) == set(split_names(tasks)):
        return None, None
    return ", ".join(chosen), experts_for_tasks(experts, chosen)


def stage_steps_for(kind: str | None, current: str | None = None) -> str:
    """The stage lengths of a schedule kind: the current ones when their number fits, else the defaults."""
    steps = [s for s in _SPLIT.split(current or "") if s]
    expected = SCHEDULE_STAGES.get(kind or "", 1)
    return _stage_text(steps) if len(steps) == expected else _stage_text(DEFAULT_STAGE_STEPS.get(kind or "", [200]))


def tasks_of_datasets(*, ctx: StudioContext, dataset_names: list[str] | None, owner: str = LOCAL_OWNER) -> list[str]:
    """The tasks of the chosen datasets, in the order the datasets are listed."""
    chosen = split_names(dataset_names)
    with ctx.session() as s:
        found = {
            d.name: d for d in s.scalars(sa.select(Dataset).where(Dataset.owner_id == owner, Dataset.name.in_(chosen)))
        }
        missing = [n for n in chosen if n not in found]
        if missing:
            raise ServiceError(f"no dataset named {', '.join(missing)}")
        return list(dict.fromkeys(t for n in chosen for t in found[n].tasks))


def dataset_names(*, ctx: StudioContext, owner: str = LOCAL_OWNER) -> list[str]:
    with ctx.session() as s:
        return list(s.scalars(sa.select(Dataset.name).where(Dataset.owner_id == owner).order_by(Dataset.name)))


def datasets_for_tasks(*, ctx: StudioContext, tasks: list[str], owner: str = LOCAL_OWNER) -> list[str]:
    """Datasets that together hold ``tasks`` and nothing else (by name order, one per task where possible): what a
    spec from elsewhere most likely trained on. Tasks no dataset holds are left for the person to upload."""
    chosen: list[str] = []
    covered: set[str] = set()
    with ctx.session() as s:
        for dataset in s.scalars(sa.select(Dataset).where(Dataset.owner_id == owner).order_by(Dataset.name)):
            if set(dataset.tasks) <= set(tasks) and not set(dataset.tasks) <= covered:
                chosen.append(dataset.name)
                covered |= set(dataset.tasks)
    return chosen


@dataclass
class MixturePreview:
    """What the composer shows for the form as it stands: the spec, the drawing, its caption, or what is wrong."""

    spec: MixtureSpec | None
    svg: str
    caption: str
    message: str = ""


def preview_mixture(*, ctx: StudioContext, form: ComposeForm) -> MixturePreview:
    """The spec, its drawing and parameter count; a form that does not make a spec gets the reason instead."""
    from app.services import diagram

    try:
        spec = build_spec(form=form)
        trainable, base, percent = parameter_count(ctx=ctx, spec=spec)
        layout = inspect_base(ctx=ctx, base_model=spec.base_model)
    except ServiceError as error:
        return MixturePreview(spec=None, svg=diagram.message_svg(), caption="", message=str(error))
    label = next((b.label for b in _catalogue(ctx) if b.id == spec.base_model), spec.base_model)
    svg = diagram.mixture_svg(spec, base_label=label, base_parameters=base, trainable=trainable, shapes=layout.shapes)
    return MixturePreview(spec=spec, svg=svg, caption=diagram.caption(trainable, base, percent))


# --------------------------------------------------------------------------------------------------------------------
# Actions on saved mixtures
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class OpenedMixture:
    """A saved mixture as the composer shows it."""

    name: str
    spec: MixtureSpec
    datasets: list[str]
    parent: str | None
    trained: bool


def _get(s: Session, name: str | None, owner: str) -> Mixture:
    if not (name or "").strip():
        raise ServiceError("choose a mixture first")
    mixture = s.scalars(sa.select(Mixture).where(Mixture.owner_id == owner, Mixture.name == name.strip())).first()
    if mixture is None:
        raise ServiceError(f"no mixture named '{name}'")
    return mixture


def open_mixture(*, ctx: StudioContext, name: str | None, owner: str = LOCAL_OWNER) -> OpenedMixture:
    """A saved mixture's spec, datasets and parent, to load into the form."""
    with ctx.session() as s:
        mixture = _get(s, name, owner)
        parent = s.get(Mixture, mixture.parent_id) if mixture.parent_id else None
        return OpenedMixture(
            name=mixture.name,
            spec=MixtureSpec.model_validate(mixture.spec_json),
            datasets=sorted(d.name for d in mixture.datasets),
            parent=parent.name if parent else None,
            trained=mixture.trained,
        )


def duplicate_mixture(
    *, ctx: StudioContext, name: str | None, new_name: str | None, owner: str = LOCAL_OWNER
) -> Mixture:
    """A copy of a saved mixture under a new name (same spec, datasets and parent), not trained."""
    opened = open_mixture(ctx=ctx, name=name, owner=owner)
    return save_mixture(
        ctx=ctx,
        name=_check_name(new_name, "new mixture name"),
        spec_json=opened.spec.model_dump(mode="json"),
        dataset_names=opened.datasets,
        owner=owner,
        parent=opened.parent,
    )


def add_task(
    *,
    ctx: StudioContext,
    name: str | None,
    dataset: str | None,
    new_name: str | None = None,
    steps: tuple[int, int] = ADD_TASK_STEPS,
    owner: str = LOCAL_OWNER,
) -> Mixture:
    """A child of a trained mixture with one more expert, for the one task of ``dataset`` (the add_task schedule:
    the new expert trains while the others stay frozen, then the router)."""
    opened = open_mixture(ctx=ctx, name=name, owner=owner)
    if not opened.trained:
        raise ServiceError(f"mixture '{opened.name}' is not trained yet: train it first, then add a task to it")
    if not (dataset or "").strip():
        raise ServiceError("choose the dataset of the new task")
    tasks = tasks_of_datasets(ctx=ctx, dataset_names=[dataset.strip()], owner=owner)
    if len(tasks) != 1:
        raise ServiceError(
            f"dataset '{dataset}' holds {len(tasks)} tasks ({', '.join(tasks)}); add one task at a time"
        )
    task = tasks[0]
    try:
        spec = opened.spec.with_task_expert(task, steps=steps)
    except ValueError as error:
        raise ServiceError(explain(error)) from error
    return save_mixture(
        ctx=ctx,
        name=_check_name(new_name or f"{opened.name}-{task}"),
        spec_json=spec.model_dump(mode="json"),
        dataset_names=[*opened.datasets, dataset.strip()],
        owner=owner,
        parent=opened.name,
    )


def start_training(*, ctx: StudioContext, name: str | None, owner: str = LOCAL_OWNER) -> uuid.UUID:
    """Queue a training job for a saved mixture (refused while its datasets or its trained parent are missing)."""
    from worker.dispatch import submit_training

    with ctx.session() as s:
        mixture = _get(s, name, owner)
        _check_trainable(s, ctx, mixture)
        mixture_id = mixture.id
    try:
        return submit_training(ctx.settings, mixture_id)
    except ValueError as error:
        raise ServiceError(str(error)) from error


def _check_trainable(s: Session, ctx: StudioContext, mixture: Mixture) -> None:
    if not mixture.datasets:
        raise ServiceError(f"mixture '{mixture.name}' has no datasets any more (deleted?); it cannot be trained")
    gone = sorted(d.name for d in mixture.datasets if not ctx.store.exists(d.artifact_key))
    if gone:
        raise ServiceError(
            f"the file of dataset(s) {', '.join(gone)} of mixture '{mixture.name}' is gone; upload it again"
        )
    spec = MixtureSpec.model_validate(mixture.spec_json)
    have = {t for d in mixture.datasets for t in d.tasks}
    lacking = [t for t in spec.tasks if t not in have]
    if lacking:
        raise ServiceError(f"no dataset of mixture '{mixture.name}' holds task(s) {', '.join(lacking)} any more")
    if spec.schedule.kind == "add_task":
        parent = s.get(Mixture, mixture.parent_id) if mixture.parent_id else None
        if parent is None or not parent.trained:
            what = f"its parent '{parent.name}' is not trained" if parent else "the mixture it grows from is gone"
            raise ServiceError(f"mixture '{mixture.name}' adds a task to a trained mixture, but {what}")
    running = s.scalar(
        sa.select(Job.id).where(Job.mixture_id == mixture.id, Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
    )
    if running is not None:
        raise ServiceError(f"mixture '{mixture.name}' already has a job queued or running ({running})")
