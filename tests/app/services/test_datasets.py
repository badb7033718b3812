"""Dataset services against a real SQLite database and artifact store: every bad upload is refused whole."""

from __future__ import annotations

import io
import json
import os
import threading
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from app.context import ServiceError, StudioContext
from app.services import datasets as services
from app.services.mixtures import save_mixture
from migrations import upgrade_head
from models.registry import Dataset
from models.settings import Settings
from models.spec import default_spec


def jsonl(*rows: dict) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def parquet(rows: list[dict]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


def zipped(name: str, data: bytes) -> bytes:
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w") as archive:
        archive.writestr(name, data)
    return sink.getvalue()


GOOD_ROWS = [{"instruction": f"say {i}", "output": f"{i}"} for i in range(5)]
GOOD = jsonl(*GOOD_ROWS)
TASKED = jsonl(*({"task": "alpha" if i % 3 else "beta", **row} for i, row in enumerate(GOOD_ROWS)))
CSV = b"instruction,input,output\nadd,1 2,3\nsub,3 1,2\n"
CHAT = jsonl(
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ]
    }
)

# (file name, content, words the message must hold); every kind of bad upload of issue item 8.
BAD_UPLOADS = {
    "empty": ("empty.jsonl", b"", "file is empty"),
    "only-whitespace": ("blank.csv", b"\n \n", "only whitespace"),
    "csv-named-jsonl": ("table.jsonl", CSV, "does not look like JSON Lines"),
    "jsonl-named-csv": ("rows.csv", GOOD, "looks like JSON, not CSV"),
    "text-named-parquet": ("rows.parquet", GOOD, "not a Parquet file"),
    "truncated-jsonl": ("cut.jsonl", GOOD[:-9], "truncated"),
    "truncated-parquet": ("cut.parquet", parquet(GOOD_ROWS)[:-40], "truncated"),
    "truncated-utf8": ("cut.csv", "instruction,output\nsay,caf\u00e9".encode()[:-1], "truncated"),
    "latin-1": ("latin.csv", "instruction,output\nsay,caf\u00e9\n".encode("latin-1"), "not valid UTF-8"),
    "utf-16": ("wide.jsonl", GOOD.decode().encode("utf-16"), "UTF-16"),
    "missing-output": ("half.jsonl", jsonl({"instruction": "a"}), "missing column 'output'"),
    "misspelt-column": ("typo.csv", b"instructon,output\na,b\n", "missing column 'instruction'"),
    "wrong-type-row-3": ("types.jsonl", jsonl(*GOOD_ROWS[:2], {"instruction": "x", "output": 7}), "row 3"),
    "blank-output-row-2": ("blank.jsonl", jsonl(GOOD_ROWS[0], {"instruction": "x", "output": " "}), "row 2"),
    "binary-nul": ("noise.csv", bytes(range(256)), "binary file"),
    "png-named-jsonl": ("image.jsonl", b"\x89PNG\r\n\x1a\n" + bytes(64), "PNG image"),
    "zip-named-jsonl": ("archive.jsonl", zipped("rows.jsonl", GOOD), "ZIP archive"),
    "zip-named-csv": ("archive.csv", zipped("rows.csv", CSV), "ZIP archive"),
    "zip-named-parquet": ("archive.parquet", zipped("rows.parquet", GOOD), "ZIP archive"),
    "task-dotdot": ("path1.jsonl", jsonl({"task": "../x", "instruction": "a", "output": "b"}), "file paths"),
    "task-slash": ("path2.jsonl", jsonl({"task": "a/b", "instruction": "a", "output": "b"}), "file paths"),
    "task-backslash": ("path3.csv", b"task,instruction,output\n..\\etc,a,b\n", "file paths"),
    "task-absolute": ("path4.jsonl", jsonl({"task": "/etc/passwd", "instruction": "a", "output": "b"}), "file paths"),
}


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    """The smallest upload limit settings allow (1 MB), so 'too large' costs little."""
    return Settings(studio_data_dir=data_dir, max_upload_mb=1)


@pytest.fixture
def ctx(settings: Settings) -> StudioContext:
    upgrade_head(settings.db_url)
    return StudioContext(settings=settings)


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def assert_nothing_stored(ctx: StudioContext) -> None:
    with ctx.session() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Dataset)) == 0
    assert ctx.store.list() == []


# --- refusals ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("filename", "data", "expected"), BAD_UPLOADS.values(), ids=BAD_UPLOADS.keys())
def test_bad_upload_is_refused_with_its_problem_and_nothing_is_stored(
    ctx: StudioContext, tmp_path: Path, filename: str, data: bytes, expected: str
) -> None:
    with pytest.raises(ServiceError) as refused:
        services.upload_datasets(ctx=ctx, paths=[write(tmp_path, filename, data)])
    message = str(refused.value)
    assert expected in message
    assert filename in message
    assert message.startswith("Nothing was stored")
    assert_nothing_stored(ctx)


@pytest.mark.parametrize(("filename", "data", "expected"), BAD_UPLOADS.values(), ids=BAD_UPLOADS.keys())
def test_create_dataset_refuses_the_same_bad_bytes(
    ctx: StudioContext, filename: str, data: bytes, expected: str
) -> None:
    with pytest.raises(ServiceError, match=expected.replace("(", r"\(")):
        services.create_dataset(ctx=ctx, filename=filename, data=data)
    assert_nothing_stored(ctx)


def test_file_larger_than_the_limit_is_refused_and_the_limit_is_stated(ctx: StudioContext, tmp_path: Path) -> None:
    big = GOOD * (ctx.settings.max_upload_bytes // len(GOOD) + 1)
    path = write(tmp_path, "big.jsonl", big)
    with pytest.raises(ServiceError, match=r"big\.jsonl.*the limit is 1 MB"):
        services.upload_datasets(ctx=ctx, paths=[path])
    with pytest.raises(ServiceError, match="the limit is 1 MB"):
        services.create_dataset(ctx=ctx, filename="big.jsonl", data=big)
    assert_nothing_stored(ctx)


def test_read_upload_stops_at_the_cap_without_reading_to_the_end(tmp_path: Path) -> None:
    """Through a pipe (whose size is unknown up front) the reader gives up after limit + 1 bytes, not at EOF."""
    fifo = tmp_path / "endless.jsonl"
    os.mkfifo(fifo)
    written = []

    def feed() -> None:
        try:
            with open(fifo, "wb", buffering=0) as pipe:
                for _ in range(10_000):  # 10 MB, far more than is read; the writer fails once the reader is gone
                    pipe.write(b"x" * 1024)
                    written.append(1)
        except BrokenPipeError:
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    with pytest.raises(ServiceError, match="larger than the limit of 4 KB"):
        services.read_upload(fifo, max_bytes=4096)
    writer.join(timeout=10)
    assert not writer.is_alive()
    assert len(written) < 10_000


def test_one_bad_file_refuses_the_whole_batch_and_reports_every_file(ctx: StudioContext, tmp_path: Path) -> None:
    paths = [
        write(tmp_path, "good.jsonl", GOOD),
        write(tmp_path, "bad.csv", b"instruction,output\nok,fine\n,missing\nalso,\n"),
        write(tmp_path, "archive.jsonl", zipped("x.jsonl", GOOD)),
    ]
    with pytest.raises(ServiceError) as refused:
        services.upload_datasets(ctx=ctx, paths=paths)
    message = str(refused.value)
    assert "2 of 3 files" in message
    assert "✅ good.jsonl is valid: 5 rows" in message
    assert "row 2, field 'instruction': must not be empty" in message
    assert "row 3, field 'output': must not be empty" in message
    assert "archive.jsonl" in message and "ZIP archive" in message
    assert_nothing_stored(ctx)


def test_names_that_look_like_paths_or_break_the_rule_are_refused(ctx: StudioContext, tmp_path: Path) -> None:
    path = write(tmp_path, "good.jsonl", GOOD)
    for name in ("../x", "a/b", "..", "C:\\temp"):
        with pytest.raises(ServiceError, match="looks like a file path"):
            services.upload_datasets(ctx=ctx, paths=[path], name=name)
    with pytest.raises(ServiceError, match="not allowed"):
        services.upload_datasets(ctx=ctx, paths=[path], name="has space")
    with pytest.raises(ServiceError, match="looks like a file path"):
        services.create_dataset(ctx=ctx, filename="good.jsonl", data=GOOD, name="../../etc")
    assert_nothing_stored(ctx)


def test_taken_names_and_clashing_files_refuse_the_batch(ctx: StudioContext, tmp_path: Path) -> None:
    services.upload_datasets(ctx=ctx, paths=[write(tmp_path, "good.jsonl", GOOD)])
    keys = ctx.store.list()
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ServiceError, match="a dataset named 'good' exists already"):
        services.upload_datasets(ctx=ctx, paths=[write(other, "good.csv", CSV)])
    with pytest.raises(ServiceError, match="two files would both be named 'twin'"):
        services.upload_datasets(ctx=ctx, paths=[write(tmp_path, "twin.jsonl", GOOD), write(other, "twin.csv", CSV)])
    with pytest.raises(ServiceError, match="choose one or more files"):
        services.upload_datasets(ctx=ctx, paths=[])
    assert services.dataset_names(ctx=ctx) == ["good"]
    assert ctx.store.list() == keys


# --- uploads that pass ------------------------------------------------------------------------------------------


def test_batch_of_formats_is_stored_under_generated_keys(ctx: StudioContext, tmp_path: Path) -> None:
    paths = [
        write(tmp_path, "My Tasks.jsonl", TASKED),
        write(tmp_path, "arith.csv", CSV),
        write(tmp_path, "table.parquet", parquet(GOOD_ROWS)),
    ]
    stored = services.upload_datasets(ctx=ctx, paths=[str(p) for p in paths])
    assert [(d.name, d.format, d.tasks, d.n_rows) for d in stored] == [
        ("My_Tasks", "jsonl", ["alpha", "beta"], 5),
        ("arith", "csv", ["arith"], 2),
        ("table", "parquet", ["table"], 5),
    ]
    keys = ctx.store.list()
    assert sorted(d.artifact_key for d in stored) == keys
    assert all(k.startswith("datasets/local/") and "Tasks" not in k and "arith" not in k for k in keys)
    assert ctx.store.get_bytes(stored[1].artifact_key) == CSV
    table = services.list_datasets(ctx=ctx)
    assert table["name"].tolist() == ["My_Tasks", "arith", "table"]
    assert table.loc[0, "tasks"] == "alpha, beta"


def test_a_typed_name_names_one_file_or_prefixes_several(ctx: StudioContext, tmp_path: Path) -> None:
    one = services.upload_datasets(ctx=ctx, paths=write(tmp_path, "x.jsonl", GOOD), name=" chosen ")
    assert [d.name for d in one] == ["chosen"]
    several = services.upload_datasets(
        ctx=ctx, paths=[write(tmp_path, "a.jsonl", GOOD), write(tmp_path, "b.csv", CSV)], name="set"
    )
    assert [d.name for d in several] == ["set-a", "set-b"]


def test_preview_shows_the_first_rows_and_chat_readably(ctx: StudioContext, tmp_path: Path) -> None:
    services.upload_datasets(
        ctx=ctx, paths=[write(tmp_path, "tasks.jsonl", TASKED), write(tmp_path, "chat.jsonl", CHAT)]
    )
    frame = services.preview_dataset(ctx=ctx, name="tasks", n=3)
    assert frame.columns.tolist() == ["row", "task", "instruction", "input", "output"]
    assert frame["instruction"].tolist() == ["say 0", "say 1", "say 2"]
    assert frame["task"].tolist() == ["beta", "alpha", "alpha"]
    chat = services.preview_dataset(ctx=ctx, name="chat")
    assert chat.loc[0, "instruction"] == "Be brief.\n\nHi"
    assert chat.loc[0, "output"] == "Hello"
    with pytest.raises(ServiceError, match="no dataset named 'nope'"):
        services.preview_dataset(ctx=ctx, name="nope")
    with pytest.raises(ServiceError, match="choose a dataset"):
        services.preview_dataset(ctx=ctx, name="")


def test_task_counts_for_the_bar_chart(ctx: StudioContext, tmp_path: Path) -> None:
    services.upload_datasets(ctx=ctx, paths=[write(tmp_path, "tasks.jsonl", TASKED)])
    services.upload_datasets(ctx=ctx, paths=[write(tmp_path, "gamma.jsonl", GOOD)])
    counts = services.task_counts(ctx=ctx, name="tasks")
    assert counts.to_dict("records") == [
        {"task": "alpha", "rows": 3, "dataset": "tasks"},
        {"task": "beta", "rows": 2, "dataset": "tasks"},
    ]
    every = services.task_counts(ctx=ctx, name="")  # nothing chosen: every dataset's tasks
    assert [(r["dataset"], r["task"]) for r in every.to_dict("records")] == [
        ("tasks", "alpha"),
        ("tasks", "beta"),
        ("gamma", "gamma"),
    ]


# --- rename and delete ------------------------------------------------------------------------------------------


def test_rename(ctx: StudioContext, tmp_path: Path) -> None:
    services.upload_datasets(ctx=ctx, paths=[write(tmp_path, "a.jsonl", GOOD), write(tmp_path, "b.jsonl", GOOD)])
    assert services.rename_dataset(ctx=ctx, name="a", new_name="alpha").name == "alpha"
    assert services.dataset_names(ctx=ctx) == ["alpha", "b"]
    with pytest.raises(ServiceError, match="a dataset named 'b' exists already"):
        services.rename_dataset(ctx=ctx, name="alpha", new_name="b")
    with pytest.raises(ServiceError, match="looks like a file path"):
        services.rename_dataset(ctx=ctx, name="alpha", new_name="../b")
    with pytest.raises(ServiceError, match="no dataset named 'a'"):
        services.rename_dataset(ctx=ctx, name="a", new_name="c")
    with pytest.raises(ServiceError, match="empty"):
        services.rename_dataset(ctx=ctx, name="alpha", new_name="  ")
    assert services.dataset_names(ctx=ctx) == ["alpha", "b"]
    assert services.preview_dataset(ctx=ctx, name="alpha").shape[0] == 5  # the file is still found under its key


def test_delete_removes_the_row_and_its_file(ctx: StudioContext, tmp_path: Path) -> None:
    kept, gone = services.upload_datasets(
        ctx=ctx, paths=[write(tmp_path, "kept.jsonl", GOOD), write(tmp_path, "gone.csv", CSV)]
    )
    assert services.delete_dataset(ctx=ctx, name="gone") == "gone"
    assert services.dataset_names(ctx=ctx) == ["kept"]
    assert ctx.store.list() == [kept.artifact_key]
    with pytest.raises(ServiceError, match="no dataset named 'gone'"):
        services.delete_dataset(ctx=ctx, name="gone")


def test_delete_is_refused_while_a_mixture_uses_the_dataset(ctx: StudioContext, tmp_path: Path) -> None:
    services.upload_datasets(ctx=ctx, paths=[write(tmp_path, "tasks.jsonl", TASKED)])
    spec = default_spec("builtin:tiny", ["alpha", "beta"]).model_dump(mode="json")
    for name in ("mix-one", "mix-two"):
        save_mixture(ctx=ctx, name=name, spec_json=spec, dataset_names=["tasks"])
    with pytest.raises(ServiceError, match="used by the mixtures 'mix-one', 'mix-two'"):
        services.delete_dataset(ctx=ctx, name="tasks")
    services.rename_dataset(ctx=ctx, name="tasks", new_name="renamed")  # mixtures follow the row, not the name
    with pytest.raises(ServiceError, match="used by the mixtures"):
        services.delete_dataset(ctx=ctx, name="renamed")
    assert services.dataset_names(ctx=ctx) == ["renamed"]
    assert len(ctx.store.list()) == 1
