"""The bundled demo: files reproducible from the generator, valid as uploads, four tasks with distinct answers."""

from __future__ import annotations

from pathlib import Path

from models.data import validate_upload
from models.demo import (
    ALL_PROJECTIONS,
    DEMO_RECIPES,
    DEMO_TASKS,
    ROWS_PER_TASK,
    demo_files,
    demo_rows,
    demo_spec,
    tuned_demo_spec,
    write_demo_files,
)


def test_shipped_files_are_what_the_generator_writes(tmp_path: Path) -> None:
    regenerated = write_demo_files(tmp_path)
    for shipped, fresh in zip(demo_files(), regenerated, strict=True):
        assert shipped.read_bytes() == fresh.read_bytes(), shipped.name


def test_every_demo_file_passes_upload_validation() -> None:
    for path in demo_files():
        report = validate_upload(path.read_bytes(), path.name, default_task=path.stem)
        assert report.ok, report.summary()
        assert report.task_counts == {path.stem: ROWS_PER_TASK}


def test_answers_follow_each_tasks_rule() -> None:
    rows = {task: [r for r in demo_rows(per_task=50) if r.task == task] for task in DEMO_TASKS}
    for row in rows["dates"]:
        year, month, day = row.input.split("-")
        assert row.output == f"{day}/{month}/{year}"
    assert all(row.output == row.input.split("@")[1].removesuffix(".") for row in rows["emails"])
    assert all(row.output == ("question" if row.input.endswith("?") else "statement") for row in rows["questions"])
    assert {row.output for row in rows["questions"]} == {"question", "statement"}
    for row in rows["times"]:
        clock, half = row.input.split()
        hour, minute = clock.split(":")
        expected = (int(hour) % 12) + (12 if half == "pm" else 0)
        assert row.output == f"{expected:02d}:{minute}"
    assert {"00", "12"} <= {row.output[:2] for row in demo_rows() if row.task == "times"}  # both midnight and noon


def test_demo_spec_is_universal_plus_one_expert_per_task_with_a_learned_router() -> None:
    spec = demo_spec("builtin:tiny")
    assert spec.tasks == list(DEMO_TASKS) and spec.universal.count == 1
    assert [e.tasks for e in spec.experts] == [[t] for t in DEMO_TASKS]
    assert spec.router.kind == "modula" and spec.schedule.kind == "modula"


def test_the_tuned_demo_is_the_measured_recipe_of_each_base() -> None:
    tiny = tuned_demo_spec("builtin:tiny")
    assert tiny.schedule.stage_steps == list(DEMO_RECIPES["builtin:tiny"].stage_steps)
    assert tiny.loss.weighting == "achievement" and tiny.router.options["granularity"] == "sequence"
    assert tiny.target_modules == ALL_PROJECTIONS and tiny.router.options["variant"] == "res"
    other = tuned_demo_spec("some-org/some-model")  # any other base trains like the pre-trained SmolLM2
    assert other.schedule.stage_steps == list(DEMO_RECIPES["builtin:smollm2-135m-instruct"].stage_steps)
