"""The Datasets tab through the running page's API (gradio_client), the same endpoints the buttons call."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import gradio as gr
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from app.context import StudioContext
from app.services.mixtures import save_mixture
from models.registry import Dataset
from models.settings import Settings
from models.spec import default_spec

ROWS = [{"task": "alpha" if i % 2 else "beta", "instruction": f"say {i}", "output": str(i)} for i in range(6)]
GOOD = b"".join(json.dumps(row).encode() + b"\n" for row in ROWS)


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    """A 1 MB upload limit (the smallest the settings allow), for the page and the services alike."""
    return Settings(studio_data_dir=data_dir, max_upload_mb=1)


@pytest.fixture
def client(studio: tuple[gr.Blocks, str]) -> Client:
    return Client(studio[1], verbose=False)


@pytest.fixture
def ctx(settings: Settings) -> StudioContext:
    return StudioContext(settings=settings)


def write(folder: Path, name: str, data: bytes) -> str:
    path = folder / name
    path.write_bytes(data)
    return str(path)


def stored(ctx: StudioContext) -> tuple[int, list[str]]:
    with ctx.session() as s:
        return s.scalar(sa.select(sa.func.count()).select_from(Dataset)) or 0, ctx.store.list()


def zipped(data: bytes) -> bytes:
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w") as archive:
        archive.writestr("rows.jsonl", data)
    return sink.getvalue()


def test_the_limit_is_stated_on_the_page(studio: tuple[gr.Blocks, str]) -> None:
    demo, _ = studio
    texts = [block.value for block in demo.blocks.values() if isinstance(block, gr.Markdown)]
    assert any("at most **1 MB**" in str(text) for text in texts)


def test_upload_preview_counts_rename_delete(client: Client, ctx: StudioContext, tmp_path: Path) -> None:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "response": "r"}]), sink)
    files = [
        handle_file(write(tmp_path, "tasks.jsonl", GOOD)),
        handle_file(write(tmp_path, "one.parquet", sink.getvalue())),
    ]

    report = client.predict(files, api_name="/check_uploads")
    assert "✅ tasks.jsonl is valid: 6 rows in 2 tasks (alpha: 3, beta: 3)" in report
    message = client.predict(files, "", api_name="/upload_datasets")
    assert message == "Stored 2 dataset(s): 'tasks', 'one'."
    table, selector = client.predict(None, api_name="/list_datasets")
    assert [row[:4] for row in table["data"]] == [["tasks", "jsonl", "alpha, beta", 6], ["one", "parquet", "one", 1]]
    assert selector["choices"] == [["tasks", "tasks"], ["one", "one"]]

    preview = client.predict("tasks", api_name="/preview_dataset")
    assert preview["headers"] == ["row", "task", "instruction", "input", "output"]
    assert [row[1:3] for row in preview["data"][:2]] == [["beta", "say 0"], ["alpha", "say 1"]]
    counts = client.predict("tasks", api_name="/task_counts")
    assert counts["data"] == [["alpha", 3, "tasks"], ["beta", 3, "tasks"]]

    status = client.predict("tasks", "renamed", api_name="/rename_dataset")
    assert status == "Renamed 'tasks' to 'renamed'."
    status = client.predict("one", api_name="/delete_dataset")
    assert status == "Deleted 'one'."
    table, selector = client.predict(None, api_name="/list_datasets")
    assert [row[0] for row in table["data"]] == ["renamed"] and selector["choices"] == [["renamed", "renamed"]]
    assert stored(ctx)[0] == 1 and len(stored(ctx)[1]) == 1


@pytest.mark.parametrize(
    ("filename", "data", "expected"),
    [
        ("empty.jsonl", b"", "file is empty"),
        ("table.parquet", GOOD, "not a Parquet file"),
        ("cut.jsonl", GOOD[:-7], "truncated"),
        ("latin.csv", "instruction,output\ncaf\u00e9,b\n".encode("latin-1"), "not valid UTF-8"),
        ("columns.csv", b"question_text,output\na,b\n", "missing column 'instruction'"),
        ("noise.csv", bytes(range(256)), "binary file"),
        ("archive.jsonl", zipped(GOOD), "ZIP archive"),
        ("escape.jsonl", b'{"task": "../x", "instruction": "a", "output": "b"}\n', "file paths"),
        ("nested.jsonl", b'{"task": "a/b", "instruction": "a", "output": "b"}\n', "file paths"),
    ],
    ids=[
        "empty",
        "wrong-format",
        "truncated",
        "encoding",
        "columns",
        "binary",
        "renamed-zip",
        "task-dotdot",
        "task-slash",
    ],
)
def test_bad_upload_comes_back_as_an_error_naming_the_problem(
    client: Client, ctx: StudioContext, tmp_path: Path, filename: str, data: bytes, expected: str
) -> None:
    good = handle_file(write(tmp_path, "fine.jsonl", GOOD))
    with pytest.raises(AppError) as refused:
        client.predict([good, handle_file(write(tmp_path, filename, data))], "", api_name="/upload_datasets")
    message = str(refused.value)
    assert "Nothing was stored: 1 of 2 files" in message
    assert filename in message and expected in message
    assert stored(ctx) == (0, [])


def test_refusals_of_names_types_size_and_used_datasets(client: Client, ctx: StudioContext, tmp_path: Path) -> None:
    good = handle_file(write(tmp_path, "tasks.jsonl", GOOD))
    with pytest.raises(AppError, match="looks like a file path"):
        client.predict([good], "../../etc", api_name="/upload_datasets")
    with pytest.raises(AppError, match="Invalid file type"):  # gr.File's own check of file_types
        client.predict([handle_file(write(tmp_path, "notes.txt", GOOD))], "", api_name="/upload_datasets")
    big = write(tmp_path, "big.jsonl", GOOD * (ctx.settings.max_upload_bytes // len(GOOD) + 1))
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # the client reads the page's limit
        client.predict([handle_file(big)], "", api_name="/upload_datasets")
    assert stored(ctx) == (0, [])

    client.predict([good], "", api_name="/upload_datasets")
    spec = default_spec("builtin:tiny", ["alpha", "beta"]).model_dump(mode="json")
    save_mixture(ctx=ctx, name="uses-tasks", spec_json=spec, dataset_names=["tasks"])
    with pytest.raises(AppError, match="used by the mixture 'uses-tasks'"):
        client.predict("tasks", api_name="/delete_dataset")
    with pytest.raises(AppError, match="no dataset named 'ghost'"):
        client.predict("ghost", api_name="/preview_dataset")
    with pytest.raises(AppError, match="is not allowed"):
        client.predict("tasks", "two words", api_name="/rename_dataset")
    assert stored(ctx)[0] == 1
