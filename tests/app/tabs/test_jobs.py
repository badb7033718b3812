"""The Jobs tab's endpoints through ``gradio_client`` against the running studio, on a failed-then-retried run."""

from __future__ import annotations

import shutil
from pathlib import Path

import gradio as gr
import pytest
import sqlalchemy as sa
from gradio_client import Client

from app.context import StudioContext
from app.services.jobs import JOB_COLUMNS
from app.tabs.jobs import select_job
from migrations import upgrade_head
from models.demo import DEMO_TASKS
from models.registry import Job, JobState, Mixture
from models.settings import Settings
from tests.app.services.test_jobs import Retried, fail_then_retry
from worker.dispatch import submit_training


@pytest.fixture(scope="module")
def retried(tmp_path_factory: pytest.TempPathFactory, bases_dir: Path) -> Retried:
    return fail_then_retry(tmp_path_factory.mktemp("jobs-tab") / "studio", bases_dir)


@pytest.fixture
def data_dir(retried: Retried, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The ``studio`` fixture's data dir, a private copy of the retried run's registry."""
    folder = tmp_path / "studio"
    shutil.copytree(retried.folder, folder)
    monkeypatch.setenv("STUDIO_DATA_DIR", str(folder))
    return folder


@pytest.fixture
def client(studio: tuple[gr.Blocks, str]) -> Client:
    return Client(studio[1], verbose=False)


def _queued_job(settings: Settings) -> str:
    """A new job of the demo mixture, queued (no worker runs here)."""
    ctx = StudioContext(settings=settings)
    with ctx.session() as s:
        mixture_id = s.scalar(sa.select(Mixture.id).where(Mixture.name == "demo"))
    return submit_training(settings, mixture_id, send=False).hex[:8]


def test_the_table_has_a_progress_bar_per_job(client: Client, retried: Retried) -> None:
    table = client.predict(api_name="/list_jobs")
    assert table["headers"] == JOB_COLUMNS
    row = dict(zip(table["headers"], table["data"][0], strict=True))
    assert (row["job"], row["state"], row["progress"], row["step"], row["attempt"]) == (
        retried.job_id.hex[:8],
        "succeeded",
        100,
        "4/4",
        2,
    )
    progress = JOB_COLUMNS.index("progress")
    assert "linear-gradient" in table["metadata"]["styling"][0][progress]  # the bar, drawn in the cell
    assert table["metadata"]["display_value"][0][progress] == "100%"


def test_detail_and_curves_of_a_job(client: Client, retried: Retried) -> None:
    short = retried.job_id.hex[:8]
    summary, error, events = client.predict(job=short, api_name="/job_detail")
    assert f"<b>Job {short}</b> · mixture <b>demo</b> · <b>succeeded</b>" in summary
    assert '<progress value="100.0" max="100"' in summary and "step 4/4" in summary
    assert error == ""
    assert [row[1] for row in events["data"]][-4:] == ["claimed", "resumed", "checkpoint", "succeeded"]
    loss, evals = client.predict(job=short, metric="exact_match", api_name="/job_curves")
    assert loss["columns"] == ["step", "value", "task"] and loss["mark"] == "line"
    assert loss["datatypes"] == {"step": "quantitative", "value": "quantitative", "task": "nominal"}
    assert {row[2] for row in loss["data"]} == {*DEMO_TASKS, "all tasks"}
    assert sorted(row[2] for row in evals["data"]) == sorted(DEMO_TASKS) and {row[0] for row in evals["data"]} == {4}


def test_a_failed_job_shows_its_error(client: Client, retried: Retried, settings: Settings) -> None:
    with StudioContext(settings=settings).session() as s:
        s.execute(sa.update(Job).values(state=JobState.FAILED, error="the file of dataset 'dates' is missing"))
    summary, error, _ = client.predict(job=retried.job_id.hex[:8], api_name="/job_detail")
    assert "<b>failed</b>" in summary and error == "the file of dataset 'dates' is missing"


def test_cancel_and_retry(client: Client, retried: Retried, settings: Settings) -> None:
    short = _queued_job(settings)
    assert client.predict(job=short, api_name="/cancel_job") == f"Cancelled job {short} before it started."
    with pytest.raises(Exception, match=f"job {short} already cancelled; there is nothing to cancel"):
        client.predict(job=short, api_name="/cancel_job")
    assert client.predict(job=short, api_name="/retry_job").startswith(f"Job {short} is queued again")
    done = retried.job_id.hex[:8]
    with pytest.raises(Exception, match=f"job {done} succeeded; there is nothing to retry"):
        client.predict(job=done, api_name="/retry_job")
    table = client.predict(api_name="/list_jobs")
    states = {row[0]: row[2] for row in table["data"]}
    assert states == {short: "queued", done: "succeeded"}


def test_bad_inputs_come_back_as_messages(client: Client, retried: Retried) -> None:
    for endpoint in ("/job_detail", "/cancel_job", "/retry_job"):
        with pytest.raises(Exception, match="no job 'ghost'"):
            client.predict(job="ghost", api_name=endpoint)
    for endpoint in ("/cancel_job", "/retry_job"):
        with pytest.raises(Exception, match="choose a job first"):
            client.predict(job="", api_name=endpoint)
    with pytest.raises(Exception, match="unknown eval metric 'bleu'"):
        client.predict(job=retried.job_id.hex[:8], metric="bleu", api_name="/job_curves")


def test_select_job_gives_the_table_and_the_selector_for_another_tab(retried: Retried, settings: Settings) -> None:
    upgrade_head(settings.db_url)
    table, selector = select_job(StudioContext(settings=settings), retried.job_id)
    short = retried.job_id.hex[:8]
    assert selector.value == short and selector.choices == [(f"{short} · demo", short)]
    assert list(table.data["job"]) == [short]
