"""Playground services on a real database with a trained tiny mixture: run, compare, override, figures, refusals."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from matplotlib.figure import Figure

from app.context import ServiceError, StudioContext
from app.services import playground as services
from app.services.mixtures import save_mixture
from models.bases import BUILTIN_TINY
from models.demo import DEMO_TASKS, demo_spec
from models.registry import Job, JobState, Mixture
from tests.conftest import demo_studio, train_now
from worker import inference
from worker.jobs import experts_prefix

PROMPT, INPUT = "Rewrite the date as DD/MM/YYYY.", "2031-07-19"
EXPERTS = [f"{task}-expert" for task in DEMO_TASKS]
FIRST, SECOND, THIRD, LAST = EXPERTS


def _spec(router: str = "softmax") -> dict:
    spec = demo_spec(BUILTIN_TINY, router=router).model_dump(mode="json")
    spec["schedule"] |= {"kind": "joint", "stage_steps": [2], "batch_size": 4, "eval_every": 1000, "max_length": 96}
    return spec


def _copy_training(ctx: StudioContext, source: str, target: str) -> None:
    """Mark ``target`` trained with ``source``'s expert files (as if it had been trained the same way)."""
    with ctx.session() as s:
        source_id, target_id = (s.scalar(sa.select(Mixture.id).where(Mixture.name == n)) for n in (source, target))
        old = s.scalars(sa.select(Job).where(Job.mixture_id == source_id)).one()
        job = Job(
            mixture_id=target_id, spec_json=old.spec_json, state=JobState.SUCCEEDED, finished_at=datetime.now(UTC)
        )
        s.add(job)
        s.flush()
        old_prefix, new_prefix = experts_prefix(old), experts_prefix(job)
        s.execute(sa.update(Mixture).where(Mixture.id == target_id).values(trained=True))
    for key in ctx.store.list(old_prefix):
        ctx.store.put_bytes(f"{new_prefix}/{key.rsplit('/', 1)[1]}", ctx.store.get_bytes(key))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory, bases_dir: Path) -> Iterator[StudioContext]:
    """Mixtures 'main' (trained), 'twin' (the same experts) and 'draft' (never trained)."""
    context = demo_studio(tmp_path_factory.mktemp("studio"), bases_dir)
    settings = context.settings
    for name in ("main", "twin", "draft"):
        save_mixture(ctx=context, name=name, spec_json=_spec(), dataset_names=list(DEMO_TASKS))
    with context.session() as s:
        main_id = s.scalar(sa.select(Mixture.id).where(Mixture.name == "main"))
    train_now(settings, main_id)
    _copy_training(context, "main", "twin")
    yield context
    inference.clear_cache()


def test_only_trained_mixtures_are_listed(ctx: StudioContext) -> None:
    assert services.list_trained_mixtures(ctx=ctx) == ["main", "twin"]
    assert services.list_trained_mixtures(ctx=ctx, owner="someone-else") == []


def test_describe_mixture_reads_the_spec(ctx: StudioContext) -> None:
    info = services.describe_mixture(ctx=ctx, mixture="main")
    assert info.router == "softmax" and info.tasks == list(DEMO_TASKS) and info.task_use is None
    assert info.expert_names == ["universal-0", *EXPERTS]


def test_run_prompt_returns_output_and_weights(ctx: StudioContext) -> None:
    result = services.run_prompt(ctx=ctx, mixture="main", prompt=PROMPT, input_text=INPUT, max_new_tokens=8.0)
    assert isinstance(result.text, str) and 1 <= len(result.generated_tokens) <= 8
    assert result.layer_weights.shape == (len(result.layer_names), len(EXPERTS))
    np.testing.assert_allclose(result.layer_weights.sum(-1), 1.0, atol=1e-5)
    assert "tokens in" in services.describe_result(result)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompt": ""}, "the prompt is empty"),
        ({"prompt": "  \n\t "}, "the prompt is empty"),
        ({"prompt": None}, "the prompt is empty"),
        ({"mixture": None}, "choose a trained mixture first"),
        ({"mixture": "draft"}, "mixture 'draft' is not trained yet"),
        ({"mixture": "nothing"}, "no mixture named 'nothing'"),
        ({"max_new_tokens": 100}, "from 1 to 64"),
        ({"max_new_tokens": 2.5}, "from 1 to 64"),
        ({"task": "../etc"}, "unknown task '../etc'"),
        ({"disabled": ["ghost"]}, "unknown expert"),
        ({"forced": FIRST}, "name=weight pairs"),
        ({"forced": f"{FIRST}=-2"}, "name=weight pairs"),
    ],
)
def test_bad_requests_are_refused_with_a_message(ctx: StudioContext, changes: dict, message: str) -> None:
    with pytest.raises(ServiceError, match=message.replace(".", r"\.")):
        services.run_prompt(ctx=ctx, **({"mixture": "main", "prompt": PROMPT} | changes))


def test_compare_with_a_second_mixture(ctx: StudioContext) -> None:
    left, right = services.compare(ctx=ctx, mixture="main", prompt=PROMPT, input_text=INPUT, other_mixture="twin")
    assert left.text == right.text  # the same experts
    np.testing.assert_allclose(left.layer_weights, right.layer_weights)


def test_compare_with_one_expert_forces_the_route_to_it(ctx: StudioContext) -> None:
    left, right = services.compare(ctx=ctx, mixture="main", prompt=PROMPT, input_text=INPUT, expert=THIRD)
    expected = np.zeros_like(right.layer_weights)
    expected[:, EXPERTS.index(THIRD)] = 1.0
    np.testing.assert_array_equal(right.layer_weights, expected)
    assert not np.allclose(left.layer_weights, expected)


@pytest.mark.parametrize(
    ("choice", "message"),
    [
        ({}, "choose either a second mixture or one expert"),
        ({"other_mixture": "twin", "expert": FIRST}, "choose either"),
        ({"other_mixture": "draft"}, "'draft' is not trained yet"),
        ({"expert": "ghost"}, r"unknown expert\(s\) ghost"),
    ],
)
def test_compare_refusals(ctx: StudioContext, choice: dict, message: str) -> None:
    with pytest.raises(ServiceError, match=message):
        services.compare(ctx=ctx, mixture="main", prompt=PROMPT, **choice)


def test_override_changes_the_weights_and_reports_the_change(ctx: StudioContext) -> None:
    routed, changed = services.run_override(ctx=ctx, mixture="main", prompt=PROMPT, input_text=INPUT, disabled=[THIRD])
    assert (changed.layer_weights[:, EXPERTS.index(THIRD)] == 0).all()
    assert (routed.layer_weights[:, EXPERTS.index(THIRD)] > 0).all()
    assert changed.token_probs != routed.token_probs
    note = services.describe_change(routed, changed)
    assert note.startswith("The output changed") or "moved by up to" in note
    _, forced = services.run_override(ctx=ctx, mixture="main", prompt=PROMPT, forced=f"{FIRST} = 2, {LAST}:1")
    np.testing.assert_allclose(forced.layer_weights[0], [2.0, 0.0, 0.0, 1.0])
    with pytest.raises(ServiceError, match="disable at least one expert or force"):
        services.run_override(ctx=ctx, mixture="main", prompt=PROMPT, forced="  ")


def test_parse_forced() -> None:
    assert services.parse_forced("a-expert=1, b:0.5\nc = 0") == {"a-expert": 1.0, "b": 0.5, "c": 0.0}
    assert services.parse_forced("") is None and services.parse_forced(None) is None
    for bad in ("a=x", "=1", "a=inf", "a=1=2"):
        with pytest.raises(ServiceError, match="name=weight"):
            services.parse_forced(bad)


def test_layer_names_are_shortened_unless_they_would_collide() -> None:
    assert services.short_layer_name("model.layers.12.self_attn.q_proj") == "L12 q_proj"
    assert services.short_layer_name("lm_head") == "lm_head"
    names = ["enc.layers.0.q", "dec.layers.0.q"]
    assert services.layer_labels(names) == names


def _labels(figure: Figure) -> tuple[list[str], list[str]]:
    axes = figure.axes[0]
    return [t.get_text() for t in axes.get_xticklabels()], [t.get_text() for t in axes.get_yticklabels()]


def test_heatmaps_carry_readable_labels(ctx: StudioContext) -> None:
    result = services.run_prompt(ctx=ctx, mixture="main", prompt=PROMPT, input_text=INPUT, max_new_tokens=4)
    columns, rows = _labels(services.layer_heatmap(result))
    assert columns == EXPERTS and rows == [services.short_layer_name(n) for n in result.layer_names]
    assert all(row.startswith("L") for row in rows)
    layer = result.layer_names[-1]
    columns, rows = _labels(services.token_heatmap(result, layer))
    assert columns == EXPERTS and rows == [f"{i}: {t}" for i, t in enumerate(result.traced_tokens)]
    assert services.group_figure(result) is None  # softmax has neither groups nor scaling
    assert [label for label, _ in services.layer_choices(result)] == [
        services.short_layer_name(layer) for layer in result.layer_names
    ]
    with pytest.raises(ServiceError, match="unknown layer"):
        services.token_heatmap(result, "model.layers.99.q_proj")
    with pytest.raises(ServiceError, match="run a prompt first"):
        services.token_heatmap(None, layer)


def test_group_weights_and_scale_are_drawn_when_the_router_has_them() -> None:
    layers = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    result = inference.InferenceResult(
        text="x",
        prompt_tokens=["a", "b"],
        generated_tokens=["c"],
        token_probs=[0.5],
        expert_names=EXPERTS,
        routed_names=EXPERTS,
        layer_names=layers,
        layer_weights=np.full((2, 4), 0.25),
        token_weights=np.full((2, 2, 4), 0.25),
        group_names=["strings", "labels"],
        group_weights=np.array([[[0.9, 0.1], [0.7, 0.3]], [[0.2, 0.8], [0.4, 0.6]]]),
        scale=np.array([0.98, 0.5]),
        task="dates",
    )
    figure = services.group_figure(result)
    groups, scale = figure.axes[0], figure.axes[2]  # the group heatmap's colorbar is axes[1]
    assert [t.get_text() for t in groups.get_xticklabels()] == ["strings", "labels"]
    assert [t.get_text() for t in groups.get_yticklabels()] == ["L0 q_proj", "L1 q_proj"]
    np.testing.assert_allclose(groups.images[0].get_array(), [[0.8, 0.2], [0.3, 0.7]])  # mean over tokens
    assert [bar.get_width() for bar in scale.patches] == pytest.approx(
        [0.98, 0.5]
    ) and "task dates" in scale.get_title()
