"""The whole studio flow through its API, as a script would drive it: ``gradio_client`` against the real running
page, with a real ``mole-studio worker`` process on the embedded broker training the job.

upload the demo data -> save a mixture -> start training -> poll the queue to done -> prompt the trained mixture
and get its routing weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from models.bases import BUILTIN_TINY
from models.demo import DEMO_TASKS, demo_files, demo_spec

pytestmark = pytest.mark.ui

TRAIN_TIMEOUT_S = 240


def small_demo_files(folder: Path, lines: int = 40) -> list[Path]:
    """The first ``lines`` rows of each bundled demo task, as files named after the task."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for path in demo_files():
        small = folder / path.name
        small.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:lines]))
        paths.append(small)
    return paths


def quick_spec() -> dict:
    """The demo mixture on the tiny base with a few steps per stage: the flow, not the quality, is under test."""
    spec = demo_spec(BUILTIN_TINY).model_dump(mode="json")
    spec["schedule"] |= {
        "stage_steps": [2, 2, 2],
        "batch_size": 4,
        "max_length": 96,
        "eval_every": 1000,
        "checkpoint_every": 1000,
    }
    return spec


def wait_for_state(client: Client, job_prefix: str, timeout_s: float) -> dict:
    """Poll the queue (``list_jobs``) until the job leaves queued/running; its row."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        table = client.predict(api_name="/list_jobs")
        rows = [dict(zip(table["headers"], row, strict=True)) for row in table["data"]]
        mine = [r for r in rows if str(r["job"]).startswith(job_prefix[:8])]
        if mine and mine[0]["state"] not in ("queued", "running"):
            return mine[0]
        time.sleep(2)
    raise AssertionError(f"job {job_prefix} did not finish in {timeout_s} s; queue: {rows}")


def test_upload_compose_train_and_prompt_through_the_api(
    studio: tuple[object, str], start_worker: Callable[..., object], tmp_path: Path
) -> None:
    _, url = studio
    start_worker()
    client = Client(url, verbose=False)

    files = [handle_file(str(p)) for p in small_demo_files(tmp_path / "upload")]
    message = client.predict(files, "", api_name="/upload_datasets")
    assert all(task in message for task in DEMO_TASKS), message

    status, *_ = client.predict("flow", quick_spec(), list(DEMO_TASKS), "", api_name="/save_mixture")
    assert "flow" in status

    job_id, started = client.predict("flow", api_name="/start_training")
    assert job_id and job_id[:8] in started

    row = wait_for_state(client, job_id, TRAIN_TIMEOUT_S)
    assert row["state"] == "succeeded", row

    trained = client.predict("", api_name="/list_trained_mixtures")
    assert "flow" in str(trained)
    outputs = client.predict(
        "flow", "Rewrite the date as DD/MM/YYYY.", "2024-03-15", "dates", 8, api_name="/run_prompt"
    )
    text, details, layers_plot, layer_choices, tokens_plot, *_ = outputs
    assert isinstance(text, str) and "tokens in" in details and "task dates" in details
    assert layers_plot["type"] == "matplotlib" and layers_plot["plot"].startswith("data:image/png")
    assert tokens_plot["type"] == "matplotlib"
    assert any("q_proj" in str(choice) for choice in layer_choices["choices"])  # one heatmap per routed layer
