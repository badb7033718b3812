"""The Playground tab through the running page's API (gradio_client): the endpoints its buttons call."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import pytest
import sqlalchemy as sa
from gradio_client import Client
from gradio_client.exceptions import AppError

from app.main import build_demo, launch_kwargs
from app.services.mixtures import save_mixture
from models.bases import BUILTIN_TINY
from models.demo import DEMO_TASKS, demo_spec
from models.registry import Mixture
from tests import services
from tests.conftest import demo_studio, train_now
from worker import inference

PROMPT, INPUT = "Give the domain of the e-mail address.", "Write to bob7@lab.io."
EXPERTS = [f"{task}-expert" for task in DEMO_TASKS]
FIRST, SECOND, THIRD, LAST = EXPERTS


def _spec(router: str) -> dict:
    spec = demo_spec(BUILTIN_TINY, router=router).model_dump(mode="json")
    spec["schedule"] |= {"kind": "joint", "stage_steps": [1], "batch_size": 4, "eval_every": 1000, "max_length": 96}
    return spec


@pytest.fixture(scope="module")
def studio_url(tmp_path_factory: pytest.TempPathFactory, bases_dir: Path) -> Iterator[str]:
    """The real page over a database with a trained 'tasky' (task routing) and an untrained 'draft' mixture."""
    ctx = demo_studio(tmp_path_factory.mktemp("studio"), bases_dir)
    settings = ctx.settings
    for name in ("tasky", "draft"):
        save_mixture(ctx=ctx, name=name, spec_json=_spec("task"), dataset_names=list(DEMO_TASKS))
    with ctx.session() as s:
        tasky = s.scalar(sa.select(Mixture.id).where(Mixture.name == "tasky"))
    train_now(settings, tasky)
    demo: gr.Blocks = build_demo(ctx)
    port = services.free_port()
    demo.launch(**(launch_kwargs(ctx) | {"server_port": port, "prevent_thread_lock": True}))
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    inference.clear_cache()


@pytest.fixture
def client(studio_url: str) -> Client:
    return Client(studio_url, verbose=False)


def test_the_mixture_list_and_description(client: Client) -> None:
    listed = client.predict(None, api_name="/list_trained_mixtures")
    assert listed["value"] == "tasky" and [value for _, value in listed["choices"]] == ["tasky"]  # not 'draft'
    task, about, disabled, expert, other = client.predict("tasky", api_name="/describe_mixture")
    assert task["value"] == DEMO_TASKS[0] and task["visible"] and [v for _, v in task["choices"]] == list(DEMO_TASKS)
    assert "Router **task**" in about
    assert [v for _, v in disabled["choices"]] == [v for _, v in expert["choices"]] == ["universal-0", *EXPERTS]
    assert other["choices"] == []


def test_run_prompt_returns_the_output_and_the_heatmaps(client: Client) -> None:
    text, details, layers, layer, tokens, groups = client.predict(
        "tasky", PROMPT, INPUT, DEMO_TASKS[1], 6, api_name="/run_prompt"
    )
    assert isinstance(text, str) and "tokens in" in details and f"task {DEMO_TASKS[1]}" in details
    assert layers["type"] == tokens["type"] == "matplotlib" and layers["plot"].startswith("data:image/png;base64,")
    assert layer["value"].startswith("model.layers.0.") and layer["choices"][0] == ["L0 q_proj", layer["value"]]
    assert groups["visible"] is False  # task routing has neither groups nor scaling
    second = layer["choices"][1][1]
    again = client.predict(second, api_name="/token_heatmap")  # the result kept in this session
    assert again["plot"].startswith("data:image/png;base64,") and again["plot"] != tokens["plot"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("tasky", "   ", "", DEMO_TASKS[0], 6), "the prompt is empty"),
        (("tasky", "", "", DEMO_TASKS[0], 6), "the prompt is empty"),
        (("draft", PROMPT, "", DEMO_TASKS[0], 6), "mixture 'draft' is not trained yet"),
        (("ghost", PROMPT, "", DEMO_TASKS[0], 6), "no mixture named 'ghost'"),
        (("tasky", PROMPT, "", None, 6), "this mixture routes by task"),
        (("tasky", PROMPT, "", "poetry", 6), "unknown task 'poetry'"),
    ],
)
def test_bad_requests_come_back_as_messages(client: Client, arguments: tuple, message: str) -> None:
    with pytest.raises(AppError, match=message):
        client.predict(*arguments, api_name="/run_prompt")


def test_token_heatmap_before_any_run_says_so(client: Client) -> None:
    with pytest.raises(AppError, match="run a prompt first"):
        client.predict("model.layers.0.self_attn.q_proj", api_name="/token_heatmap")


def test_compare_with_one_expert_side_by_side(client: Client) -> None:
    left_head, left, left_plot, right_head, right, right_plot = client.predict(
        "tasky", PROMPT, INPUT, DEMO_TASKS[1], 6, None, THIRD, True, api_name="/compare"
    )
    assert left_head.startswith("**tasky**") and right_head.startswith(f"**expert {THIRD} alone**")
    assert isinstance(left, str) and isinstance(right, str) and left_plot["plot"] != right_plot["plot"]
    with pytest.raises(AppError, match="choose either a second mixture or one expert"):
        client.predict("tasky", PROMPT, INPUT, DEMO_TASKS[1], 6, None, None, True, api_name="/compare")


def test_override_shows_the_change(client: Client) -> None:
    client.predict("tasky", api_name="/describe_mixture")  # fills the expert checkboxes of this session
    change, routed, changed, plot = client.predict(
        "tasky", PROMPT, INPUT, DEMO_TASKS[1], 6, [SECOND], "", api_name="/run_override"
    )
    assert isinstance(routed, str) and isinstance(changed, str) and plot["type"] == "matplotlib"
    assert change.startswith("The output changed") or "moved by up to" in change
    change, *_ = client.predict("tasky", PROMPT, INPUT, DEMO_TASKS[1], 6, [], f"{LAST}=1", api_name="/run_override")
    assert change
    with pytest.raises(AppError, match="disable at least one expert"):
        client.predict("tasky", PROMPT, INPUT, DEMO_TASKS[1], 6, [], "", api_name="/run_override")
    with pytest.raises(AppError, match="name=weight"):
        client.predict("tasky", PROMPT, INPUT, DEMO_TASKS[1], 6, [], LAST, api_name="/run_override")
