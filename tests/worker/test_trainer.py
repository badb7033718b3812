"""The trainer on the tiny built-in base: stages train only their groups, resume is bit-exact, cancel stops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.bases import BUILTIN_TINY
from models.data import ExampleRow
from models.demo import DEMO_TASKS, demo_rows, demo_spec
from models.mixture import ROUTERS_FILE, expert_file
from models.spec import MixtureSpec
from models.storage import ArtifactStore
from worker import checkpoints
from worker.trainer import Trainer, TrainerHooks, TrainingCancelled


@pytest.fixture(scope="module")
def rows() -> list[ExampleRow]:
    return demo_rows(per_task=24)


def _spec(
    schedule: str = "joint", steps: list[int] | None = None, router: str = "softmax", **changes: object
) -> MixtureSpec:
    base = demo_spec(BUILTIN_TINY, router=router).model_dump()
    lengths = steps or {"joint": [6], "modula": [2, 4, 2], "at_moe": [4, 2], "add_task": [3, 2]}[schedule]
    base["schedule"] = base["schedule"] | {
        "kind": schedule,
        "stage_steps": lengths,
        "batch_size": 4,
        "checkpoint_every": 3,
        "eval_every": 100,
        "max_length": 96,
    }
    return MixtureSpec.model_validate(base | changes)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        found |= {f"{path.name}:{k}": v for k, v in load_file(str(path)).items()}
    return found


def _trainer(spec: MixtureSpec, rows: list[ExampleRow], bases_dir: Path, work: Path, **kwargs: object) -> Trainer:
    return Trainer(spec, rows, data_dir=bases_dir, work_dir=work, eval_max_per_task=4, **kwargs)


def test_joint_training_lowers_the_loss_and_writes_every_expert(
    rows: list[ExampleRow], bases_dir: Path, tmp_path: Path
) -> None:
    seen: list[float] = []
    hooks = TrainerHooks(on_progress=lambda p: seen.append(p.loss))
    result = _trainer(_spec(steps=[30]), rows, bases_dir, tmp_path, hooks=hooks).run()
    assert result.steps == 30 and len(seen) == 30
    assert sum(seen[-5:]) / 5 < sum(seen[:5]) / 5
    names = {p.name for p in result.experts_folder.iterdir()}
    assert {expert_file(f"{t}-expert") for t in DEMO_TASKS} | {expert_file("universal-0")} <= names
    assert set(result.metrics) == set(DEMO_TASKS)


def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(
    rows: list[ExampleRow], bases_dir: Path, tmp_path: Path
) -> None:
    spec = _spec(lora_dropout=0.1)  # dropout: the RNG state must be restored too
    whole = _trainer(spec, rows, bases_dir, tmp_path / "whole").run()
    store = ArtifactStore(str(tmp_path / "store"))
    steps: list[int] = []
    stop_at_3 = TrainerHooks(on_progress=lambda p: steps.append(p.step), should_stop=lambda: steps[-1] >= 3)
    with pytest.raises(TrainingCancelled):
        _trainer(spec, rows, bases_dir, tmp_path / "a", store=store, checkpoint_prefix="ck", hooks=stop_at_3).run()
    assert checkpoints.list_checkpoints(store, "ck") == ["ck/step-00000003"]
    resumed = _trainer(spec, rows, bases_dir, tmp_path / "b", store=store, checkpoint_prefix="ck").run()
    assert resumed.resumed_from == 3
    expected, got = _tensors(whole.experts_folder), _tensors(resumed.experts_folder)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(
    rows: list[ExampleRow], bases_dir: Path, tmp_path: Path
) -> None:
    spec = _spec()
    store = ArtifactStore(str(tmp_path / "store"))
    _trainer(spec, rows, bases_dir, tmp_path / "a", store=store, checkpoint_prefix="ck").run()
    keys = checkpoints.list_checkpoints(store, "ck")
    assert keys == ["ck/step-00000003", "ck/step-00000006"]
    damaged = next(k for k in store.list(keys[-1]) if k.endswith(".safetensors"))
    store.put_bytes(damaged, b"garbage")
    found = checkpoints.load_latest(store, "ck", tmp_path)
    assert found is not None and found.step == 3


def _group_snapshot(trainer: Trainer) -> dict[str, list[torch.Tensor]]:
    return {k: [p.detach().clone() for p in v] for k, v in trainer.mixture.parameter_groups().items()}


@pytest.mark.parametrize("schedule", ["modula", "at_moe"])
def test_staged_schedules_train_only_each_stages_groups(
    schedule: str, rows: list[ExampleRow], bases_dir: Path, tmp_path: Path
) -> None:
    spec = _spec(schedule, router="modula" if schedule == "modula" else "grouped")
    trainer = _trainer(spec, rows, bases_dir, tmp_path)
    snapshots = [_group_snapshot(trainer)]
    boundaries = {sum(spec.schedule.stage_steps[: i + 1]) for i in range(len(spec.schedule.stage_steps))}
    trainer.hooks.on_progress = lambda p: snapshots.append(_group_snapshot(trainer)) if p.step in boundaries else None
    trainer.run()
    changed = [
        {g for g in before if any(not torch.equal(a, b) for a, b in zip(before[g], after[g], strict=True))}
        for before, after in zip(snapshots, snapshots[1:], strict=False)
    ]
    experts = {f"expert:{t}-expert" for t in DEMO_TASKS}
    if schedule == "modula":
        assert changed == [{"expert:universal-0"}, experts, {"router"}]
    else:
        assert changed == [experts | {"expert:universal-0"}, {"router"}]


@pytest.mark.parametrize("router", ["softmax", "grouped", "semantic"])
def test_add_task_leaves_every_old_expert_and_router_row_bit_identical(
    rows: list[ExampleRow], bases_dir: Path, tmp_path: Path, router: str
) -> None:
    three = [r for r in rows if r.task != "times"]
    parent_spec = _spec(
        router=router,
        tasks=list(DEMO_TASKS[:3]),
        experts=[{"name": f"{t}-expert", "tasks": [t]} for t in DEMO_TASKS[:3]],
    )
    parent = _trainer(parent_spec, three, bases_dir, tmp_path / "parent").run()
    grown = parent_spec.with_task_expert("times", name="times-expert", steps=(3, 2))
    child = _trainer(grown, rows, bases_dir, tmp_path / "child", parent_experts=parent.experts_folder).run()
    old, new = _tensors(parent.experts_folder), _tensors(child.experts_folder)
    for key, value in old.items():
        if key.startswith("expert-"):
            assert torch.equal(value, new[key]), key
    assert any(k.startswith(expert_file("times-expert")) for k in new)
    routers = [k for k in old if k.startswith(ROUTERS_FILE)]
    assert routers
    learned = []
    for key in routers:  # old rows and the query centre route the old tasks as before; the new rows learned
        before = tuple(slice(0, n) for n in old[key].shape)  # the old block of a grown tensor
        assert torch.equal(old[key], new[key][before]), key
        if new[key].shape != old[key].shape and key.endswith(".weight"):
            learned.append(bool(new[key][old[key].shape[0] :].abs().sum() > 0))
    assert learned and any(learned)  # (a one-expert group's within-group row gets no gradient: it is always 1)


def test_data_with_a_task_the_mixture_lacks_is_refused(
    rows: list[ExampleRow], bases_dir: Path, tmp_path: Path
) -> None:
    spec = _spec(tasks=list(DEMO_TASKS[:3]), experts=[{"name": f"{t}-expert", "tasks": [t]} for t in DEMO_TASKS[:3]])
    with pytest.raises(ValueError, match="times"):
        _trainer(spec, rows, bases_dir, tmp_path)
