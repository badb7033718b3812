"""Expert services against a real registry trained in-process on the tiny base: filters, lineage, export, delete.

One module-wide training (``trained_registry``): a parent mixture trained twice (its first run is superseded,
so its experts may be deleted) and an ``add_task`` child grown from it. Tests that change the registry work on a
copy of it (``ctx``).
"""

from __future__ import annotations

import shutil
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
from peft import PeftModel

from app.context import ServiceError, StudioContext
from app.services import experts as services
from app.services.mixtures import save_mixture
from migrations import upgrade_head
from models.bases import BUILTIN_TINY, load_base
from models.mixture import MixtureModel, attach_mixture, export_route, load_experts, read_manifest
from models.registry import Expert, Mixture, session_factory
from models.settings import Settings
from models.spec import MixtureSpec, default_spec
from tests.conftest import add_demo_datasets
from worker.dispatch import submit_training
from worker.jobs import download_folder, run_job

IDS = torch.tensor([[1, 5, 9, 13, 2, 7, 3], [4, 4, 8, 15, 16, 23, 42]])
TINY_SCHEDULE = {"kind": "joint", "stage_steps": [1], "batch_size": 2, "max_length": 48, "checkpoint_every": 100}


@dataclass(frozen=True)
class Trained:
    """A studio data dir holding a trained registry, and the ids of its runs."""

    folder: Path
    bases_dir: Path
    old_run: uuid.UUID  # the parent's first run, superseded by ``parent_run``
    parent_run: uuid.UUID
    child_run: uuid.UUID | None


def _train(ctx: StudioContext, mixture_id: uuid.UUID) -> uuid.UUID:
    job_id = submit_training(ctx.settings, mixture_id, send=False)
    assert run_job(job_id, settings=ctx.settings) == "succeeded"
    return job_id


def train_registry(folder: Path, bases_dir: Path, *, child: bool = True) -> Trained:
    """Parent (dates, questions) trained twice, then (with ``child``) one that adds times (add_task schedule)."""
    settings = Settings(studio_data_dir=folder, base_cache_dir=bases_dir)
    upgrade_head(settings.db_url)
    ctx = StudioContext(settings=settings)
    add_demo_datasets(ctx, lines=10)
    spec = default_spec(BUILTIN_TINY, ["dates", "questions"], router="softmax")
    spec = MixtureSpec.model_validate(spec.model_dump() | {"schedule": TINY_SCHEDULE})
    parent = save_mixture(
        ctx=ctx, name="parent", spec_json=spec.model_dump(mode="json"), dataset_names=["dates", "questions"]
    )
    old_run, parent_run = _train(ctx, parent.id), _train(ctx, parent.id)
    child_run = _train_child(ctx, spec) if child else None
    session_factory(settings.db_url).kw["bind"].dispose()  # WAL folded in: the folder can be copied as is
    return Trained(folder, bases_dir, old_run, parent_run, child_run)


def _train_child(ctx: StudioContext, spec: MixtureSpec) -> uuid.UUID:
    grown = spec.with_task_expert("times", steps=(1, 1))
    child = save_mixture(
        ctx=ctx,
        name="child",
        spec_json=grown.model_dump(mode="json"),
        dataset_names=["dates", "questions", "times"],
        parent="parent",
    )
    return _train(ctx, child.id)


def copy_registry(trained: Trained, into: Path) -> Settings:
    """A private copy of the trained data dir (database and artifacts); the built-in bases stay shared."""
    shutil.copytree(trained.folder, into)
    return Settings(studio_data_dir=into, base_cache_dir=trained.bases_dir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, bases_dir: Path) -> Trained:
    return train_registry(tmp_path_factory.mktemp("experts") / "studio", bases_dir)


@pytest.fixture
def ctx(trained: Trained, tmp_path: Path) -> StudioContext:
    return StudioContext(settings=copy_registry(trained, tmp_path / "studio"))


def expert_name(job: uuid.UUID, spec_name: str) -> str:
    return f"{spec_name}-{job.hex[:8]}"


def _row(ctx: StudioContext, name: str) -> Expert | None:
    with ctx.session() as s:
        return s.scalars(sa.select(Expert).where(Expert.name == name)).first()


def _full_mixture(ctx: StudioContext, name: str, into: Path) -> MixtureModel:
    """The whole trained mixture of the expert's run, loaded the way the Playground loads one."""
    row = _row(ctx, name)
    assert row is not None
    folder = download_folder(ctx.store, row.adapter_key.rsplit("/", 1)[0], into)
    spec = MixtureSpec.model_validate(read_manifest(folder)["spec"])
    model, _ = load_base(spec.base_model, ctx.settings.bases_data_dir)
    mixture = attach_mixture(model, spec)
    load_experts(mixture, folder)
    return mixture


def _unzip(path: Path, into: Path) -> Path:
    with zipfile.ZipFile(path) as archive:
        archive.extractall(into)
    return into


# --- the table -----------------------------------------------------------------------------------------------


def test_the_table_lists_every_expert_with_its_metric_and_whether_it_is_in_use(
    ctx: StudioContext, trained: Trained
) -> None:
    table = services.list_experts(ctx=ctx)
    assert list(table.columns) == [*services.BASE_COLUMNS, "exact_match", "in use"]
    assert len(table) == 3 + 3 + 4  # universal + 2 task experts, twice; then universal + 3 for the child
    by_name = table.set_index("name")
    for spec_name in ("universal-0", "dates-expert", "questions-expert"):
        assert by_name.loc[expert_name(trained.old_run, spec_name), "in use"] == "no"  # superseded run
        assert by_name.loc[expert_name(trained.parent_run, spec_name), "in use"] == "yes"
    times = by_name.loc[expert_name(trained.child_run, "times")]
    assert (times["mixture"], times["tasks"], times["kind"], times["in use"]) == (
        "child",
        "times",
        "specific",
        "yes",
    )
    assert times["job"] == trained.child_run.hex[:8]
    assert table["exact_match"].between(0, 1).all()  # every expert was evaluated on held-out rows


def test_filters_narrow_the_table(ctx: StudioContext, trained: Trained) -> None:
    def names(**filters: str) -> set[str]:
        return set(services.list_experts(ctx=ctx, **filters)["name"])

    everything = names()
    assert names(base_model=BUILTIN_TINY) == everything and names(base_model="someone/else") == set()
    child_universal = expert_name(trained.child_run, "universal-0")
    times = expert_name(trained.child_run, "times")
    assert names(task="times") == {times, child_universal}  # a universal expert serves every task of its run
    runs = (trained.old_run, trained.parent_run, trained.child_run)
    assert names(kind="universal") == {expert_name(job, "universal-0") for job in runs}
    assert len(names(mixture="child")) == 4 and len(names(mixture="parent")) == 6
    assert names(search="TIMES") == {times, child_universal}
    assert names(search=trained.old_run.hex[:8]) == {
        expert_name(trained.old_run, n) for n in ("universal-0", "dates-expert", "questions-expert")
    }
    assert names(kind="specific", mixture="child", task="dates") == {expert_name(trained.child_run, "dates-expert")}
    rouge = services.list_experts(ctx=ctx, metric="rouge_l")
    assert "rouge_l" in rouge.columns and "exact_match" not in rouge.columns


@pytest.mark.parametrize(
    ("filters", "message"),
    [({"metric": "bleu"}, "unknown metric 'bleu'"), ({"kind": "router"}, "unknown expert kind 'router'")],
)
def test_bad_filters_are_refused_naming_what_is_allowed(ctx: StudioContext, filters: dict, message: str) -> None:
    with pytest.raises(ServiceError, match=message):
        services.list_experts(ctx=ctx, **filters)


def test_filter_choices_are_what_the_registry_holds(ctx: StudioContext) -> None:
    choices = services.expert_filters(ctx=ctx)
    assert choices.base_models == [BUILTIN_TINY]
    assert choices.tasks == ["dates", "questions", "times"]
    assert choices.mixtures == ["child", "parent"]
    assert {"exact_match", "token_f1", "rouge_l"} <= set(choices.metrics)
    assert len(choices.experts) == 10


# --- one expert ----------------------------------------------------------------------------------------------


def test_lineage_runs_from_the_datasets_through_the_parent_mixture_and_job_to_the_expert(
    ctx: StudioContext, trained: Trained
) -> None:
    times = expert_name(trained.child_run, "times")
    links = services.lineage(ctx=ctx, expert=times)
    assert [(link.kind, link.name) for link in links] == [
        ("dataset", "dates"),
        ("dataset", "questions"),
        ("dataset", "times"),
        ("parent mixture", "parent"),
        ("mixture", "child"),
        ("job", trained.child_run.hex[:8]),
        ("expert", times),
    ]
    assert "add_task" in links[4].details and "succeeded" in links[5].details and "2/2 steps" in links[5].details
    text = services.expert_lineage(ctx=ctx, expert=times)
    assert text.splitlines()[0] == (
        f"dataset **dates** · **questions** · **times** → parent mixture **parent** → mixture **child** → "
        f"job **{trained.child_run.hex[:8]}** → expert **{times}**"
    )
    assert "times: exact\\_match" in text  # the expert's own metrics, escaped for Markdown


def test_metrics_table_has_one_row_per_task_of_the_expert(ctx: StudioContext, trained: Trained) -> None:
    universal = services.expert_metrics(ctx=ctx, expert=expert_name(trained.child_run, "universal-0"))
    assert list(universal["task"]) == ["dates", "questions", "times"]
    assert {"exact_match", "token_f1", "rouge_l"} <= set(universal.columns)
    for metric in ("exact_match", "token_f1", "rouge_l"):
        assert universal[metric].between(0, 1).all()


@pytest.mark.parametrize(
    "call", ["expert_lineage", "expert_metrics", "export_expert", "delete_expert", "expert_to_spec"]
)
def test_an_unknown_or_missing_expert_is_refused_by_every_action(ctx: StudioContext, call: str) -> None:
    with pytest.raises(ServiceError, match="no expert named 'nobody'"):
        getattr(services, call)(ctx=ctx, expert="nobody")
    with pytest.raises(ServiceError, match="choose an expert first"):
        getattr(services, call)(ctx=ctx, expert=" ")


def test_spec_for_a_new_mixture_is_the_one_that_trained_the_expert(ctx: StudioContext, trained: Trained) -> None:
    with ctx.session() as s:
        parent_spec = s.scalars(sa.select(Mixture.spec_json).where(Mixture.name == "parent")).one()
    assert services.expert_to_spec(ctx=ctx, expert=expert_name(trained.parent_run, "dates-expert")) == parent_spec
    grown = MixtureSpec.model_validate(
        services.expert_to_spec(ctx=ctx, expert=expert_name(trained.child_run, "times"))
    )
    assert grown.tasks == ["dates", "questions", "times"] and [e.name for e in grown.experts][-1] == "times"
    assert (grown.schedule.kind, grown.schedule.stage_steps) == ("joint", [2])  # no parent: add_task becomes joint


# --- export --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("run", "spec_name"), [("parent_run", "dates-expert"), ("child_run", "times")])
def test_export_is_a_peft_adapter_that_computes_the_mixture_routed_to_the_expert(
    ctx: StudioContext, trained: Trained, tmp_path: Path, run: str, spec_name: str
) -> None:
    name = expert_name(getattr(trained, run), spec_name)
    exported = services.export_expert(ctx=ctx, expert=name)
    assert exported.name == f"{name}-peft.zip" and not exported.is_relative_to(ctx.settings.studio_data_dir)
    folder = _unzip(exported, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    base, _ = load_base(BUILTIN_TINY, ctx.settings.bases_data_dir)
    peft_model = PeftModel.from_pretrained(base, str(folder))
    mixture = _full_mixture(ctx, name, tmp_path / "run")
    with torch.no_grad(), mixture.overridden(**export_route(mixture, spec_name)):
        expected = mixture(IDS).logits
        got = peft_model(IDS).logits
    assert (expected - got).abs().max() <= 1e-5
    plain, _ = load_base(BUILTIN_TINY, ctx.settings.bases_data_dir)
    with torch.no_grad():
        assert not torch.allclose(got, plain(IDS).logits)  # the adapter does change the base


def test_export_still_works_after_other_experts_of_the_run_were_deleted(
    ctx: StudioContext, trained: Trained, tmp_path: Path
) -> None:
    questions = expert_name(trained.old_run, "questions-expert")
    reference = _full_mixture(ctx, questions, tmp_path / "run")  # before anything of the run is gone
    services.delete_expert(ctx=ctx, expert=expert_name(trained.old_run, "dates-expert"))
    services.delete_expert(ctx=ctx, expert=expert_name(trained.old_run, "universal-0"))
    with pytest.raises(ServiceError, match="universal expert of this run was deleted"):
        services.export_expert(ctx=ctx, expert=questions)
    folder = _unzip(services.export_expert(ctx=ctx, expert=questions, with_universal=False), tmp_path / "adapter")
    base, _ = load_base(BUILTIN_TINY, ctx.settings.bases_data_dir)
    peft_model = PeftModel.from_pretrained(base, str(folder))
    route = export_route(reference, "questions-expert", with_universal=False)
    with torch.no_grad(), reference.overridden(**route):
        assert (reference(IDS).logits - peft_model(IDS).logits).abs().max() <= 1e-5


# --- delete --------------------------------------------------------------------------------------------------


def test_delete_is_refused_while_the_expert_is_in_the_newest_run_of_its_mixture(
    ctx: StudioContext, trained: Trained
) -> None:
    for name, mixture in [
        (expert_name(trained.parent_run, "dates-expert"), "parent"),
        (expert_name(trained.child_run, "universal-0"), "child"),
    ]:
        with pytest.raises(ServiceError, match=f"in use .* newest training run of mixture '{mixture}'"):
            services.delete_expert(ctx=ctx, expert=name)
        row = _row(ctx, name)
        assert row is not None and ctx.store.exists(row.adapter_key)


def test_delete_is_refused_while_a_job_of_a_child_mixture_is_queued(ctx: StudioContext, trained: Trained) -> None:
    with ctx.session() as s:
        child_id = s.scalars(sa.select(Mixture.id).where(Mixture.name == "child")).one()
    submit_training(ctx.settings, child_id, send=False)  # queued, never run here
    name = expert_name(trained.old_run, "dates-expert")
    with pytest.raises(ServiceError, match="job of mixture 'child' is queued or running"):
        services.delete_expert(ctx=ctx, expert=name)
    assert _row(ctx, name) is not None


def test_delete_removes_the_row_and_its_file_and_the_run_with_its_last_expert(
    ctx: StudioContext, trained: Trained
) -> None:
    names = [expert_name(trained.old_run, n) for n in ("universal-0", "dates-expert", "questions-expert")]
    keys = [_row(ctx, n).adapter_key for n in names]  # type: ignore[union-attr]
    run = keys[0].rsplit("/", 1)[0]
    assert "Deleted expert" in services.delete_expert(ctx=ctx, expert=names[0])
    assert _row(ctx, names[0]) is None and not ctx.store.exists(keys[0])
    assert ctx.store.exists(keys[1]) and ctx.store.exists(f"{run}/manifest.json")  # the siblings keep their run
    services.delete_expert(ctx=ctx, expert=names[1])
    services.delete_expert(ctx=ctx, expert=names[2])
    assert ctx.store.list(run) == []
    assert len(services.list_experts(ctx=ctx)) == 7
