"""Upload validation (every format, a corpus of broken files, fuzz), tokenisation, holdout split and task sampling."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import random
import zipfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerFast

from models.data import (
    TASK_NAME,
    DataValidationError,
    ExampleRow,
    TaskBatchSampler,
    ValidationIssue,
    collate,
    load_rows,
    render_prompt,
    split_holdout,
    task_name_from_filename,
    tokenize_example,
    validate_upload,
)

# --------------------------------------------------------------------------------------------------------------------
# Helpers


def jsonl(*records: object) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


def parquet(columns: dict[str, list[object]]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue()


def row(task: str, instruction: str, output: str, input: str = "") -> ExampleRow:
    return ExampleRow(task=task, instruction=instruction, input=input, output=output)


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with one token per byte, built here so no test downloads anything."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab |= {"<eos>": len(vocab), "<pad>": len(vocab) + 1, "<bos>": len(vocab) + 2}
    core = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>")


# --------------------------------------------------------------------------------------------------------------------
# Every accepted format


def test_jsonl_instruction_rows_with_a_task_column() -> None:
    data = jsonl(
        {"task": "math", "instruction": "Add", "input": "2 and 2", "output": "4"},
        {"task": "math", "instruction": "Double 3", "output": "6"},
        {"task": "poetry", "instruction": "A haiku", "input": None, "output": "old pond\nfrog"},
    )
    report = validate_upload(data, "train.jsonl")
    assert report.ok, report.issues
    assert report.format == "jsonl" and report.n_rows == 3
    assert report.rows == [
        row("math", "Add", "4", "2 and 2"),
        row("math", "Double 3", "6"),
        row("poetry", "A haiku", "old pond\nfrog"),
    ]
    assert report.task_counts == {"math": 2, "poetry": 1}
    assert "3 rows in 2 tasks" in report.summary()


def test_jsonl_chat_rows_map_system_and_user_into_the_instruction() -> None:
    second = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "there"}, CHAT[2] | {"content": "Yo"}]
    data = jsonl({"messages": CHAT}, {"messages": second}).replace(b"\n", b"\r\n") + b"\r\n"
    report = validate_upload(data, "chats.json", default_task="arith")
    assert report.ok, report.issues
    assert report.rows == [row("arith", "Be brief.\n\nWhat is 2+2?", "4"), row("arith", "Hi\n\nthere", "Yo")]
    assert report.task_counts == {"arith": 2}


def test_json_array_with_question_answer_aliases() -> None:
    data = json.dumps(
        [{"question": "Q1", "answer": "A1", "task": "qa"}, {"question": "Q2", "answer": "A2", "task": "qa"}]
    )
    report = validate_upload(data.encode(), "alpaca.json")
    assert report.ok, report.issues
    assert report.rows == [row("qa", "Q1", "A1"), row("qa", "Q2", "A2")]


def test_csv_with_bom_quotes_aliases_and_default_task() -> None:
    data = '\ufeffPrompt,Response,source\r\n"line one\nline two","with, comma",web\r\nplain,"said ""hi""",web\r\n'
    report = validate_upload(data.encode(), "uploads/My Set.csv", default_task="chatty")
    assert report.ok, report.issues
    assert report.format == "csv" and report.filename == "My Set.csv"
    assert report.rows == [row("chatty", "line one\nline two", "with, comma"), row("chatty", "plain", 'said "hi"')]
    assert report.ignored_columns == ["source"]
    assert "ignored columns: 'source'" in report.summary()


def test_csv_with_task_column_and_chat_messages_as_json_text() -> None:
    cell = json.dumps(CHAT).replace('"', '""')
    data = f'task,messages\nt1,"{cell}"\nt2,"{cell}"\n'.encode()
    report = validate_upload(data, "chat.csv")
    assert report.ok, report.issues
    assert [r.task for r in report.rows] == ["t1", "t2"]
    assert report.rows[0].instruction == "Be brief.\n\nWhat is 2+2?" and report.rows[0].output == "4"
    assert report.task_counts == {"t1": 1, "t2": 1}


def test_parquet_instruction_rows() -> None:
    data = parquet(
        {
            "task": ["a", "b", "b"],
            "instruction": ["i1", "i2", "i3"],
            "input": ["x", None, ""],
            "output": ["o1", "o2", "o3"],
            "__index_level_0__": [0, 1, 2],
        }
    )
    report = validate_upload(data, "d.parquet")
    assert report.ok, report.issues
    assert report.format == "parquet" and report.ignored_columns == []
    assert report.rows == [row("a", "i1", "o1", "x"), row("b", "i2", "o2"), row("b", "i3", "o3")]
    assert report.task_counts == {"a": 1, "b": 2}


def test_parquet_chat_rows_as_list_of_structs() -> None:
    data = parquet({"messages": [CHAT, CHAT[1:]]})
    report = validate_upload(data, "d.pq", default_task="chat")
    assert report.ok, report.issues
    assert report.rows == [row("chat", "Be brief.\n\nWhat is 2+2?", "4"), row("chat", "What is 2+2?", "4")]


def test_load_rows_returns_rows_or_raises_with_the_report() -> None:
    good = jsonl({"task": "t", "instruction": "i", "output": "o"})
    assert load_rows(good, "x.jsonl") == [row("t", "i", "o")]
    bad = jsonl({"task": "t", "instruction": "i", "output": " "}, {"task": "t", "instruction": "", "output": "o"})
    with pytest.raises(DataValidationError) as caught:
        load_rows(bad, "x.jsonl")
    assert caught.value.report.issue_count == 2
    assert "x.jsonl was refused: 2 problems" in str(caught.value)
    assert "row 1, field 'output': must not be empty" in str(caught.value)
    again = pickle.loads(pickle.dumps(caught.value))
    assert again.report.issue_count == 2 and str(again) == str(caught.value)


def test_only_the_first_issues_are_kept_and_the_rest_counted() -> None:
    data = jsonl(*({"task": "t", "instruction": f"i{n}", "output": ""} for n in range(30)))
    report = validate_upload(data, "x.jsonl")
    assert report.issue_count == 30 and len(report.issues) == 20
    assert [issue.row for issue in report.issues] == list(range(1, 21))


def test_validation_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    validate_upload(jsonl({"task": "t", "instruction": "i", "output": "o"}), "x.jsonl")
    validate_upload(parquet({"task": ["t"], "instruction": ["i"], "output": ["o"]}), "x.parquet")
    validate_upload(b"\x00garbage", "x.csv")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------------------------------
# A corpus of broken files: one specific message each


def _zip_bytes() -> bytes:
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w") as archive:
        archive.writestr("data.csv", "task,instruction,output\nt,i,o\n")
    return sink.getvalue()


GOOD = {"task": "t", "instruction": "i", "output": "o"}
PARQUET_GOOD = parquet({"task": ["t"], "instruction": ["i"], "output": ["o"]})

# (case id, data, filename, keyword arguments, substrings the one issue must contain)
BROKEN: list[tuple[str, bytes, str, dict[str, object], tuple[str, ...]]] = [
    ("empty", b"", "x.jsonl", {}, ("file is empty",)),
    ("whitespace only", b" \n\t\r\n  ", "x.csv", {}, ("only whitespace",)),
    ("unknown extension", b"a,b\n", "x.txt", {}, ("unsupported file type '.txt'",)),
    ("compressed", b"\x1f\x8b\x08\x00", "x.jsonl.gz", {}, ("compressed files (.gz) are not accepted",)),
    ("csv named parquet", b"task,instruction,output\nt,i,o\n", "x.parquet", {}, ("not a Parquet file", "text")),
    ("parquet named jsonl", PARQUET_GOOD, "x.jsonl", {}, ("binary file (looks like a Parquet file)",)),
    ("truncated parquet", PARQUET_GOOD[:-30], "x.parquet", {}, ("Parquet file is incomplete",)),
    ("zip named csv", _zip_bytes(), "x.csv", {}, ("binary file (looks like a ZIP archive)",)),
    (
        "png named jsonl",
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        "x.jsonl",
        {},
        ("binary file (looks like a PNG image)",),
    ),
    ("pdf named csv", b"%PDF-1.7\n%\xe2\xe3", "x.csv", {}, ("binary file (looks like a PDF document)",)),
    (
        "nul byte",
        b'{"task": "t", "instruction": "i\x00", "output": "o"}\n',
        "x.jsonl",
        {},
        ("NUL byte at byte offset 31",),
    ),
    ("utf-16", '{"task": "t"}\n'.encode("utf-16"), "x.jsonl", {}, ("UTF-16",)),
    (
        "latin-1",
        b"task,instruction,output\nt,caf\xe9,o\n",
        "x.csv",
        {},
        ("line 2 (byte offset 29)", "not valid UTF-8", "Latin-1"),
    ),
    ("control character", b"task,instruction,output\nt,a\x07b,o\n", "x.csv", {}, ("line 2, column 4", "U+0007")),
    (
        "escaped control character",
        jsonl({"task": "t", "instruction": "a\u0007b", "output": "o"}),
        "x.jsonl",
        {},
        ("row 1, field 'instruction': contains control character U+0007",),
    ),
    (
        "truncated last line",
        jsonl(GOOD, GOOD | {"output": "p"}) + b'{"task": "t", "instruction": "i", "outp',
        "x.jsonl",
        {},
        ("line 3: the last line is cut off", "truncated"),
    ),
    (
        "invalid json on line 3",
        jsonl(GOOD, GOOD | {"output": "p"})
        + b'{"task": "t" "instruction": "i", "output": "q"}\n'
        + jsonl(GOOD | {"output": "r"}),
        "x.jsonl",
        {},
        ("line 3, column 14: invalid JSON",),
    ),
    (
        "csv named jsonl",
        b"task,instruction,output\nt,i,o\n",
        "x.jsonl",
        {},
        ("line 1: does not look like JSON Lines",),
    ),
    ("pretty-printed object", json.dumps(GOOD, indent=2).encode(), "x.json", {}, ("one JSON object spread over",)),
    ("not an object", jsonl(GOOD, [1, 2]), "x.jsonl", {}, ("row 2: must be a JSON object {...}, got a list",)),
    (
        "duplicate key",
        b'{"task": "t", "instruction": "i", "output": "o", "output": "p"}\n',
        "x.jsonl",
        {},
        ("duplicate key 'output'",),
    ),
    (
        "number as text",
        jsonl(GOOD | {"output": 4}),
        "x.jsonl",
        {},
        ("row 1, field 'output': must be text, got a number",),
    ),
    (
        "missing field in a row",
        jsonl(GOOD, {"task": "t", "instruction": "j"}),
        "x.jsonl",
        {},
        ("row 2, field 'output': is missing",),
    ),
    (
        "missing output column",
        b"task,instruction,reply\nt,i,o\n",
        "x.csv",
        {},
        ("missing column 'output'", "found: task, instruction, reply"),
    ),
    ("no task and no default", b"instruction,output\ni,o\n", "x.csv", {}, ("no 'task' column and no default task",)),
    (
        "bad default task",
        b"instruction,output\ni,o\n",
        "x.csv",
        {"default_task": "my data"},
        ("default task 'my data'",),
    ),
    (
        "two instruction columns",
        b"task,prompt,instruction,output\nt,p,i,o\n",
        "x.csv",
        {},
        ("'instruction' and 'prompt' both",),
    ),
    (
        "empty output on row 2",
        b"task,instruction,output\nt,i,o\nt,j,  \n",
        "x.csv",
        {},
        ("row 2, field 'output': must not be empty",),
    ),
    (
        "task ../etc",
        jsonl(GOOD | {"task": "../etc"}),
        "x.jsonl",
        {},
        ("row 1, field 'task': '../etc' is not a valid task name",),
    ),
    ("task a/b", jsonl(GOOD | {"task": "a/b"}), "x.jsonl", {}, ("'a/b' is not a valid task name",)),
    ("task .hidden", jsonl(GOOD | {"task": ".hidden"}), "x.jsonl", {}, ("'.hidden' is not a valid task name",)),
    ("empty task", b"task,instruction,output\n,i,o\n", "x.csv", {}, ("row 1, field 'task': must not be empty",)),
    ("oversize", b"x" * 1300, "x.jsonl", {"max_bytes": 1000}, ("file is 1.3 KB; the limit is 1,000 bytes",)),
    (
        "too many jsonl rows",
        jsonl(*({"n": n} for n in range(4))),
        "x.jsonl",
        {"max_rows": 3},
        ("file has 4 rows; the limit is 3",),
    ),
    ("too many csv rows", b"a\n1\n2\n3\n4\n5\n", "x.csv", {"max_rows": 3}, ("file has 5 rows; the limit is 3",)),
    (
        "too many parquet rows",
        parquet({"a": [1, 2, 3, 4, 5, 6]}),
        "x.parquet",
        {"max_rows": 3},
        ("file has 6 rows; the limit is 3",),
    ),
    (
        "field too long",
        jsonl(GOOD | {"instruction": "y" * 101}),
        "x.jsonl",
        {"max_field_chars": 100},
        ("row 1, field 'instruction': is 101 characters; the limit is 100",),
    ),
    ("duplicate rows", jsonl(GOOD, GOOD | {"output": "p"}, GOOD), "x.jsonl", {}, ("row 3: exact duplicate of row 1",)),
    (
        "csv row width",
        b"task,instruction,output\nt,i,o\nt,j\n",
        "x.csv",
        {},
        ("row 2: has 2 values but the header has 3",),
    ),
    ("csv open quote", b'task,instruction,output\nt,"i,o\n', "x.csv", {}, ("line 2: a quoted field is never closed",)),
    (
        "csv runaway field",
        b"task,instruction,output\nt,i," + b"y" * (csv.field_size_limit() + 1) + b"\n",
        "x.csv",
        {},
        ("line 2: a field is longer than the CSV reader's limit",),
    ),
    ("csv header only", b"task,instruction,output\n", "x.csv", {}, ("header but no data rows",)),
    ("csv duplicate header", b"task,output,Output\nt,o,p\n", "x.csv", {}, ("column 'Output' appears twice",)),
    (
        "semicolons",
        b"task;instruction;output\nt;i;o\n",
        "x.csv",
        {},
        ("holding semicolons; the file must be comma-separated",),
    ),
    (
        "parquet wrong type",
        parquet({"task": ["t"], "instruction": ["i"], "output": [4]}),
        "x.pq",
        {},
        ("column 'output' has type int64",),
    ),
    (
        "chat without assistant",
        jsonl({"task": "t", "messages": CHAT[:2]}),
        "x.jsonl",
        {},
        ("row 1, field 'messages': has no assistant message",),
    ),
    (
        "multi-turn chat",
        jsonl({"task": "t", "messages": CHAT + CHAT[1:]}),
        "x.jsonl",
        {},
        ("has 2 assistant messages",),
    ),
    (
        "chat ends with user",
        jsonl({"task": "t", "messages": CHAT + CHAT[1:2]}),
        "x.jsonl",
        {},
        ("messages after the assistant",),
    ),
    (
        "chat bad role",
        jsonl({"task": "t", "messages": [{"role": "tool", "content": "x"}]}),
        "x.jsonl",
        {},
        ("role 'tool'",),
    ),
    (
        "chat json text",
        b'task,messages\nt,"[{""role"": ""user"""\n',
        "x.csv",
        {},
        ("field 'messages': is not valid JSON",),
    ),
    (
        "chat and instruction",
        jsonl(GOOD | {"messages": CHAT}),
        "x.jsonl",
        {},
        ("a 'messages' column and instruction-style",),
    ),
]


@pytest.mark.parametrize(
    ("data", "filename", "kwargs", "expected"), [case[1:] for case in BROKEN], ids=[c[0] for c in BROKEN]
)
def test_each_broken_file_gets_its_own_specific_message(
    data: bytes, filename: str, kwargs: dict[str, object], expected: tuple[str, ...]
) -> None:
    report = validate_upload(data, filename, **kwargs)  # type: ignore[arg-type]
    assert not report.ok and report.issue_count == 1, [str(issue) for issue in report.issues]
    for part in expected:
        assert part in str(report.issues[0])
    with pytest.raises(DataValidationError):
        load_rows(data, filename, **kwargs)  # type: ignore[arg-type]


def test_the_corpus_messages_are_all_different() -> None:
    messages = [str(validate_upload(data, name, **kwargs).issues[0]) for _, data, name, kwargs, _ in BROKEN]  # type: ignore[arg-type]
    assert len(set(messages)) == len(messages)


def test_a_large_file_reports_its_size_in_megabytes() -> None:
    report = validate_upload(b" " * int(61.2 * (1 << 20)), "big.jsonl")
    assert [str(issue) for issue in report.issues] == ["file is 61.2 MB; the limit is 50 MB"]


def _check_report_shape(data: bytes, filename: str) -> None:
    report = validate_upload(data, filename)
    assert report.ok == (report.issue_count == 0)
    assert len(report.issues) == min(report.issue_count, 20)
    assert all(isinstance(issue, ValidationIssue) and issue.message for issue in report.issues)
    if report.ok:
        assert report.rows and sum(report.task_counts.values()) == len(report.rows)
    str(report.summary())


def test_random_bytes_and_truncated_files_only_ever_give_reports() -> None:
    rng = random.Random(1234)
    names = ["f.jsonl", "f.json", "f.csv", "f.parquet", "f.pq"]
    for n in range(200):
        size = rng.choice([1, 3, 8, 64, 512, 4096])
        blob = bytes(rng.getrandbits(8) for _ in range(size))
        report = validate_upload(blob, names[n % len(names)])
        assert not report.ok and report.issues
    # Text made of JSON and CSV punctuation gets past the encoding checks and into the parsers.
    for n in range(200):
        start = rng.choice(["", '{"', '[{"', "task,instruction,output\n"])
        text = start + "".join(
            rng.choice('{}[]",:\n\\ ab0-task\ninstruction,output') for _ in range(rng.randint(1, 200))
        )
        _check_report_shape(text.encode(), names[n % 3])
    valid = {
        "f.jsonl": jsonl(*({"task": "t", "instruction": f"i{n}", "output": "é o"} for n in range(5))),
        "f.json": json.dumps([{"task": "t", "instruction": f"i{n}", "output": "o"} for n in range(5)]).encode(),
        "f.csv": ("task,instruction,output\n" + "".join(f't,"i\n{n}",ö\n' for n in range(5))).encode(),
        "f.parquet": parquet({"task": ["t"] * 5, "instruction": [f"i{n}" for n in range(5)], "output": ["o"] * 5}),
    }
    for name, data in valid.items():
        assert validate_upload(data, name).ok
        for cut in range(1, len(data), max(1, len(data) // 60)):
            _check_report_shape(data[:cut], name)
    parquet_data = valid["f.parquet"]
    for _ in range(60):  # damage the inside of a Parquet file, keeping its magic bytes
        damaged = bytearray(parquet_data)
        for _ in range(rng.randint(1, 8)):
            damaged[rng.randrange(4, len(damaged) - 4)] = rng.getrandbits(8)
        _check_report_shape(bytes(damaged), "f.parquet")


# --------------------------------------------------------------------------------------------------------------------
# Rows and task names


def test_example_row_is_strict() -> None:
    with pytest.raises(ValueError):
        ExampleRow(task="t", instruction="i", output="o", extra="x")  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        ExampleRow(task="t", instruction="i", output=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ExampleRow(task="t\n", instruction="i", output="o")
    example = row("t", "i", "o")
    with pytest.raises(ValueError):
        example.task = "u"  # type: ignore[misc]
    assert example == row("t", "i", "o") and hash(example) == hash(row("t", "i", "o"))


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "-a", "a b", "x" * 65, "é"])
def test_path_like_task_names_are_refused(name: str) -> None:
    assert not TASK_NAME.fullmatch(name)
    with pytest.raises(ValueError):
        row(name, "i", "o")


def test_task_name_from_filename() -> None:
    assert task_name_from_filename("C:\\data\\My data (2).csv") == "My_data_2"
    assert task_name_from_filename("../../etc/passwd") == "passwd"
    assert task_name_from_filename("...csv") == "task"
    assert TASK_NAME.fullmatch(task_name_from_filename("-" + "x" * 100 + ".jsonl"))


def test_issue_reads_as_row_field_message() -> None:
    assert str(ValidationIssue(12, "output", "must not be empty")) == "row 12, field 'output': must not be empty"
    assert str(ValidationIssue(3, None, "exact duplicate of row 1")) == "row 3: exact duplicate of row 1"
    assert str(ValidationIssue(None, None, "file is empty")) == "file is empty"


# --------------------------------------------------------------------------------------------------------------------
# Prompts and tokens


def test_plain_prompt_with_and_without_input() -> None:
    assert (
        render_prompt(row("t", "Add", "4", "2, 2")) == "### Instruction:\nAdd\n\n### Input:\n2, 2\n\n### Response:\n"
    )
    assert render_prompt(row("t", "Add", "4")) == "### Instruction:\nAdd\n\n### Response:\n"


def test_chat_template_prompt(tokenizer: PreTrainedTokenizerFast) -> None:
    templated = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<eos>")
    templated.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert render_prompt(row("t", "Add", "4", "2, 2"), templated) == "<|user|>Add\n\n2, 2\n<|assistant|>"
    out = tokenize_example(row("t", "Add", "4"), templated)
    prompt_len = len("<|user|>Add\n<|assistant|>")
    assert out["labels"][:prompt_len] == [-100] * prompt_len
    assert templated.decode(out["labels"][prompt_len:]) == "4<eos>"


def test_labels_mask_exactly_the_prompt(tokenizer: PreTrainedTokenizerFast) -> None:
    example = row("t", "Say hi", "héllo there", "politely")
    out = tokenize_example(example, tokenizer)
    prompt_len = len(tokenizer(render_prompt(example), add_special_tokens=False)["input_ids"])
    assert len(out["input_ids"]) == len(out["labels"]) == len(out["attention_mask"])
    assert out["labels"][:prompt_len] == [-100] * prompt_len
    assert -100 not in out["labels"][prompt_len:]
    assert out["labels"][prompt_len:] == out["input_ids"][prompt_len:]
    assert tokenizer.decode(out["labels"][prompt_len:]) == "héllo there<eos>"
    assert tokenizer.decode(out["input_ids"]) == render_prompt(example) + "héllo there<eos>"
    assert out["attention_mask"] == [1] * len(out["input_ids"])


def test_bos_starts_a_plain_prompt_when_the_tokenizer_has_one(tokenizer: PreTrainedTokenizerFast) -> None:
    with_bos = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, eos_token="<eos>", bos_token="<bos>"
    )
    out = tokenize_example(row("t", "i", "o"), with_bos)
    assert out["input_ids"][0] == with_bos.bos_token_id and out["labels"][0] == -100
    assert with_bos.decode(out["labels"][out["labels"].count(-100) :]) == "o<eos>"


def test_a_long_prompt_is_cut_from_the_left_keeping_the_whole_answer(tokenizer: PreTrainedTokenizerFast) -> None:
    out = tokenize_example(row("t", "start " + "x" * 300, "the answer"), tokenizer, max_length=64)
    assert len(out["input_ids"]) == 64
    masked = out["labels"].count(-100)
    assert tokenizer.decode(out["labels"][masked:]) == "the answer<eos>"
    assert tokenizer.decode(out["input_ids"][:masked]).endswith("x\n\n### Response:\n")
    assert "start" not in tokenizer.decode(out["input_ids"])


def test_a_too_long_answer_is_cut_without_eos(tokenizer: PreTrainedTokenizerFast) -> None:
    out = tokenize_example(row("t", "i", "abcdefghij" * 10), tokenizer, max_length=40)
    assert len(out["input_ids"]) == 40
    assert out["labels"].count(-100) == 10  # the last max_length // 4 prompt tokens
    assert tokenizer.eos_token_id not in out["labels"]
    assert tokenizer.decode(out["labels"][10:]) == ("abcdefghij" * 10)[:30]


def test_collate_pads_right_with_masks_and_task_ids(tokenizer: PreTrainedTokenizerFast) -> None:
    a = tokenize_example(row("t", "i", "long answer"), tokenizer)
    b = tokenize_example(row("t", "i", "o"), tokenizer)
    batch = collate([a, b], pad_id=tokenizer.pad_token_id, task_ids=[0, 3])
    width = len(a["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    short = len(b["input_ids"])
    assert batch["input_ids"][1, short:].tolist() == [tokenizer.pad_token_id] * (width - short)
    assert batch["labels"][1, short:].tolist() == [-100] * (width - short)
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (width - short)
    assert batch["labels"][0].tolist() == a["labels"]
    assert batch["task_ids"].tolist() == [0, 3] and batch["task_ids"].dtype.is_floating_point is False
    assert "task_ids" not in collate([a], pad_id=0)
    with pytest.raises(ValueError):
        collate([a, b], pad_id=0, task_ids=[1])


# --------------------------------------------------------------------------------------------------------------------
# Holdout split


def _rows(counts: dict[str, int]) -> list[ExampleRow]:
    return [row(task, f"{task} {n}", "o") for task, count in counts.items() for n in range(count)]


def test_holdout_is_per_task_deterministic_and_disjoint() -> None:
    rows = _rows({"big": 100, "mid": 15, "small": 2, "single": 1})
    train, holdout = split_holdout(rows, fraction=0.1, seed=7)
    assert split_holdout(rows, fraction=0.1, seed=7) == (train, holdout)
    assert set(train).isdisjoint(holdout) and len(train) + len(holdout) == len(rows)
    held = Counter(r.task for r in holdout)
    assert held == {"big": 10, "mid": 2, "small": 1}  # 15 * 0.1 rounds half up; a single row stays for training
    assert Counter(r.task for r in train) == {"big": 90, "mid": 13, "small": 1, "single": 1}
    assert train == [r for r in rows if r in set(train)]  # original order kept
    assert split_holdout(rows, fraction=0.1, seed=8)[1] != holdout


def test_holdout_min_per_task_and_independence_from_other_tasks() -> None:
    rows = _rows({"b": 5, "a": 20})
    _, holdout = split_holdout(rows, fraction=0.05, min_per_task=3)
    assert Counter(r.task for r in holdout) == {"a": 3, "b": 3}
    alone = split_holdout(_rows({"a": 20}), fraction=0.05, min_per_task=3)[1]
    assert [r for r in holdout if r.task == "a"] == alone
    with pytest.raises(ValueError):
        split_holdout(rows, fraction=1.0)


# --------------------------------------------------------------------------------------------------------------------
# Task-aware sampling

IMBALANCED = ["a"] * 10 + ["b"] * 90 + ["c"] * 900


def _task_frequencies(sampler: TaskBatchSampler, batches: int) -> dict[str, float]:
    counts: Counter[str] = Counter()
    for _ in range(batches):
        counts.update(IMBALANCED[i] for i in sampler.next_batch())
    total = sum(counts.values())
    return {task: counts[task] / total for task in "abc"}


def test_uniform_weighting_evens_out_imbalanced_tasks() -> None:
    freq = _task_frequencies(TaskBatchSampler(IMBALANCED, batch_size=8, weighting="uniform", seed=1), 1500)
    assert all(abs(f - 1 / 3) < 0.02 for f in freq.values()), freq


def test_proportional_weighting_follows_row_counts() -> None:
    freq = _task_frequencies(TaskBatchSampler(IMBALANCED, batch_size=8, weighting="proportional", seed=1), 1500)
    assert abs(freq["a"] - 0.01) < 0.005 and abs(freq["b"] - 0.09) < 0.015 and abs(freq["c"] - 0.9) < 0.015, freq


def test_temperature_weighting_lies_in_between() -> None:
    sampler = TaskBatchSampler(IMBALANCED, batch_size=8, weighting="temperature", temperature=2.0, seed=1)
    expected = {t: n**0.5 for t, n in {"a": 10, "b": 90, "c": 900}.items()}
    expected = {t: w / sum(expected.values()) for t, w in expected.items()}
    assert sampler.probabilities == pytest.approx(expected)
    freq = _task_frequencies(sampler, 1500)
    assert all(abs(freq[t] - expected[t]) < 0.02 for t in "abc"), freq
    assert 0.01 < freq["a"] < 1 / 3 and 1 / 3 < freq["c"] < 0.9


def test_every_example_of_a_task_comes_before_any_repeat() -> None:
    tasks = ["x"] * 7 + ["y"] * 13
    sampler = TaskBatchSampler(tasks, batch_size=5, seed=3)
    seen: dict[str, list[int]] = {"x": [], "y": []}
    for _ in range(40):
        for index in sampler.next_batch():
            seen[tasks[index]].append(index)
    for task, indices in seen.items():
        members = sorted(i for i, t in enumerate(tasks) if t == task)
        size = len(members)
        full = len(indices) // size
        assert full >= 2
        for epoch in range(full):
            assert sorted(indices[epoch * size : (epoch + 1) * size]) == members
        assert indices[:size] != indices[size : 2 * size]  # reshuffled each pass


def test_state_dict_resumes_exactly() -> None:
    reference = TaskBatchSampler(IMBALANCED, batch_size=6, weighting="temperature", seed=9)
    interrupted = TaskBatchSampler(IMBALANCED, batch_size=6, weighting="temperature", seed=9)
    for sampler in (reference, interrupted):
        for _ in range(37):
            sampler.next_batch()
        sampler.set_probabilities({"a": 0.5, "b": 0.3, "c": 0.2})
        for _ in range(5):
            sampler.next_batch()
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = TaskBatchSampler(IMBALANCED, batch_size=6, weighting="temperature", seed=9)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(200)] == [reference.next_batch() for _ in range(200)]
    fresh = TaskBatchSampler(IMBALANCED, batch_size=6, weighting="temperature", seed=9)
    assert [fresh.next_batch() for _ in range(3)] != [reference.next_batch() for _ in range(3)]


def test_state_from_other_examples_or_settings_is_refused() -> None:
    state = TaskBatchSampler(IMBALANCED, batch_size=4).state_dict()
    with pytest.raises(ValueError, match="fingerprint"):
        TaskBatchSampler(IMBALANCED[:-1], batch_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        TaskBatchSampler(IMBALANCED, batch_size=5).load_state_dict(state)


def test_set_probabilities_is_honoured() -> None:
    sampler = TaskBatchSampler(IMBALANCED, batch_size=10, seed=2)
    sampler.set_probabilities({"a": 3.0, "c": 1.0})
    freq = _task_frequencies(sampler, 600)
    assert freq["b"] == 0 and abs(freq["a"] - 0.75) < 0.03, freq
    with pytest.raises(ValueError):
        sampler.set_probabilities({"zzz": 1.0})
    with pytest.raises(ValueError):
        sampler.set_probabilities({"a": 0.0})


def test_only_tasks_restricts_sampling() -> None:
    sampler = TaskBatchSampler(IMBALANCED, batch_size=16, only_tasks=["b"])
    batches = [sampler.next_batch() for _ in range(10)]
    assert {IMBALANCED[i] for batch in batches for i in batch} == {"b"}
    assert all(len(batch) == 16 for batch in batches)
    iterator = iter(sampler)
    assert len(next(iterator)) == 16
    with pytest.raises(ValueError):
        TaskBatchSampler(IMBALANCED, batch_size=4, only_tasks=["nope"])
