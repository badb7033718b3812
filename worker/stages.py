"""Which parameters train on which data, stage by stage, for each schedule (ALGORITHMS.md §4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from models.mixture import universal_names
from models.routers import ROUTER_KINDS
from models.spec import MixtureSpec

Routing = Literal["router", "own_task", "universal_only"]


@dataclass(frozen=True)
class Stage:
    """One stage: its trainable groups, how samples are routed while it trains, and the tasks it samples.

    routing: ``router`` (the learned or task router), ``own_task`` (each sample to its own task's expert),
    ``universal_only`` (the universal experts alone, at weight 1).
    """

    name: str
    steps: int
    experts: tuple[str, ...] = ()
    router: bool = False
    shared: bool = False
    extras: bool = False
    routing: Routing = "router"
    universal_on: bool = True  # with own_task: MoDULA-Flan's domain stage runs the domain expert alone
    tasks: tuple[str, ...] | None = None  # None: every task of the spec


def plan_stages(spec: MixtureSpec) -> list[Stage]:
    """The stages of ``spec.schedule``; a router stage is dropped when the router learns nothing (task, single)."""
    steps = spec.schedule.stage_steps
    universal = tuple(universal_names(spec))
    specific = tuple(e.name for e in spec.experts)
    learned_router = ROUTER_KINDS[spec.router.kind].learned
    extras = spec.universal.train_embeddings or spec.universal.train_head
    kind = spec.schedule.kind
    if kind == "joint":
        stages = [Stage("joint", steps[0], universal + specific, router=learned_router, shared=True, extras=extras)]
    elif kind == "modula":
        stages = [
            Stage("universal", steps[0], universal, extras=extras, routing="universal_only"),
            Stage(
                "domain", steps[1], specific, shared=True, routing="own_task", universal_on=not spec.routes_universal
            ),
            Stage("router", steps[2], router=True),
        ]
    elif kind == "at_moe":
        stages = [
            Stage("experts", steps[0], universal + specific, shared=True, extras=extras, routing="own_task"),
            Stage("router", steps[1], router=True),
        ]
    else:  # add_task: the last expert of the spec is the new one
        new = spec.experts[-1]
        stages = [
            Stage("new-expert", steps[0], (new.name,), routing="own_task", tasks=tuple(new.tasks)),
            Stage("router", steps[1], router=True),
        ]
    return [s for s in stages if not (s.name == "router" and not learned_router)]
