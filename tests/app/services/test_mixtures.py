"""Composer services against a real SQLite registry and artifact store: form to spec and back, the bases' layers and
exact parameter counts, and save / open / duplicate / add a task / start training with their refusals."""

from __future__ import annotations

import copy
import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from app.context import ServiceError, StudioContext
from app.services import mixtures as services
from migrations import upgrade_head
from models.bases import BUILTIN_SMOLLM2, BUILTIN_TINY, linear_module_names, load_base
from models.mixture import attach_mixture
from models.registry import Dataset, Job, JobState, Mixture, MixtureDataset, session_factory
from models.routers import ROUTER_KINDS
from models.settings import Settings
from models.spec import MixtureSpec, default_spec
from tests.conftest import add_demo_datasets
from worker.dispatch import submit_training
from worker.jobs import run_job

TASKS = ["dates", "emails"]
TINY_SCHEDULE = {"kind": "joint", "stage_steps": [1], "batch_size": 2, "max_length": 48, "checkpoint_every": 100}


def studio_context(folder: Path, bases_dir: Path) -> StudioContext:
    settings = Settings(studio_data_dir=folder, base_cache_dir=bases_dir)
    upgrade_head(settings.db_url)
    return StudioContext(settings=settings)


def tiny_form(**changes: object) -> services.ComposeForm:
    """The form as a person leaves it after picking the tiny base and the dates + emails datasets."""
    form = services.ComposeForm(
        base_model=BUILTIN_TINY, tasks=", ".join(TASKS), experts=services.experts_for_tasks(None, TASKS)
    )
    return dataclasses.replace(form, **changes)


def save_tiny(ctx: StudioContext, name: str, tasks: list[str] = TASKS, **changes: object) -> Mixture:
    spec = default_spec(BUILTIN_TINY, tasks, router="softmax")
    spec = MixtureSpec.model_validate(spec.model_dump() | {"schedule": TINY_SCHEDULE} | changes)
    return services.save_mixture(ctx=ctx, name=name, spec_json=spec.model_dump(mode="json"), dataset_names=tasks)


@dataclass(frozen=True)
class Registry:
    """A data dir holding the demo datasets (10 rows each) and mixture 'parent' (dates, emails) trained one step."""

    folder: Path


def trained_registry(folder: Path, bases_dir: Path) -> Registry:
    ctx = studio_context(folder, bases_dir)
    add_demo_datasets(ctx, lines=10)
    parent = save_tiny(ctx, "parent")
    assert run_job(submit_training(ctx.settings, parent.id, send=False), settings=ctx.settings) == "succeeded"
    session_factory(ctx.settings.db_url).kw["bind"].dispose()  # WAL folded in: the folder can be copied as is
    return Registry(folder)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, bases_dir: Path) -> Registry:
    return trained_registry(tmp_path_factory.mktemp("compose-services") / "studio", bases_dir)


@pytest.fixture
def ctx(registry: Registry, tmp_path: Path, bases_dir: Path) -> StudioContext:
    """A private copy of the registry with the trained 'parent'."""
    folder = tmp_path / "studio"
    shutil.copytree(registry.folder, folder)
    return studio_context(folder, bases_dir)


@pytest.fixture(scope="module")
def tiny_base(bases_dir: Path):  # noqa: ANN201 - a transformers model
    return load_base(BUILTIN_TINY, bases_dir)[0]


def _count(ctx: StudioContext, table: type, **where: object) -> int:
    with ctx.session() as s:
        query = sa.select(sa.func.count()).select_from(table)
        for key, value in where.items():
            query = query.where(getattr(table, key) == value)
        return int(s.scalar(query) or 0)


# --- bases ----------------------------------------------------------------------------------------------------------


def test_the_catalogue_offers_smollm2_first_then_the_tiny_base(ctx: StudioContext) -> None:
    values = [value for _, value in services.base_choices(ctx=ctx)]
    assert values[:2] == [BUILTIN_SMOLLM2, BUILTIN_TINY]


def test_the_tiny_base_offers_its_real_linear_layers_with_their_shapes(ctx: StudioContext, tiny_base) -> None:  # noqa: ANN001
    layout = services.inspect_base(ctx=ctx, base_model=BUILTIN_TINY)
    assert layout.linear_modules == linear_module_names(tiny_base)
    assert layout.parameters == sum(p.numel() for p in tiny_base.parameters())
    q_proj = tiny_base.model.layers[0].self_attn.q_proj
    assert layout.shapes["q_proj"] == (q_proj.in_features, q_proj.out_features, len(tiny_base.model.layers))
    assert services.inspect_base(ctx=ctx, base_model=BUILTIN_TINY) is layout  # cached per base


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nobody/no-such-model", "could not be read from the Hugging Face hub (offline"),
        ("builtin:nope", "unknown built-in base model 'builtin:nope'"),
        ("/etc", "outside the allowed folders"),
        ("not a model id", "neither a built-in"),
        ("", "no base model given"),
    ],
)
def test_an_unknown_base_model_gets_a_message(ctx: StudioContext, name: str, message: str) -> None:
    with pytest.raises(ServiceError, match=message.replace("(", r"\(")):
        services.inspect_base(ctx=ctx, base_model=name)
    if name:  # the same refusal when saving, and nothing stored
        spec = default_spec(BUILTIN_TINY, TASKS).model_dump() | {"base_model": name}
        with pytest.raises(ServiceError, match=message.replace("(", r"\(")):
            services.save_mixture(ctx=ctx, name="x", spec_json=spec, dataset_names=TASKS, check_base=True)
        assert _count(ctx, Mixture, name="x") == 0


def test_target_choices_keep_the_ticked_layers_the_base_has(ctx: StudioContext) -> None:
    names, ticked = services.target_choices(ctx=ctx, base_model=BUILTIN_TINY, current=["k_proj", "c_attn"])
    assert "k_proj" in names and ticked == ["k_proj"]
    assert services.target_choices(ctx=ctx, base_model=BUILTIN_TINY, current=["c_attn"])[1] == ["q_proj", "v_proj"]


# --- the form and the spec -----------------------------------------------------------------------------------------


def test_the_default_form_makes_the_default_spec() -> None:
    assert services.build_spec(form=tiny_form()) == default_spec(BUILTIN_TINY, TASKS)


def test_a_spec_goes_to_the_form_and_back_unchanged() -> None:
    spec = default_spec(BUILTIN_TINY, TASKS, router="grouped").model_dump()
    spec["experts"][0]["group"] = "text"
    spec["experts"][1] |= {"group": "text", "rank": 4, "alpha": 8.0}
    spec |= {
        "target_modules": ["q_proj", "k_proj", "down_proj"],
        "universal": {"count": 2, "rank": 4, "alpha": 4.0, "train_embeddings": True, "train_head": False},
        "router": {"kind": "grouped", "options": {"granularity": "token", "temperature": 0.5}},
        "loss": {"weighting": "achievement", "gamma": 1.5, "epsilon": 0.1, "targets": {"dates": 0.9}},
        "schedule": {"kind": "at_moe", "stage_steps": [30, 10], "router_learning_rate": 0.01, "seed": 7},
    }
    spec = MixtureSpec.model_validate(spec)
    assert services.build_spec(form=services.form_from_spec(spec)) == spec
    assert services.build_spec(form=services.form_from_spec(spec.model_dump_json())) == spec


TOPK = {"router_kind": "topk", "router_options": [["top_k", "9", ""]]}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"universal_rank": 0}, "universal.rank: Input should be greater than or equal to 1"),
        ({"universal_count": 9}, "universal.count: Input should be less than or equal to 8"),
        ({"universal_alpha": None}, "universal.alpha: Input should be a valid number"),
        ({"lora_dropout": 1.0}, "lora_dropout: Input should be less than 1"),
        ({"tasks": ""}, "tasks: pick at least one dataset"),
        ({"target_modules": []}, "target_modules: List should have at least 1 item"),
        ({"target_modules": ["q proj"]}, "target_modules: Value error, target module 'q proj'|target module 'q proj'"),
        ({"experts": [["a b", "dates", 8, 16, ""]]}, "experts row 1, name: expert name 'a b'"),
        ({"experts": [["e", "dates", "", 16, ""], ["f", "emails", 8, 16, ""]]}, "experts row 1, rank: Input should"),
        ({"experts": [["e", "dates, nope", 8, 16, ""]]}, "expert 'e' names task 'nope'"),
        ({"experts": [["e", "dates", 8, 16, ""]]}, "task 'emails' has no expert"),
        ({"router_kind": "magic"}, "router.kind: unknown router kind 'magic'; choose one of: single, task"),
        ({"router_kind": "topk", "router_options": [["top_k", "x", ""]]}, "router.options.top_k: Input should be"),
        ({"router_kind": "topk", "router_options": [["colour", "red", ""]]}, "router.options.colour: Extra inputs"),
        (TOPK, "top_k 9 exceeds the 2 routed experts"),
        ({"router_kind": "single"}, "router 'single' is one plain LoRA: remove the 2 task experts"),
        ({"weighting": "loudest"}, "loss.weighting: Input should be 'uniform', 'proportional'"),
        ({"targets": "dates"}, "loss.targets: write task=value pairs"),
        ({"targets": "dates=high"}, "loss.targets.dates: Input should be a valid number"),
        ({"schedule_kind": "modula"}, "schedule: schedule 'modula' has 3 stage(s); got 1"),
        ({"stage_steps": "10, x"}, "schedule.stage_steps.1: Input should be a valid integer"),
        ({"batch_size": None}, "schedule.batch_size: Input should be a valid integer"),
        ({"learning_rate": -1}, "schedule.learning_rate: Input should be greater than 0"),
        ({"max_length": 4}, "schedule.max_length: Input should be greater than or equal to 8"),
    ],
)
def test_a_bad_form_gets_a_message_naming_the_field(changes: dict, message: str) -> None:
    with pytest.raises(ServiceError) as refused:
        services.build_spec(form=tiny_form(**changes))
    assert any(part in str(refused.value) for part in message.split("|")), str(refused.value)


def test_a_target_layer_the_base_lacks_is_refused_when_counting(ctx: StudioContext) -> None:
    spec = services.build_spec(form=tiny_form(target_modules=["q_proj", "c_attn"]))
    with pytest.raises(ServiceError, match=r"target_modules: target module\(s\) \['c_attn'\] match no linear layer"):
        services.parameter_count(ctx=ctx, spec=spec)


def test_router_options_are_generated_from_each_kinds_options_model() -> None:
    for kind, cls in ROUTER_KINDS.items():
        rows = services.router_option_rows(kind)
        assert list(rows["option"]) == list(cls.Options.model_fields), kind
        as_typed = cls.Options.model_validate(services._options(rows)).model_dump()
        assert as_typed == cls.Options().model_dump(), kind  # the table's text reads back as the defaults
    topk = services.router_option_rows("topk").set_index("option")
    assert "≥ 1, ≤ 64" in topk.loc["top_k", "about"]
    assert "one of: token, sequence" in topk.loc["granularity", "about"]


def _spec_for(kind: str, **changes: object) -> MixtureSpec:
    spec = default_spec(BUILTIN_TINY, ["dates", "emails", "times"], router=kind).model_dump()
    if kind == "grouped":
        spec["experts"][0]["group"] = spec["experts"][1]["group"] = "g"
    return MixtureSpec.model_validate(spec | changes)


@pytest.mark.parametrize("kind", list(ROUTER_KINDS))
def test_the_parameter_count_is_the_attached_mixtures_own(ctx: StudioContext, tiny_base, kind: str) -> None:  # noqa: ANN001
    changes = {"target_modules": ["q_proj", "v_proj", "down_proj"]}
    if kind == "modula":
        changes["router"] = {"kind": "modula", "options": {"variant": "flan"}}
    if kind == "softmax":
        changes["universal"] = {"count": 2, "rank": 4, "train_embeddings": True}
    spec = _spec_for(kind, **changes)
    trainable, base, percent = services.parameter_count(ctx=ctx, spec=spec)
    assert (trainable, base) == attach_mixture(copy.deepcopy(tiny_base), spec).trainable_parameter_count()
    assert percent == pytest.approx(100 * trainable / base)
    assert trainable > 0


def test_the_count_follows_the_rank_and_ignores_the_schedule(ctx: StudioContext) -> None:
    small = services.parameter_count(ctx=ctx, spec=services.build_spec(form=tiny_form()))[0]
    larger = services.parameter_count(ctx=ctx, spec=services.build_spec(form=tiny_form(universal_rank=16)))[0]
    layout = services.inspect_base(ctx=ctx, base_model=BUILTIN_TINY)
    grown = sum(8 * (d_in + d_out) * n for m, (d_in, d_out, n) in layout.shapes.items() if m in ("q_proj", "v_proj"))
    assert larger - small == grown  # rank·(d_in + d_out) per target layer, 8 more ranks
    steps = services.build_spec(form=tiny_form(stage_steps="999", seed=3))
    assert services.parameter_count(ctx=ctx, spec=steps)[0] == small


def test_the_preview_draws_a_valid_form_and_explains_a_bad_one(ctx: StudioContext) -> None:
    shown = services.preview_mixture(ctx=ctx, form=tiny_form(router_kind="softmax"))
    assert shown.message == "" and shown.spec is not None
    assert "dates-expert" in shown.svg and "Router: softmax" in shown.svg
    trainable = services.parameter_count(ctx=ctx, spec=shown.spec)[0]
    assert f"Trainable: {trainable:,} parameters" in shown.caption
    bad = services.preview_mixture(ctx=ctx, form=tiny_form(universal_rank=0))
    assert bad.spec is None and bad.message.startswith("universal.rank:") and "once the form describes" in bad.svg


def test_choosing_datasets_fills_tasks_and_keeps_edited_experts(ctx: StudioContext) -> None:
    assert services.tasks_of_datasets(ctx=ctx, dataset_names=["emails", "dates"]) == ["emails", "dates"]
    with pytest.raises(ServiceError, match="no dataset named nope"):
        services.tasks_of_datasets(ctx=ctx, dataset_names=["dates", "nope"])
    edited = [["my-dates", "dates", 4, 8.0, "g"], ["both", "dates, emails", 8, 16.0, ""]]
    table = services.experts_for_tasks(edited, ["dates", "times"])
    assert table.values.tolist() == [["my-dates", "dates", 4, 8.0, "g"], ["times-expert", "times", 8, 16.0, ""]]
    shown, table = services.choose_datasets(ctx=ctx, dataset_names=["dates", "times"], tasks="", experts=edited)
    assert shown == "dates, times" and list(table["name"]) == ["my-dates", "times-expert"]
    kept = services.choose_datasets(ctx=ctx, dataset_names=["dates", "times"], tasks="times, dates", experts=[])
    assert kept == (None, None)  # the tasks shown already (a mixture just opened): order and experts kept


def test_a_new_router_kind_gets_its_options_and_fitting_experts() -> None:
    edited = [["my-dates", "dates", 4, 8.0, ""]]
    options, experts = services.router_defaults(kind="single", options=None, tasks="dates", experts=edited)
    assert list(options["option"]) == ["granularity", "temperature"] and experts.empty
    options, experts = services.router_defaults(kind="topk", options=None, tasks="dates, emails", experts=[])
    assert "top_k" in list(options["option"]) and list(experts["name"]) == ["dates-expert", "emails-expert"]
    opened = services.router_option_rows("topk", {"top_k": 1})
    assert services.router_defaults(kind="topk", options=opened, tasks="dates", experts=edited) == (None, None)
    softmax = services.router_option_rows("softmax")  # granularity 'token' does not fit task routing
    options, _ = services.router_defaults(kind="task", options=softmax, tasks="dates", experts=edited)
    assert options.set_index("option").loc["granularity", "value"] == "sequence"


def test_a_new_schedule_kind_gets_its_number_of_stages() -> None:
    assert services.stage_steps_for("modula", "200") == "100, 100, 50"
    assert services.stage_steps_for("at_moe", "30, 10") == "30, 10"


def test_datasets_for_tasks_picks_the_datasets_holding_them(ctx: StudioContext) -> None:
    assert services.datasets_for_tasks(ctx=ctx, tasks=["emails", "dates", "unknown"]) == ["dates", "emails"]


# --- saving, opening, duplicating ---------------------------------------------------------------------------------


def test_save_open_and_duplicate_keep_the_spec_and_datasets(ctx: StudioContext) -> None:
    spec = services.build_spec(form=tiny_form(router_kind="softmax", seed=5))
    services.save_mixture(
        ctx=ctx, name="mine", spec_json=spec.model_dump(mode="json"), dataset_names=TASKS, check_base=True
    )
    opened = services.open_mixture(ctx=ctx, name="mine")
    assert (opened.spec, opened.datasets, opened.parent, opened.trained) == (spec, sorted(TASKS), None, False)
    services.duplicate_mixture(ctx=ctx, name="mine", new_name="mine-2")
    assert services.open_mixture(ctx=ctx, name="mine-2").spec == spec
    assert set(services.mixture_names(ctx=ctx)) == {"parent", "mine", "mine-2"}
    assert services.mixture_names(ctx=ctx, trained=True) == ["parent"]


@pytest.mark.parametrize(
    ("name", "datasets", "message"),
    [
        ("", TASKS, "the mixture name is empty"),
        ("../evil", TASKS, "mixture name '../evil' is not allowed"),
        ("parent", TASKS, "a mixture named 'parent' exists already"),
        ("fine", [], "the mixture has no datasets"),
        ("fine", ["dates"], r"differ from its datasets' tasks \(dates\)"),
        ("fine", ["dates", "nope"], "no dataset named nope"),
    ],
)
def test_save_refuses_bad_names_and_datasets_and_stores_nothing(
    ctx: StudioContext, name: str, datasets: list[str], message: str
) -> None:
    spec = services.build_spec(form=tiny_form()).model_dump(mode="json")
    with pytest.raises(ServiceError, match=message):
        services.save_mixture(ctx=ctx, name=name, spec_json=spec, dataset_names=datasets)
    assert _count(ctx, Mixture) == 1


def test_open_and_duplicate_refuse_unknown_names(ctx: StudioContext) -> None:
    with pytest.raises(ServiceError, match="no mixture named 'ghost'"):
        services.open_mixture(ctx=ctx, name="ghost")
    with pytest.raises(ServiceError, match="choose a mixture first"):
        services.open_mixture(ctx=ctx, name=None)
    with pytest.raises(ServiceError, match="new mixture name is empty"):
        services.duplicate_mixture(ctx=ctx, name="parent", new_name=" ")


# --- add a task ---------------------------------------------------------------------------------------------------


def test_add_task_saves_a_child_of_a_trained_mixture_that_trains(ctx: StudioContext) -> None:
    child = services.add_task(ctx=ctx, name="parent", dataset="times", steps=(1, 1))
    opened = services.open_mixture(ctx=ctx, name=child.name)
    assert (child.name, opened.parent, opened.datasets) == ("parent-times", "parent", ["dates", "emails", "times"])
    parent = services.open_mixture(ctx=ctx, name="parent").spec
    assert opened.spec == parent.with_task_expert("times", steps=(1, 1))
    job_id = services.start_training(ctx=ctx, name=child.name)
    assert run_job(job_id, settings=ctx.settings) == "succeeded"
    assert services.open_mixture(ctx=ctx, name=child.name).trained


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ("dates", "task 'dates' is already in the mixture"),
        ("nope", "no dataset named nope"),
        (None, "choose the dataset of the new task"),
    ],
)
def test_add_task_refuses_a_dataset_that_adds_no_new_task(
    ctx: StudioContext, dataset: str | None, message: str
) -> None:
    with pytest.raises(ServiceError, match=message):
        services.add_task(ctx=ctx, name="parent", dataset=dataset)
    assert _count(ctx, Mixture) == 1


def test_add_task_refuses_an_untrained_mixture(ctx: StudioContext) -> None:
    save_tiny(ctx, "fresh")
    with pytest.raises(ServiceError, match="mixture 'fresh' is not trained yet: train it first"):
        services.add_task(ctx=ctx, name="fresh", dataset="times")
    assert _count(ctx, Mixture) == 2


def test_add_task_refuses_a_dataset_with_several_tasks(ctx: StudioContext) -> None:
    with ctx.session() as s:
        s.execute(sa.update(Dataset).where(Dataset.name == "questions").values(tasks=["questions", "more"]))
    with pytest.raises(ServiceError, match="holds 2 tasks \\(questions, more\\); add one task at a time"):
        services.add_task(ctx=ctx, name="parent", dataset="questions")


# --- start training -----------------------------------------------------------------------------------------------


def test_start_training_queues_a_job_with_the_spec(ctx: StudioContext) -> None:
    mixture = save_tiny(ctx, "fresh")
    job_id = services.start_training(ctx=ctx, name="fresh")
    with ctx.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state is JobState.QUEUED and job.mixture_id == mixture.id
        assert job.spec_json == mixture.spec_json and job.celery_task_id
    with pytest.raises(ServiceError, match="already has a job queued or running"):
        services.start_training(ctx=ctx, name="fresh")


def test_start_training_is_refused_when_a_dataset_file_is_gone(ctx: StudioContext) -> None:
    save_tiny(ctx, "fresh")
    with ctx.session() as s:
        key = s.scalar(sa.select(Dataset.artifact_key).where(Dataset.name == "emails"))
    ctx.store.delete(key)
    with pytest.raises(ServiceError, match=r"the file of dataset\(s\) emails of mixture 'fresh' is gone"):
        services.start_training(ctx=ctx, name="fresh")
    assert _count(ctx, Job) == 1  # the parent's run only


def test_start_training_is_refused_when_the_datasets_are_gone(ctx: StudioContext) -> None:
    mixture = save_tiny(ctx, "fresh")
    with ctx.session() as s:
        s.execute(sa.delete(MixtureDataset).where(MixtureDataset.mixture_id == mixture.id))
    with pytest.raises(ServiceError, match="mixture 'fresh' has no datasets any more"):
        services.start_training(ctx=ctx, name="fresh")
    assert _count(ctx, Job) == 1


def test_start_training_of_a_child_is_refused_while_its_parent_is_untrained(ctx: StudioContext) -> None:
    child = services.add_task(ctx=ctx, name="parent", dataset="times")
    with ctx.session() as s:
        s.execute(sa.update(Mixture).where(Mixture.name == "parent").values(trained=False))
    with pytest.raises(ServiceError, match="but its parent 'parent' is not trained"):
        services.start_training(ctx=ctx, name=child.name)
    with pytest.raises(ServiceError, match="no mixture named 'ghost'"):
        services.start_training(ctx=ctx, name="ghost")
    assert _count(ctx, Job) == 1


def test_register_demo_stores_the_four_tasks_and_the_tuned_mixture_once(settings: Settings) -> None:
    from models.demo import DEMO_TASKS, tuned_demo_spec

    upgrade_head(settings.db_url)
    ctx = StudioContext(settings=settings)
    demo = services.register_demo(ctx=ctx, base_model=BUILTIN_TINY)
    assert MixtureSpec.model_validate(demo.spec_json) == tuned_demo_spec(BUILTIN_TINY)
    again = services.register_demo(ctx=ctx, base_model=BUILTIN_TINY)
    with ctx.session() as s:
        names = sorted(s.scalars(sa.select(Dataset.name)))
        mixtures = list(s.scalars(sa.select(Mixture.name)))
    assert again.id == demo.id and mixtures == ["demo"] and names == sorted(DEMO_TASKS)
