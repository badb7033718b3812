"""MixtureSpec: valid specs round-trip through JSON; invalid ones fail with a message naming the problem."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from models.routers import ROUTER_KINDS
from models.spec import MixtureSpec, default_spec, explain

TASKS = ["dates", "emails", "questions"]


def _spec(**changes: Any) -> MixtureSpec:
    return MixtureSpec.model_validate(default_spec("builtin:tiny", TASKS).model_dump() | changes)


@pytest.mark.parametrize("kind", list(ROUTER_KINDS))
def test_every_router_kind_has_a_default_spec_that_round_trips(kind: str) -> None:
    spec = default_spec("builtin:tiny", TASKS, router=kind)
    again = MixtureSpec.model_validate_json(spec.model_dump_json())
    assert again == spec
    assert again.router.options == ROUTER_KINDS[kind].Options().model_dump()


def test_specs_are_frozen() -> None:
    with pytest.raises(ValidationError):
        default_spec("builtin:tiny", TASKS).base_model = "other"  # type: ignore[misc]


BAD = [
    ({"router": {"kind": "topk", "options": {"top_k": 5}}}, "top_k 5 exceeds the 3 routed experts"),
    ({"router": {"kind": "nope"}}, "unknown router kind 'nope'"),
    ({"router": {"kind": "task", "options": {"top_k": 1}}}, "router.options.top_k: Extra inputs are not permitted"),
    ({"experts": [{"name": "d", "tasks": ["dates"]}]}, "task 'emails' has no expert"),
    ({"experts": [{"name": "d", "tasks": ["ner"]}]}, "names task 'ner', which is not among the mixture's tasks"),
    ({"experts": [{"name": "d", "tasks": ["../etc"]}]}, "task name '../etc' may hold only"),
    ({"tasks": ["a/b"]}, "task name 'a/b' may hold only"),
    (
        {"experts": [{"name": "x", "tasks": ["dates"]}, {"name": "x", "tasks": ["emails", "questions"]}]},
        "expert names must be unique",
    ),
    ({"universal": {"count": 0}, "experts": []}, "the mixture has no experts"),
    ({"router": {"kind": "single"}}, "router 'single' is one plain LoRA: remove the 3 task experts"),
    ({"router": {"kind": "task", "options": {"granularity": "token"}}}, "granularity"),
    ({"schedule": {"kind": "modula", "stage_steps": [10]}}, "schedule 'modula' has 3 stage(s)"),
    ({"schedule": {"kind": "at_moe", "stage_steps": [10, 0]}}, "at least one step"),
    ({"universal": {"count": 0}, "router": {"kind": "modula"}}, "router 'modula' needs at least one universal expert"),
    (
        {
            "experts": [{"name": "a", "tasks": ["dates"], "rank": 4}, {"name": "b", "tasks": ["emails", "questions"]}],
            "router": {"kind": "semantic"},
        },
        "all task experts need one rank",
    ),
    ({"target_modules": ["q_proj; rm -rf /"]}, "is not a module name"),
    ({"lora_dropout": 1.5}, "lora_dropout"),
    ({"surprise": 1}, "surprise: Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("changes", "message"), BAD)
def test_bad_specs_name_the_problem(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        _spec(**changes)
    assert message in explain(info.value)


def test_single_router_is_one_universal_lora_and_modula_flan_routes_universal() -> None:
    assert default_spec("builtin:tiny", TASKS, router="single").experts == []
    flan = _spec(router={"kind": "modula", "options": {"variant": "flan"}})
    assert flan.routes_universal and not _spec(router={"kind": "modula"}).routes_universal


def test_groups_default_to_one_per_expert_and_shared_names_share_a_group() -> None:
    spec = _spec(
        router={"kind": "grouped"},
        experts=[
            {"name": "a", "tasks": ["dates"], "group": "text"},
            {"name": "b", "tasks": ["emails"], "group": "text"},
            {"name": "c", "tasks": ["questions"]},
        ],
    )
    assert spec.group_ids() == [0, 0, 1] and spec.group_names() == ["text", "c"]


def test_with_task_expert_adds_one_expert_on_the_add_task_schedule() -> None:
    spec = _spec()
    grown = spec.with_task_expert("times")
    assert grown.tasks == [*TASKS, "times"] and grown.experts[:-1] == spec.experts
    assert grown.schedule.kind == "add_task" and len(grown.schedule.stage_steps) == 2
    with pytest.raises(ValueError, match="already in the mixture"):
        spec.with_task_expert("dates")
