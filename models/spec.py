"""The mixture blueprint: one ``MixtureSpec`` flows from the composer through the database and the job to the trainer.

Frozen pydantic models with ``extra="forbid"``; every check names the field and what would be allowed, because
these messages are shown to people as they are. ``MixtureSpec.model_validate_json(spec.model_dump_json())``
gives back an equal spec.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from models.routers import ROUTER_KINDS

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,127}$")
SCHEDULE_STAGES = {"joint": 1, "modula": 3, "at_moe": 2, "add_task": 2}
Weighting = Literal["uniform", "proportional", "temperature", "achievement"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_name(value: str, what: str) -> str:
    if not NAME.match(value):
        raise ValueError(f"{what} {value!r} may hold only letters, digits, '_' and '-' (1-64, starting alphanumeric)")
    return value


def _check_tasks(tasks: list[str]) -> list[str]:
    for task in tasks:
        _check_name(task, "task name")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"a task is listed twice: {tasks}")
    return tasks


class UniversalExperts(_Frozen):
    """Experts shared by every task, always on (routed only by MoDULA-Flan)."""

    count: int = Field(1, ge=0, le=8, description="number of universal experts")
    rank: int = Field(8, ge=1, le=512)
    alpha: float = Field(16.0, gt=0.0, le=4096.0)
    train_embeddings: bool = Field(False, description="the universal expert also owns trainable input embeddings")
    train_head: bool = Field(False, description="the universal expert also owns a trainable output head")


class TaskExpert(_Frozen):
    """One task-specific expert: the tasks it owns, its size and (for the grouped router) its group."""

    name: str
    tasks: list[str] = Field(min_length=1)
    rank: int = Field(8, ge=1, le=512)
    alpha: float = Field(16.0, gt=0.0, le=4096.0)
    group: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value, "expert name")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, value: list[str]) -> list[str]:
        return _check_tasks(value)

    @field_validator("group")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        return None if value is None else _check_name(value, "group name")


class RouterSpec(_Frozen):
    """A router kind from ``ROUTER_KINDS`` and its options, validated (and defaulted) by that kind's ``Options``."""

    kind: str = "task"
    options: dict[str, Any] = Field(default_factory=dict, validate_default=True)

    @field_validator("kind")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in ROUTER_KINDS:
            raise ValueError(f"unknown router kind {value!r}; choose one of: {', '.join(ROUTER_KINDS)}")
        return value

    @field_validator("options")
    @classmethod
    def _options(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        kind = info.data.get("kind")
        if kind is None:
            return value
        return ROUTER_KINDS[kind].Options.model_validate(value).model_dump()


class LossSpec(_Frozen):
    """Multi-task weighting (ALGORITHMS.md §3) and the λ of the router losses that are not router options."""

    weighting: Weighting = "uniform"
    temperature: float = Field(2.0, gt=0.0, le=100.0, description="T of the temperature weighting")
    gamma: float = Field(2.0, ge=0.0, le=10.0, description="focusing γ of the achievement weighting")
    epsilon: float = Field(0.05, ge=0.0, le=1.0, description="floor ε of the achievement weights")
    targets: dict[str, float] = Field(default_factory=dict, description="potential m*_t per task (default 1.0)")


class ScheduleSpec(_Frozen):
    """Which stages run (ALGORITHMS.md §4), their lengths in optimizer steps, and the optimisation settings."""

    kind: Literal["joint", "modula", "at_moe", "add_task"] = "joint"
    stage_steps: list[int] = Field(default_factory=lambda: [200], description="steps of each stage, in order")
    batch_size: int = Field(8, ge=1, le=1024)
    grad_accum: int = Field(1, ge=1, le=256)
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    router_learning_rate: float | None = Field(None, gt=0.0, le=1.0, description="router-only stages (default: lr)")
    warmup_steps: int = Field(0, ge=0)
    max_length: int = Field(256, ge=8, le=32_768)
    seed: int = 0
    eval_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(50, ge=1)

    @model_validator(mode="after")
    def _stages(self) -> ScheduleSpec:
        expected = SCHEDULE_STAGES[self.kind]
        if len(self.stage_steps) != expected:
            raise ValueError(
                f"schedule '{self.kind}' has {expected} stage(s); got {len(self.stage_steps)} stage lengths"
            )
        if any(steps < 1 for steps in self.stage_steps):
            raise ValueError(f"every stage needs at least one step, got {self.stage_steps}")
        return self


class MixtureSpec(_Frozen):
    """The whole blueprint of a mixture of LoRA experts on one base model."""

    version: Literal[1] = 1
    base_model: str = Field(min_length=1, max_length=512)
    tasks: list[str] = Field(min_length=1, description="the tasks of the training data, in id order")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    universal: UniversalExperts = Field(default_factory=UniversalExperts)
    experts: list[TaskExpert] = Field(default_factory=list)
    router: RouterSpec = Field(default_factory=RouterSpec)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    loss: LossSpec = Field(default_factory=LossSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, value: list[str]) -> list[str]:
        return _check_tasks(value)

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, value: list[str]) -> list[str]:
        for module in value:
            if not MODULE.match(module):
                raise ValueError(f"target module {module!r} is not a module name like 'q_proj'")
        return value

    @model_validator(mode="after")
    def _fits_together(self) -> MixtureSpec:
        names = [e.name for e in self.experts]
        if len(set(names)) != len(names):
            raise ValueError(f"expert names must be unique, got {names}")
        if self.universal.count == 0 and not self.experts:
            raise ValueError("the mixture has no experts: add a universal expert or task experts")
        for expert in self.experts:
            for task in expert.tasks:
                if task not in self.tasks:
                    raise ValueError(
                        f"expert '{expert.name}' names task '{task}', which is not among the "
                        f"mixture's tasks ({', '.join(self.tasks)})"
                    )
        kind = self.router.kind
        if kind not in ("single", "modula") or self.experts:
            covered = {task for e in self.experts for task in e.tasks}
            for task in self.tasks:
                if task not in covered and (kind == "task" or self.universal.count == 0):
                    raise ValueError(f"task '{task}' has no expert")
        router_cls = ROUTER_KINDS[kind]
        options = router_cls.Options.model_validate(self.router.options)
        routed = len(self.experts) + (self.universal.count if self.routes_universal else 0)
        router_cls.check(
            options,
            n_experts=routed,
            n_universal=self.universal.count,
            groups=[e.group for e in self.experts],
            ranks=[e.rank for e in self.experts],
        )
        if self.schedule.kind in ("modula", "at_moe", "add_task") and not self.experts:
            raise ValueError(f"schedule '{self.schedule.kind}' trains task experts; the mixture has none")
        if self.schedule.kind == "modula" and self.universal.count == 0:
            raise ValueError("schedule 'modula' first trains the universal expert; the mixture has none")
        return self

    # --- derived views (not stored) ---

    @property
    def routes_universal(self) -> bool:
        """MoDULA-Flan routes the universal experts together with the domain experts."""
        return self.router.kind == "modula" and self.router.options.get("variant") == "flan"

    @property
    def router_options(self) -> Any:
        return ROUTER_KINDS[self.router.kind].Options.model_validate(self.router.options)

    def task_experts(self) -> list[list[int]]:
        """For each task id, the indices of the task experts that own it."""
        return [[i for i, e in enumerate(self.experts) if task in e.tasks] for task in self.tasks]

    def group_ids(self) -> list[int]:
        """Group index of each task expert; experts without a group get one of their own."""
        labels = [e.group if e.group is not None else f"__{e.name}" for e in self.experts]
        order = list(dict.fromkeys(labels))
        return [order.index(label) for label in labels]

    def group_names(self) -> list[str]:
        labels = [e.group if e.group is not None else e.name for e in self.experts]
        return list(dict.fromkeys(labels))

    def with_task_expert(
        self,
        task: str,
        *,
        rank: int | None = None,
        alpha: float | None = None,
        group: str | None = None,
        name: str | None = None,
        steps: tuple[int, int] = (100, 50),
    ) -> MixtureSpec:
        """The spec of ``add_task``: this mixture plus one expert for a new task, on the add_task schedule."""
        if task in self.tasks:
            raise ValueError(f"task '{task}' is already in the mixture")
        template = self.experts[-1] if self.experts else None
        expert = TaskExpert(
            name=name or task,
            tasks=[task],
            rank=rank or (template.rank if template else 8),
            alpha=alpha or (template.alpha if template else 16.0),
            group=group,
        )
        schedule = self.schedule.model_copy(update={"kind": "add_task", "stage_steps": list(steps)})
        return MixtureSpec.model_validate(
            self.model_dump()
            | {
                "tasks": [*self.tasks, task],
                "experts": [*[e.model_dump() for e in self.experts], expert.model_dump()],
                "schedule": schedule.model_dump(),
            }
        )


def default_spec(base_model: str, tasks: list[str], *, router: str = "task", **changes: Any) -> MixtureSpec:
    """The composer's starting point: one universal expert and one expert per task."""
    experts = [TaskExpert(name=f"{task}-expert", tasks=[task]) for task in tasks]
    data: dict[str, Any] = {"base_model": base_model, "tasks": tasks, "experts": experts, "router": {"kind": router}}
    if router == "single":
        data["experts"] = []
    return MixtureSpec.model_validate(data | changes)


def explain(error: Exception) -> str:
    """One readable line per problem of a pydantic ``ValidationError`` (field path, then message)."""
    if not hasattr(error, "errors"):
        return str(error)
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item.get("loc", ()))
        message = str(item.get("msg", "")).removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if where else message)
    return "\n".join(lines)
