"""The studio in a real headless Chromium, clicked through as a person would: upload the demo data, compose a
mixture, train it on a real worker, watch the job reach done, prompt it in the playground and see the heatmap.

Screenshots of the five tabs after the flow go to ``test-artifacts/``; with ``UPDATE_SCREENSHOTS=1`` they also
replace ``docs/screenshots/`` (the README shows those).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from models.bases import BUILTIN_TINY
from models.demo import DEMO_TASKS
from tests.app.test_flow import small_demo_files

pytestmark = pytest.mark.ui

DOCS_SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
TRAIN_TIMEOUT_MS = 240_000


def _open_tab(page: object, label: str) -> None:
    page.get_by_role("tab", name=label).click()  # type: ignore[attr-defined]


def _fill_dropdown(page: object, elem_id: str, values: list[str]) -> None:
    """Type each value into a Gradio dropdown and take it with Enter (custom values allowed, choices matched)."""
    box = page.locator(f"#{elem_id} input").first  # type: ignore[attr-defined]
    for value in values:
        box.click()
        box.fill(value)
        box.press("Enter")
    box.press("Escape")


def _shot(page: object, name: str, artifacts_dir: Path) -> None:
    path = artifacts_dir / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_SCREENSHOTS / f"{name}.png")


def test_a_person_uploads_composes_trains_and_prompts(
    studio: tuple[object, str],
    browser: object,
    start_worker: Callable[..., object],
    tmp_path: Path,
    artifacts_dir: Path,
) -> None:
    _, url = studio
    start_worker()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})  # type: ignore[attr-defined]
    page.set_default_timeout(30_000)
    page.goto(url, wait_until="load")

    # Datasets: a broken file is refused in the page, with the row that is wrong, and nothing is stored.
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"\n')
    page.locator("#datasets-files input[type=file]").set_input_files([str(broken)])
    page.locator("#datasets-report").get_by_text("broken.jsonl").first.wait_for()
    page.locator("#datasets-upload").click()
    page.get_by_text("Nothing was stored").first.wait_for()
    page.locator("#datasets-report").get_by_text("line 2").first.wait_for()
    page.get_by_test_id("toast-close").first.click()  # read, dismissed: the message does not follow to other tabs
    page.get_by_text("Nothing was stored").first.wait_for(state="detached")
    page.locator("#datasets-files button[aria-label='Clear']").last.click()  # the box's ×: take the file away
    page.locator("#datasets-report").get_by_text("broken.jsonl").wait_for(state="detached")

    # Datasets: pick the four files, upload, see them validated and counted.
    page.locator("#datasets-files input[type=file]").set_input_files([str(p) for p in small_demo_files(tmp_path)])
    page.locator("#datasets-report").get_by_text("times").first.wait_for()  # validated before anything is stored
    page.locator("#datasets-upload").click()
    page.get_by_text(f"Stored {len(DEMO_TASKS)} dataset(s)").wait_for()
    for task in DEMO_TASKS:
        page.locator("#datasets-table").get_by_text(task, exact=True).filter(visible=True).first.wait_for()
    _fill_dropdown(page, "datasets-select", ["dates"])
    page.locator("#datasets-preview").get_by_text("Rewrite the date").filter(visible=True).first.wait_for()

    # Compose: the tiny base, the four datasets, a short schedule; save and train.
    _open_tab(page, "Compose")
    _compose_and_train(page)
    _watch_and_prompt(page)
    _look_at_the_registry(page)
    for label in ("Playground", "Datasets", "Compose", "Jobs", "Experts"):
        _open_tab(page, label)
        page.wait_for_timeout(1000)
        _shot(page, f"tab-{label.lower()}", artifacts_dir)
    page.close()


def _compose_and_train(page: object) -> None:
    _fill_dropdown(page, "compose-base", [BUILTIN_TINY])
    _fill_dropdown(page, "compose-datasets", list(DEMO_TASKS))
    page.locator("#compose-router input").first.wait_for()
    _fill_dropdown(page, "compose-router", ["modula"])
    _fill_dropdown(page, "compose-schedule", ["modula"])
    _fill_until_it_stays(page, "#compose-stage-steps", "2, 2, 2")
    page.locator("#compose-diagram svg").first.wait_for()
    page.locator("#compose-name textarea, #compose-name input").first.fill("browser-flow")
    page.locator("#compose-save").click()
    page.locator("#compose-status").get_by_text("browser-flow").first.wait_for()
    _fill_dropdown(page, "compose-mixture", ["browser-flow"])
    page.locator("#compose-train").click()


def _fill_until_it_stays(page: object, selector: str, text: str) -> None:
    """Type into a textbox until no queued event of an earlier choice (the schedule's defaults) overwrites it."""
    box = page.locator(f"{selector} textarea, {selector} input").first  # type: ignore[attr-defined]
    for _ in range(10):
        box.fill(text)
        box.press("Tab")
        page.wait_for_timeout(1500)  # type: ignore[attr-defined]
        if box.input_value() == text:
            return
    raise AssertionError(f"{selector} kept being reset: {box.input_value()!r}")


def _watch_and_prompt(page: object) -> None:
    # Jobs: the page switches here; the job reaches done.
    page.get_by_role("tab", name="Jobs", selected=True).wait_for()
    page.locator("#jobs-table").get_by_text("succeeded").filter(visible=True).first.wait_for(timeout=TRAIN_TIMEOUT_MS)
    page.locator("#jobs-table").get_by_text("6/6", exact=True).filter(visible=True).first.wait_for()  # the typed steps

    # Playground: the trained mixture (listed when the tab opens), a prompt, the output and the routing heatmap.
    _open_tab(page, "Playground")
    _fill_dropdown(page, "playground-mixture", ["browser-flow"])
    page.locator("#playground-prompt textarea").first.fill("Give the domain of the e-mail address.")
    page.locator("#playground-input textarea").first.fill("Write to bob7@lab.io.")
    page.locator("#playground-run").click()
    page.locator("#playground-layers img").filter(visible=True).first.wait_for(timeout=60_000)
    page.locator("#playground-token-map img").filter(visible=True).first.wait_for()


def _look_at_the_registry(page: object) -> None:
    # Experts: opening the tab lists the experts the job just registered, with their lineage.
    _open_tab(page, "Experts")
    table = page.locator("#experts-table")
    for task in DEMO_TASKS:  # registered as <expert>-<job id>
        table.get_by_text(re.compile(rf"^{task}-expert-[0-9a-f]{{8}}$")).filter(visible=True).first.wait_for()
    table.get_by_text(re.compile(r"^dates-expert-")).filter(visible=True).first.click()  # a row click selects it
    page.locator("#experts-lineage").get_by_text("browser-flow").first.wait_for()
