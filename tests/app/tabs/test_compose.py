"""The Compose tab's endpoints through ``gradio_client`` against the running studio, over a registry holding the demo
datasets and a trained mixture 'parent'; refusals come back as errors carrying the service's message."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import gradio as gr
import pytest
import sqlalchemy as sa
from gradio_client import Client
from gradio_client.exceptions import AppError

from app.context import StudioContext
from app.services import mixtures as services
from app.tabs import compose
from models.bases import BUILTIN_TINY
from models.registry import Dataset, Job, JobState, Mixture
from models.settings import Settings
from models.spec import MixtureSpec, default_spec
from tests.app.services.test_mixtures import Registry, trained_registry

EXPERTS = {"headers": services.EXPERT_COLUMNS, "data": [["d", "dates", 4, 8, ""], ["e", "emails", 4, 8, ""]]}
FORM = {"base_model": BUILTIN_TINY, "tasks": "dates, emails", "experts": EXPERTS, "router_kind": "softmax"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, bases_dir: Path) -> Registry:
    return trained_registry(tmp_path_factory.mktemp("compose-tab") / "studio", bases_dir)


@pytest.fixture
def data_dir(registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The ``studio`` fixture's data dir: a private copy of the registry."""
    folder = tmp_path / "studio"
    shutil.copytree(registry.folder, folder)
    monkeypatch.setenv("STUDIO_DATA_DIR", str(folder))
    return folder


@pytest.fixture
def client(studio: tuple[gr.Blocks, str]) -> Client:
    return Client(studio[1], verbose=False)


def _mixtures(settings: Settings) -> dict[str, Mixture]:
    with StudioContext(settings=settings).session() as s:
        return {m.name: m for m in s.scalars(sa.select(Mixture))}


def _save(client: Client, name: str, **form: object) -> tuple:
    spec = client.predict(**(FORM | form), api_name="/build_spec")
    return client.predict(
        name=name, spec_json=spec, dataset_names=["dates", "emails"], parent="", api_name="/save_mixture"
    )


def test_save_open_and_duplicate_a_mixture(client: Client, settings: Settings) -> None:
    status, chosen, table = _save(client, "mine", seed=7, stage_steps="30")
    assert "Saved mixture 'mine'" in status and chosen["value"] == "mine"
    assert ["mine", BUILTIN_TINY, False] in table["data"]
    stored = MixtureSpec.model_validate(_mixtures(settings)["mine"].spec_json)
    assert (stored.router.kind, stored.schedule.seed, stored.schedule.stage_steps) == ("softmax", 7, [30])
    assert [e.name for e in stored.experts] == ["d", "e"]

    values = client.predict(name="mine", api_name="/open_mixture")
    opened = dict(zip(services.FORM_FIELDS, values, strict=False))
    assert (opened["base_model"], opened["tasks"], opened["router_kind"], opened["seed"]) == (
        BUILTIN_TINY,
        "dates, emails",
        "softmax",
        7,
    )
    assert opened["target_modules"]["value"] == ["q_proj", "v_proj"]
    assert opened["experts"]["data"] == [["d", "dates", 4, 8.0, ""], ["e", "emails", 4, 8.0, ""]]
    datasets, parent, note = values[len(services.FORM_FIELDS) :]
    assert (datasets["value"], parent) == (["dates", "emails"], "")
    assert "Opened 'mine' (not trained yet)" in note

    status, chosen, table = client.predict(name="mine", new_name="mine-2", api_name="/duplicate_mixture")
    assert "Duplicated 'mine' as 'mine-2'" in status and chosen["value"] == "mine-2"
    assert _mixtures(settings)["mine-2"].spec_json == _mixtures(settings)["mine"].spec_json
    assert {row[0] for row in client.predict(api_name="/list_mixtures")["data"]} == {"parent", "mine", "mine-2"}


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"universal_rank": 0}, "universal.rank: Input should be greater than or equal to 1"),
        ({"router_kind": "magic"}, "router.kind: unknown router kind 'magic'"),
        ({"stage_steps": "10, ten"}, "schedule.stage_steps.1: Input should be a valid integer"),
        (
            {"experts": {"headers": services.EXPERT_COLUMNS, "data": [["x y", "dates", 4, 8, ""]]}},
            "experts row 1, name",
        ),
        ({"tasks": ""}, "tasks: pick at least one dataset"),
    ],
)
def test_a_bad_spec_comes_back_as_an_error_naming_the_field(client: Client, form: dict, message: str) -> None:
    with pytest.raises(AppError, match=message):
        client.predict(**(FORM | form), api_name="/build_spec")


def test_bad_saves_are_refused_and_store_nothing(client: Client, settings: Settings) -> None:
    spec = client.predict(**FORM, api_name="/build_spec")
    for name, datasets, message in [
        ("../up", ["dates", "emails"], "mixture name '../up' is not allowed"),
        ("parent", ["dates", "emails"], "a mixture named 'parent' exists already"),
        ("ok", ["dates"], "differ from its datasets' tasks"),
    ]:
        with pytest.raises(AppError, match=message):
            client.predict(name=name, spec_json=spec, dataset_names=datasets, parent="", api_name="/save_mixture")
    assert set(_mixtures(settings)) == {"parent"}


def test_an_unknown_base_model_gets_a_message(client: Client, settings: Settings) -> None:
    with pytest.raises(
        AppError, match="base model 'nobody/no-such-model' could not be read from the Hugging Face hub"
    ):
        client.predict(base_model="nobody/no-such-model", target_modules=["q_proj"], api_name="/inspect_base")
    layers = client.predict(base_model=BUILTIN_TINY, target_modules=["k_proj"], api_name="/inspect_base")
    assert layers["value"] == ["k_proj"] and ["gate_proj", "gate_proj"] in layers["choices"]
    spec = client.predict(**(FORM | {"base_model": "nobody/no-such-model"}), api_name="/build_spec")
    with pytest.raises(AppError, match="could not be read"):
        client.predict(
            name="x", spec_json=spec, dataset_names=["dates", "emails"], parent="", api_name="/save_mixture"
        )
    assert "x" not in _mixtures(settings)


def test_choosing_datasets_fills_the_tasks_and_one_expert_each(client: Client) -> None:
    empty = {"headers": services.EXPERT_COLUMNS, "data": []}
    tasks, experts = client.predict(
        dataset_names=["times", "dates"], tasks="", experts=empty, api_name="/choose_datasets"
    )
    assert tasks == "times, dates"
    assert [row[:2] for row in experts["data"]] == [["times-expert", "times"], ["dates-expert", "dates"]]
    with pytest.raises(AppError, match="no dataset named ghost"):
        client.predict(dataset_names=["ghost"], tasks="", experts=empty, api_name="/choose_datasets")


def test_add_a_task_to_a_trained_mixture_only(client: Client, settings: Settings) -> None:
    _save(client, "fresh")
    with pytest.raises(AppError, match="mixture 'fresh' is not trained yet"):
        client.predict(name="fresh", dataset="times", new_name="", api_name="/add_task")
    status, chosen, _ = client.predict(name="parent", dataset="times", new_name="", api_name="/add_task")
    assert "Saved 'parent-times': 'parent' plus an expert for task 'times'" in status
    assert chosen["value"] == "parent-times"
    mixtures = _mixtures(settings)
    child = mixtures["parent-times"]
    assert child.parent_id == mixtures["parent"].id and child.spec_json["schedule"]["kind"] == "add_task"
    assert sorted(d.name for d in child.datasets) == ["dates", "emails", "times"]
    values = client.predict(name="parent-times", api_name="/open_mixture")
    assert values[len(services.FORM_FIELDS) + 1] == "parent"  # "grown from"


def test_start_training_queues_a_job_and_is_refused_when_a_dataset_is_gone(client: Client, settings: Settings) -> None:
    _save(client, "fresh")
    job_id, status = client.predict(name="fresh", api_name="/start_training")
    assert f"Queued training job {job_id[:8]} for 'fresh'" in status
    ctx = StudioContext(settings=settings)
    with ctx.session() as s:
        job = s.get(Job, uuid.UUID(job_id))
        assert job is not None and job.state is JobState.QUEUED and job.mixture.name == "fresh"
        key = s.scalar(sa.select(Dataset.artifact_key).where(Dataset.name == "dates"))
    ctx.store.delete(key)
    with pytest.raises(AppError, match=r"the file of dataset\(s\) dates of mixture 'parent' is gone"):
        client.predict(name="parent", api_name="/start_training")
    with ctx.session() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Job)) == 2  # the parent's run and the new one


def test_prefill_from_spec_gives_a_value_for_each_prefill_output(settings: Settings) -> None:
    ctx = StudioContext(settings=settings)
    with gr.Blocks():
        handles = compose.build(ctx)
    spec = default_spec(BUILTIN_TINY, ["dates", "emails"], router="grouped").model_dump(mode="json")
    values = compose.prefill_from_spec(spec, ctx)
    assert len(values) == len(handles.prefill_outputs) == len(handles.form) + 3
    assert list(handles.form) == services.FORM_FIELDS
    shown = dict(zip(services.FORM_FIELDS, values, strict=False))
    assert (shown["base_model"], shown["tasks"], shown["router_kind"]) == (BUILTIN_TINY, "dates, emails", "grouped")
    assert list(shown["experts"]["name"]) == ["dates-expert", "emails-expert"]
    datasets, parent, note = values[len(services.FORM_FIELDS) :]
    assert datasets.value == ["dates", "emails"] and parent == "" and "dates, emails" in note
    with pytest.raises(gr.Error, match="universal.rank"):
        compose.prefill_from_spec(spec | {"universal": {"rank": 0}}, ctx)
