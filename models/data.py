"""Training data: validate an uploaded file into clean rows, render prompts, tokenise, split and sample by task.

Uploads go through our own parser before anything else sees them, because the errors of ``datasets`` and pyarrow
are cryptic (RELIABILITY §7). Every problem becomes a ``ValidationIssue`` that names the line or row and the field; a
file with any issue is refused whole, and nothing in this module writes anywhere.

Accepted files: JSON Lines (``.jsonl`` / ``.json``, one object per line, or one JSON array of objects), CSV (``.csv``,
comma-separated, with a header) and Parquet (``.parquet`` / ``.pq``). A row is either

* instruction style: ``instruction`` (alias ``prompt`` or ``question``), optional ``input``, ``output`` (alias
  ``response`` or ``answer``); or
* chat style: ``messages``, a list of ``{role, content}`` with roles system / user / assistant (a JSON string in CSV).
  Only single-turn chats are accepted — system message(s), user message(s), then one assistant answer, which must be
  last. The answer becomes ``output``; the system and user contents, joined by blank lines, become ``instruction``.
  Longer conversations are refused rather than silently cut, so the user decides how to split them.

A ``task`` column names each row's task; without one every row gets ``default_task``. Column names are matched
case-insensitively. Other columns (ids, sources, pandas' index) are ignored; they are listed in
``ValidationReport.ignored_columns`` and in the summary so a misspelt column does not go unnoticed.

torch and transformers are imported only where tensors or tokenizers are needed, so validating an upload in the web
process stays cheap.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_ISSUES_KEPT = 20
IGNORE_INDEX = -100
WEIGHTINGS = ("uniform", "proportional", "temperature")

_TASK_RULE = "use 1-64 letters, digits, '_' or '-', starting with a letter or digit"
_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_UTF8_BOM = b"\xef\xbb\xbf"
# Characters refused anywhere in text: C0 and C1 controls except tab, newline and carriage return. In a field we also
# refuse lone UTF-16 surrogates (possible through JSON's \ud800 escapes), which cannot be encoded for the tokenizer.
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_FIELD_BAD = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
# Magic numbers of files people upload by mistake (an .xlsx is a ZIP archive, an old .xls an OLE2 document).
_MAGIC = (
    (b"PAR1", "a Parquet file"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"PK\x05\x06", "a ZIP archive"),
    (b"PK\x07\x08", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"\x28\xb5\x2f\xfd", "a zstd archive"),
    (b"%PDF", "a PDF document"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"\x7fELF", "an ELF executable"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "a Microsoft Office document (e.g. an old .xls)"),
    (b"SQLite format 3\x00", "an SQLite database"),
)
_INSTRUCTION_COLUMNS = ("instruction", "prompt", "question")
_OUTPUT_COLUMNS = ("output", "response", "answer")
_CHAT_ROLES = ("system", "user", "assistant")


# --------------------------------------------------------------------------------------------------------------------
# Rows, issues, reports


class ExampleRow(BaseModel):
    """One training example. Strict: text only, no unknown fields, no blank instruction or answer, no controls."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    task: str
    instruction: str
    input: str = ""
    output: str

    @field_validator("task")
    @classmethod
    def _task_name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        if not TASK_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid task name; {_TASK_RULE}")
        return value

    @field_validator("instruction", "output")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("instruction", "input", "output")
    @classmethod
    def _plain_text(cls, value: str) -> str:
        bad = _FIELD_BAD.search(value)
        if bad:
            code = ord(bad.group())
            what = "an unpaired UTF-16 surrogate" if 0xD800 <= code <= 0xDFFF else "control character"
            raise ValueError(f"contains {what} U+{code:04X} at character {bad.start() + 1:,}")
        return value


@dataclass(frozen=True)
class ValidationIssue:
    """One problem. ``row`` is the 1-based line (JSONL) or data row (CSV, Parquet); None for problems of the whole
    file or of its text (encoding, JSON or CSV syntax), whose message names the line instead."""

    row: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row:,}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


@dataclass
class ValidationReport:
    """What an upload holds. Usable only when ``ok``; ``rows`` then holds every example, else those that passed."""

    format: str
    rows: list[ExampleRow]
    issues: list[ValidationIssue]
    issue_count: int
    task_counts: dict[str, int]
    n_rows: int
    filename: str = ""
    ignored_columns: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.issue_count == 0

    def dataset_fields(self) -> dict[str, Any]:
        """What a registry ``Dataset`` row records of a valid upload: format, tasks, rows per task, rows."""
        return {
            "format": self.format,
            "tasks": sorted(self.task_counts),
            "task_counts": dict(self.task_counts),
            "n_rows": self.n_rows,
        }

    def summary(self) -> str:
        """One line for a person: what was found, or how many problems and the first of them."""
        name = self.filename or "the file"
        if not self.ok:
            noun = "problem" if self.issue_count == 1 else "problems"
            first = f"; first: {self.issues[0]}" if self.issues else ""
            return f"{name} was refused: {self.issue_count:,} {noun}{first}"
        tasks = ", ".join(f"{task}: {count:,}" for task, count in list(self.task_counts.items())[:10])
        if len(self.task_counts) > 10:
            tasks += ", …"
        rows = "row" if self.n_rows == 1 else "rows"
        noun = "task" if len(self.task_counts) == 1 else "tasks"
        line = f"{name} is valid: {self.n_rows:,} {rows} in {len(self.task_counts)} {noun} ({tasks})"
        if self.ignored_columns:
            line += "; ignored columns: " + ", ".join(repr(c) for c in self.ignored_columns)
        return line


class DataValidationError(ValueError):
    """An upload that did not pass; ``report`` holds every detail."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        lines = [report.summary(), *(f"- {issue}" for issue in report.issues[:10])]
        if report.issue_count > min(len(report.issues), 10):
            lines.append(f"- … and {report.issue_count - min(len(report.issues), 10):,} more")
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.report,))  # pickles with its report (e.g. across a task queue)


# --------------------------------------------------------------------------------------------------------------------
# Validation


@dataclass
class _Parsed:
    """Records of one file before the schema check: (row number, {normalised column: value})."""

    n_rows: int
    records: list[tuple[int, dict[str, Any]]]
    columns: dict[str, str]  # normalised name -> name as written in the file


@dataclass
class _Shape:
    chat: bool
    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    task: str | None = None


class _Issues:
    """Collects issues; ``skipped`` counts those not worth building one by one (e.g. the 10,000th control char)."""

    def __init__(self) -> None:
        self.items: list[ValidationIssue] = []
        self.skipped = 0

    def add(self, message: str, row: int | None = None, field: str | None = None) -> None:
        self.items.append(ValidationIssue(row, field, message))

    def __len__(self) -> int:
        return len(self.items) + self.skipped


def validate_upload(
    data: bytes,
    filename: str,
    *,
    default_task: str | None = None,
    max_bytes: int = 50 << 20,
    max_rows: int = 200_000,
    max_field_chars: int = 20_000,
) -> ValidationReport:
    """Check an uploaded file completely and say what is wrong with it, row by row; never raises for bad content.

    Checks run in order — size, type, encoding, structure, schema, duplicates — and a failure of the whole file
    (wrong type, bad encoding, missing columns) stops before per-row checks, which would only repeat it.
    """
    data = bytes(data)
    name = re.split(r"[\\/]", filename)[-1] if filename else ""
    suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    fmt = _FORMATS.get(suffix, "unknown")
    issues = _Issues()
    report = ValidationReport(fmt, [], [], 0, {}, 0, filename=name)

    parsed = _read(data, name, suffix, fmt, max_bytes, max_rows, issues)
    if parsed is not None:
        report.n_rows = parsed.n_rows
    # With no record parsed and issues already found, checking the columns would only add noise.
    if parsed is not None and (parsed.records or not len(issues)):
        shape = _resolve_shape(parsed, default_task, issues)
        if shape is not None:
            used = {c for c in (shape.instruction, shape.input, shape.output, shape.task) if c}
            used |= {"messages"} if shape.chat else set()
            report.ignored_columns = [
                written
                for normal, written in parsed.columns.items()
                if normal not in used and not normal.startswith("__index_level_")
            ]
            report.rows = _build_rows(parsed, shape, default_task, max_field_chars, issues)
            counts: dict[str, int] = {}
            for row in report.rows:
                counts[row.task] = counts.get(row.task, 0) + 1
            report.task_counts = dict(sorted(counts.items()))

    ordered = sorted(issues.items, key=lambda issue: (issue.row is not None, issue.row or 0))
    report.issues = ordered[:MAX_ISSUES_KEPT]
    report.issue_count = len(issues)
    return report


def load_rows(
    data: bytes,
    filename: str,
    *,
    default_task: str | None = None,
    max_bytes: int = 50 << 20,
    max_rows: int = 200_000,
    max_field_chars: int = 20_000,
) -> list[ExampleRow]:
    """The rows of a valid upload; raises ``DataValidationError`` (carrying the report) for anything else."""
    report = validate_upload(
        data,
        filename,
        default_task=default_task,
        max_bytes=max_bytes,
        max_rows=max_rows,
        max_field_chars=max_field_chars,
    )
    if not report.ok:
        raise DataValidationError(report)
    return report.rows


def task_name_from_filename(filename: str) -> str:
    """A valid task name made from a file's stem ('My data (2).csv' -> 'My_data_2'), for use as ``default_task``."""
    stem = re.split(r"[\\/]", filename)[-1].rsplit(".", 1)[0]
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-")[:64].rstrip("_-")
    return name or "task"


def _size(n: int) -> str:
    if n < 1 << 10:
        return f"{n:,} bytes"
    value, unit = (n / (1 << 20), "MB") if n >= 1 << 20 else (n / (1 << 10), "KB")
    return f"{value:.1f}".removesuffix(".0") + f" {unit}"


def _magic(data: bytes) -> str | None:
    return next((label for prefix, label in _MAGIC if data.startswith(prefix)), None)


def _read(
    data: bytes, name: str, suffix: str, fmt: str, max_bytes: int, max_rows: int, issues: _Issues
) -> _Parsed | None:
    """Size, type, encoding and structure checks; the parsed records, or None after a problem of the whole file."""
    if len(data) > max_bytes:
        issues.add(f"file is {_size(len(data))}; the limit is {_size(max_bytes)}")
        return None
    if not data:
        issues.add("file is empty (0 bytes)")
        return None
    if fmt == "unknown":
        if suffix in (".gz", ".zip", ".bz2", ".xz", ".zst", ".7z", ".tar"):
            issues.add(f"compressed files ({suffix}) are not accepted; upload the .jsonl, .csv or .parquet inside")
        else:
            kind = f"file type {suffix!r}" if suffix else f"file name {name!r} without an extension"
            issues.add(f"unsupported {kind}; upload .jsonl, .json, .csv, .parquet or .pq")
        return None
    if fmt == "parquet":
        return _read_parquet(data, max_bytes, max_rows, issues)

    text = _decode_text(data, issues)
    if text is None:
        return None
    if fmt == "jsonl":
        return _read_json(text, max_rows, issues)
    return _read_csv(text, max_rows, issues)


def _decode_text(data: bytes, issues: _Issues) -> str | None:
    """Strict UTF-8 (a BOM allowed), no NUL or other control characters, not only whitespace."""
    label = _magic(data)
    if label == "a Parquet file":
        issues.add("binary file (looks like a Parquet file); give it a .parquet name")
        return None
    if label:
        issues.add(f"binary file (looks like {label}); upload JSON Lines, CSV or Parquet")
        return None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        issues.add("file is UTF-16 or UTF-32 encoded; save it as UTF-8")
        return None
    nul = data.find(b"\x00")
    if nul >= 0:
        issues.add(f"binary file (contains a NUL byte at byte offset {nul:,}); upload JSON Lines, CSV or Parquet")
        return None
    skip = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        text = data[skip:].decode("utf-8", errors="strict")
    except UnicodeDecodeError as error:
        offset = skip + error.start
        line = data.count(b"\n", 0, offset) + 1
        if error.end >= len(data) - skip and error.reason == "unexpected end of data":
            issues.add(f"line {line:,} (byte offset {offset:,}): the file ends inside a UTF-8 character (truncated?)")
            return None
        hint = ""
        try:
            data[skip:].decode("cp1252")
            hint = " (it looks like Latin-1 / Windows-1252 text)"
        except UnicodeDecodeError:
            pass
        byte = data[offset]
        issues.add(
            f"line {line:,} (byte offset {offset:,}): byte 0x{byte:02x} is not valid UTF-8; save as UTF-8{hint}"
        )
        return None
    controls = _TEXT_CONTROL.finditer(text)
    for match in controls:
        if len(issues.items) >= MAX_ISSUES_KEPT:
            issues.skipped += 1 + sum(1 for _ in controls)
            break
        pos = match.start()
        line = text.count("\n", 0, pos) + 1
        column = pos - text.rfind("\n", 0, pos)
        issues.add(
            f"line {line:,}, column {column:,}: control character U+{ord(match.group()):04X} is not allowed "
            "(only tab, newline and carriage return are)"
        )
    if len(issues):
        return None
    if not text.strip():
        issues.add("file holds only whitespace; there are no rows")
        return None
    return text


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(f"duplicate key {key!r} in a JSON object")
        result[key] = value
    return result


def _looks_cut_off(text: str, error: json.JSONDecodeError) -> bool:
    """True when the JSON parser ran out of input, as it does on a truncated upload."""
    rest = text[error.pos :].strip()
    if error.pos >= len(text.rstrip()) or error.msg.startswith("Unterminated string"):
        return True
    return bool(rest) and any(word.startswith(rest) for word in ("true", "false", "null"))


def _read_json(text: str, max_rows: int, issues: _Issues) -> _Parsed | None:
    """JSON Lines parsed line by line (a whole-file JSON array of objects is also accepted)."""
    body = text.lstrip()
    first_line = text[: len(text) - len(body)].count("\n") + 1
    if body[0] == "[":
        return _read_json_array(text, max_rows, issues)
    if body[0] != "{":
        start = body.split("\n", 1)[0][:40]
        issues.add(
            f"line {first_line:,}: does not look like JSON Lines (it starts with {start!r}); "
            "each line must hold one JSON object {...}"
        )
        return None

    lines = text.split("\n")
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    if len(numbered) > max_rows:
        issues.add(f"file has {len(numbered):,} rows; the limit is {max_rows:,}")
        return None
    last = numbered[-1][0]
    truncated_end = not text.endswith("\n")
    parsed = _Parsed(n_rows=len(numbered), records=[], columns={})
    syntax_errors = 0
    for number, line in numbered:
        try:
            value = json.loads(line, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as error:
            syntax_errors += 1
            if number == last and truncated_end and _looks_cut_off(line, error):
                issues.add(f"line {number:,}: the last line is cut off ({error.msg}); the file looks truncated")
            else:
                issues.add(f"line {number:,}, column {error.colno:,}: invalid JSON ({error.msg})")
            continue
        except RecursionError:
            syntax_errors += 1
            issues.add(f"line {number:,}: JSON nested too deeply")
            continue
        except ValueError as error:  # duplicate keys, integers too long to convert
            syntax_errors += 1
            issues.add(f"line {number:,}: {error}")
            continue
        _add_record(parsed, number, value, issues)

    if syntax_errors and not parsed.records and len(numbered) > 1:
        # One object pretty-printed over many lines: say so once instead of one error per line.
        try:
            whole = json.loads(text)
        except (ValueError, RecursionError):
            whole = None
        if isinstance(whole, dict):
            issues.items = [
                ValidationIssue(
                    None, None, "the file is one JSON object spread over several lines; put one object on each line"
                )
            ]
            return None
    return parsed


def _read_json_array(text: str, max_rows: int, issues: _Issues) -> _Parsed | None:
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as error:
        cut = " (the file looks truncated)" if _looks_cut_off(text, error) else ""
        issues.add(f"line {error.lineno:,}, column {error.colno:,}: invalid JSON ({error.msg}){cut}")
        return None
    except RecursionError:
        issues.add("JSON nested too deeply")
        return None
    except ValueError as error:
        issues.add(f"invalid JSON: {error}")
        return None
    if not isinstance(value, list):
        issues.add(f"expected JSON Lines or a JSON array of objects, got {_kind(value)}")
        return None
    if len(value) > max_rows:
        issues.add(f"file has {len(value):,} rows; the limit is {max_rows:,}")
        return None
    parsed = _Parsed(n_rows=len(value), records=[], columns={})
    for number, item in enumerate(value, 1):
        _add_record(parsed, number, item, issues)
    if not value:
        issues.add("the JSON array is empty; there are no rows")
        return None
    return parsed


def _add_record(parsed: _Parsed, number: int, value: Any, issues: _Issues) -> None:
    """Keep one JSON object as a record, its keys normalised; note the column names it brings."""
    if not isinstance(value, dict):
        issues.add(f"must be a JSON object {{...}}, got {_kind(value)}", row=number)
        return
    record: dict[str, Any] = {}
    for key, item in value.items():
        normal = key.strip().lower()
        if normal in record:
            issues.add(f"has two keys for column {normal!r}; keep one", row=number)
            return
        record[normal] = item
        parsed.columns.setdefault(normal, key)
    parsed.records.append((number, record))


def _header_names(names: list[str], issues: _Issues) -> dict[str, str] | None:
    columns: dict[str, str] = {}
    for position, written in enumerate(names, 1):
        normal = written.strip().lower()
        if not normal:
            issues.add(f"column {position} of the header has no name")
        elif normal in columns:
            issues.add(f"column {written.strip()!r} appears twice in the header")
        else:
            columns[normal] = written.strip()
    return None if len(issues) else columns


def _read_csv(text: str, max_rows: int, issues: _Issues) -> _Parsed | None:
    """CSV through the csv module: a header row, then data rows with exactly as many values.

    The csv module's field_size_limit (131,072 characters unless changed process-wide) is the guard against one
    runaway field, e.g. after an unclosed quote; we read it but never change it, since it is global to the process.
    """
    if text.lstrip()[0] in "{[":
        issues.add("this looks like JSON, not CSV; give JSON Lines a .jsonl name")
        return None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    parsed = _Parsed(n_rows=0, records=[], columns={})
    try:
        header = next(reader, None)
        while header is not None and not [cell for cell in header if cell.strip()]:
            header = next(reader, None)
        if header is None:
            issues.add("file has no header row")
            return None
        if len(header) == 1 and (";" in header[0] or "\t" in header[0]):
            separator = "semicolons" if ";" in header[0] else "tabs"
            issues.add(
                f"the header {header[0][:60]!r} is one column holding {separator}; the file must be comma-separated"
            )
            return None
        columns = _header_names(header, issues)
        if columns is None:
            return None
        parsed.columns = columns
        names = list(columns)
        for cells in reader:
            if not cells or (len(cells) == 1 and not cells[0].strip() and len(names) > 1):
                continue  # a blank line
            parsed.n_rows += 1
            if parsed.n_rows > max_rows:
                continue  # keep counting, to say how many rows there are
            if len(cells) != len(names):
                issues.add(f"has {len(cells)} values but the header has {len(names)} columns", row=parsed.n_rows)
                continue
            parsed.records.append((parsed.n_rows, dict(zip(names, cells, strict=True))))
    except csv.Error as error:
        message = str(error)
        if "field larger than field limit" in message:
            message = f"a field is longer than the CSV reader's limit of {csv.field_size_limit():,} characters"
        elif "unexpected end of data" in message:
            message = "a quoted field is never closed (the file ends inside quotes)"
        else:
            message = f"malformed CSV ({message})"
        issues.add(f"line {reader.line_num:,}: {message}")
        return None
    if parsed.n_rows > max_rows:
        issues.add(f"file has {parsed.n_rows:,} rows; the limit is {max_rows:,}")
        return None
    if parsed.n_rows == 0:
        issues.add("file has a header but no data rows")
        return None
    return parsed


def _read_parquet(data: bytes, max_bytes: int, max_rows: int, issues: _Issues) -> _Parsed | None:
    """Parquet read with its own schema: recognised columns must have text (or, for messages, list) types."""
    if not data.startswith(b"PAR1"):
        if data.startswith(b"PARE"):
            issues.add("encrypted Parquet files are not supported")
            return None
        label = _magic(data)
        if label is None:
            head = data[:4096]
            try:
                codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
                label = "text" if b"\x00" not in head else None
            except UnicodeDecodeError:
                pass
        if label == "text":
            issues.add(
                "not a Parquet file: it does not start with the magic bytes PAR1 and looks like text; "
                "name CSV files .csv and JSON Lines files .jsonl"
            )
        else:
            issues.add(
                f"not a Parquet file: it does not start with the magic bytes PAR1 (looks like {label or 'data'})"
            )
        return None
    if len(data) < 12 or not data.endswith(b"PAR1"):
        issues.add("Parquet file is incomplete: it does not end with the magic bytes PAR1 (truncated upload?)")
        return None

    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        source = pq.ParquetFile(pa.BufferReader(data))
        meta = source.metadata
        n_rows = meta.num_rows
        if n_rows > max_rows:
            issues.add(f"file has {n_rows:,} rows; the limit is {max_rows:,}")
            return None
        expanded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if expanded > 10 * max_bytes:
            issues.add(f"file expands to {_size(expanded)} when decompressed; the limit is {_size(10 * max_bytes)}")
            return None
        schema = source.schema_arrow
        columns = _header_names(list(schema.names), issues)
        if columns is None:
            return None
        wanted = set(_INSTRUCTION_COLUMNS + _OUTPUT_COLUMNS + ("input", "task", "messages"))
        read = [written for normal, written in columns.items() if normal in wanted]
        for written in read:
            kind = schema.field(written).type
            if written.strip().lower() == "messages":
                if not (_is_text_type(pa, kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind)):
                    issues.add(
                        f"column {written!r} has type {kind}; expected a list of {{role, content}} or JSON text"
                    )
            elif not _is_text_type(pa, kind):
                issues.add(f"column {written!r} has type {kind}; expected text (string)")
        if len(issues):
            return None
        table = source.read(columns=read) if read else None
        values = table.to_pylist() if table is not None else [{} for _ in range(n_rows)]
    except Exception as error:  # pyarrow raises many kinds (ArrowInvalid, OSError, ...) on damaged files
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        issues.add(f"could not read the Parquet file ({detail})")
        return None
    if not values:
        issues.add("file has no rows")
        return None
    names = {written: written.strip().lower() for written in read}
    records = [(number, {names[k]: v for k, v in row.items()}) for number, row in enumerate(values, 1)]
    return _Parsed(n_rows=len(values), records=records, columns=columns)


def _is_text_type(pa: Any, kind: Any) -> bool:
    if pa.types.is_dictionary(kind):
        return _is_text_type(pa, kind.value_type)
    return bool(
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_null(kind)
        or getattr(pa.types, "is_string_view", lambda _: False)(kind)
    )


def _resolve_shape(parsed: _Parsed, default_task: str | None, issues: _Issues) -> _Shape | None:
    """Which columns hold what; every problem of the columns as a whole, reported once."""
    names = parsed.columns
    found = ", ".join(names.values()) or "no columns"
    instruction = [c for c in _INSTRUCTION_COLUMNS if c in names]
    output = [c for c in _OUTPUT_COLUMNS if c in names]
    before = len(issues)
    shape = _Shape(chat="messages" in names)
    if shape.chat:
        mixed = [names[c] for c in (*instruction, *output, "input") if c in names]
        if mixed:
            issues.add(
                f"the file has a 'messages' column and instruction-style columns ({', '.join(mixed)}); "
                "use one shape or the other"
            )
    else:
        for role, found_columns in (("instruction", instruction), ("output", output)):
            if len(found_columns) > 1:
                both = " and ".join(repr(names[c]) for c in found_columns)
                issues.add(f"columns {both} {'both' if len(found_columns) == 2 else 'all'} hold the {role}; keep one")
        if not instruction:
            issues.add(
                "missing column 'instruction' (or 'prompt' or 'question'; or 'messages' for chat rows); "
                f"found: {found}"
            )
        if not output:
            issues.add(f"missing column 'output' (or 'response' or 'answer'); found: {found}")
        shape.instruction = instruction[0] if instruction else None
        shape.output = output[0] if output else None
        shape.input = "input" if "input" in names else None
    if "task" in names:
        shape.task = "task"
    elif default_task is None:
        issues.add("no 'task' column and no default task; add a 'task' column naming each row's task")
    elif not TASK_NAME.fullmatch(default_task):
        issues.add(f"default task {default_task!r} is not a valid task name; {_TASK_RULE}")
    return None if len(issues) > before else shape


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _text(
    number: int, record: dict[str, Any], column: str, written: str, issues: _Issues, *, optional: bool = False
) -> str | None:
    """A text cell; null (and, for an optional column, absence from a JSON object) reads as ""."""
    if column not in record:
        if optional:
            return ""
        issues.add("is missing", row=number, field=written)
        return None
    value = record[column]
    if value is None:
        return ""
    if not isinstance(value, str):
        issues.add(f"must be text, got {_kind(value)}", row=number, field=written)
        return None
    return value


def _chat(number: int, value: Any, written: str, issues: _Issues) -> tuple[str, str] | None:
    """(instruction, output) of a single-turn chat, or None after reporting why it is not one."""

    def fail(message: str) -> None:
        issues.add(message, row=number, field=written)

    if value is None:
        fail("must not be empty")
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as error:
            fail(f"is not valid JSON ({getattr(error, 'msg', error)})")
            return None
    if not isinstance(value, list | tuple) or not value:
        fail(f"must be a non-empty list of {{role, content}} messages, got {_kind(value)}")
        return None
    roles: list[str] = []
    contents: list[str] = []
    for position, message in enumerate(value, 1):
        if not isinstance(message, dict):
            fail(f"message {position} must be an object {{role, content}}, got {_kind(message)}")
            return None
        role, content = message.get("role"), message.get("content")
        if role not in _CHAT_ROLES:
            fail(f"message {position} has role {role!r}; expected 'system', 'user' or 'assistant'")
            return None
        if not isinstance(content, str):
            fail(f"message {position} must have text content, got {_kind(content)}")
            return None
        roles.append(role)
        contents.append(content)
    answers = [i for i, role in enumerate(roles) if role == "assistant"]
    if not answers:
        fail("has no assistant message; the last assistant message is the answer to learn")
        return None
    if len(answers) > 1:
        fail(
            f"has {len(answers)} assistant messages; only single-turn chats are accepted "
            "(system, user, then one assistant answer): split a conversation into one row per answer"
        )
        return None
    answer = answers[0]
    if answer != len(roles) - 1:
        fail("has messages after the assistant's answer; the answer must be the last message")
        return None
    if "user" not in roles[:answer]:
        fail("has no user message before the assistant's answer")
        return None
    systems = [c for r, c in zip(roles[:answer], contents, strict=False) if r == "system"]
    users = [c for r, c in zip(roles[:answer], contents, strict=False) if r == "user"]
    return "\n\n".join(systems + users), contents[answer]


def _build_rows(
    parsed: _Parsed, shape: _Shape, default_task: str | None, max_field_chars: int, issues: _Issues
) -> list[ExampleRow]:
    """Schema check of every record, then exact duplicates; the rows that passed."""
    rows: list[ExampleRow] = []
    seen: dict[ExampleRow, int] = {}
    for number, record in parsed.records:
        before = len(issues)
        written = {"task": parsed.columns.get("task", "task")}
        values: dict[str, str | None] = {}
        if shape.task:
            values["task"] = _text(number, record, "task", written["task"], issues)
        else:
            values["task"] = default_task
        if shape.chat:
            written |= {"instruction": parsed.columns["messages"], "output": parsed.columns["messages"]}
            pair = _chat(number, record.get("messages"), parsed.columns["messages"], issues)
            if pair is not None:
                values["instruction"], values["output"] = pair
        else:
            for key, column in (("instruction", shape.instruction), ("input", shape.input), ("output", shape.output)):
                if column:
                    written[key] = parsed.columns[column]
                    values[key] = _text(number, record, column, written[key], issues, optional=key == "input")
        for key in ("instruction", "input", "output"):
            text = values.get(key)
            if text is not None and len(text) > max_field_chars:
                what = f"the {key} built from the messages is" if shape.chat else "is"
                issues.add(
                    f"{what} {len(text):,} characters; the limit is {max_field_chars:,}",
                    row=number,
                    field=written[key],
                )
        if len(issues) > before:
            continue
        try:
            row = ExampleRow(**{key: value for key, value in values.items() if value is not None})
        except ValidationError as error:
            for problem in error.errors():
                key = str(problem["loc"][0]) if problem["loc"] else None
                message = str(problem["msg"]).removeprefix("Value error, ")
                issues.add(message, row=number, field=written.get(key or "", key))
            continue
        if row in seen:
            issues.add(f"exact duplicate of row {seen[row]:,}", row=number)
            continue
        seen[row] = number
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Prompts and tokens


def render_prompt(row: ExampleRow, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """The text the model sees before the answer: the tokenizer's chat template if it has one, else Alpaca style."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        user = row.instruction + (f"\n\n{row.input}" if row.input else "")
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        return str(rendered)
    if row.input:
        return f"### Instruction:\n{row.instruction}\n\n### Input:\n{row.input}\n\n### Response:\n"
    return f"### Instruction:\n{row.instruction}\n\n### Response:\n"


def _head(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """BOS for plain prompts when the tokenizer has one distinct from EOS; chat templates write their own."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return [bos] if not templated and bos is not None and bos != eos else []


def prompt_ids(row: ExampleRow, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token ids a model sees before its answer, exactly as in training: what generation starts from."""
    return _head(tokenizer) + list(tokenizer(render_prompt(row, tokenizer), add_special_tokens=False)["input_ids"])


def tokenize_example(
    row: ExampleRow, tokenizer: PreTrainedTokenizerBase, *, max_length: int = 512
) -> dict[str, list[int]]:
    """Token ids of prompt + answer + EOS, with labels that teach only the answer and the EOS (the prompt is -100).

    Without a chat template the tokenizer's BOS (when it has one distinct from EOS) starts the sequence; a chat
    template writes its own. Too long an example keeps the whole answer and EOS when they fit beside at least
    ``max_length // 4`` prompt tokens, cutting the prompt from the left (the instruction's start goes first, the
    "Response" marker stays). Otherwise the prompt keeps its last ``max_length // 4`` tokens and the answer is cut
    from the right with no EOS, so the model is never taught to stop mid-answer. Nothing is padded here; see collate.
    """
    if max_length < 4:
        raise ValueError("max_length must be at least 4")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; set one so the model learns where an answer ends")
    head = _head(tokenizer)
    prompt_ids = list(tokenizer(render_prompt(row, tokenizer), add_special_tokens=False)["input_ids"])
    answer_ids = list(tokenizer(row.output, add_special_tokens=False)["input_ids"])
    tail = [eos]
    room = max_length - len(head)
    if len(prompt_ids) + len(answer_ids) + len(tail) > room:
        prompt_min = min(len(prompt_ids), max_length // 4)
        if len(answer_ids) + len(tail) <= room - prompt_min:
            prompt_ids = prompt_ids[len(prompt_ids) - (room - len(answer_ids) - len(tail)) :]
        else:
            prompt_ids = prompt_ids[len(prompt_ids) - prompt_min :]
            answer_ids = answer_ids[: room - prompt_min]
            tail = []
    input_ids = head + prompt_ids + answer_ids + tail
    labels = [IGNORE_INDEX] * (len(head) + len(prompt_ids)) + answer_ids + tail
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


def collate(
    examples: Sequence[dict[str, list[int]]], *, pad_id: int, task_ids: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad a batch: pad_id in input_ids, 0 in attention_mask, -100 in labels; task_ids as a LongTensor."""
    import torch

    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, example in enumerate(examples):
        length = len(example["input_ids"])
        if len(example["labels"]) != length or len(example["attention_mask"]) != length:
            raise ValueError(f"example {i} has input_ids, labels and attention_mask of different lengths")
        if length:
            input_ids[i, :length] = torch.tensor(example["input_ids"], dtype=torch.long)
            labels[i, :length] = torch.tensor(example["labels"], dtype=torch.long)
            attention_mask[i, :length] = torch.tensor(example["attention_mask"], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if task_ids is not None:
        if len(task_ids) != len(examples):
            raise ValueError(f"{len(task_ids)} task ids for {len(examples)} examples")
        batch["task_ids"] = torch.tensor(list(task_ids), dtype=torch.long)
    return batch


# --------------------------------------------------------------------------------------------------------------------
# Splitting and sampling


def split_holdout(
    rows: Sequence[ExampleRow], *, fraction: float = 0.1, min_per_task: int = 1, seed: int = 0
) -> tuple[list[ExampleRow], list[ExampleRow]]:
    """(train, holdout), both in the original order, holding out ``fraction`` of each task (rounded half up).

    Each task holds out at least ``min_per_task`` rows but always keeps one for training, so a task with a single
    row holds out none. Each task's choice depends only on its own rows, the seed and its name, so adding or
    removing another task does not change it.
    """
    if not 0 <= fraction < 1:
        raise ValueError("fraction must be in [0, 1)")
    if min_per_task < 0:
        raise ValueError("min_per_task must not be negative")
    by_task: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        by_task.setdefault(row.task, []).append(index)
    held: set[int] = set()
    for task, indices in by_task.items():
        count = min(max(min_per_task, math.floor(len(indices) * fraction + 0.5)), len(indices) - 1)
        order = list(indices)
        random.Random(f"{seed}:holdout:{task}").shuffle(order)
        held.update(order[:count])
    train = [row for index, row in enumerate(rows) if index not in held]
    holdout = [row for index, row in enumerate(rows) if index in held]
    return train, holdout


class TaskBatchSampler:
    """Batches of example indices, each example drawn by first drawing a task, then that task's next example.

    ``weighting`` sets the task probabilities: "uniform" (equal), "proportional" (by row count n_t) or
    "temperature" (p_t ∝ n_t^(1/T)). Within a task, examples come in a shuffled order that is reshuffled only once
    all have been seen. The randomness of batch k depends only on (seed, k) and each task's order only on (seed,
    task, epoch), so the state is a few counters: ``state_dict`` is small, JSON-serialisable, and resumes exactly.
    """

    def __init__(
        self,
        tasks_of_examples: Sequence[str],
        *,
        batch_size: int,
        weighting: str = "uniform",
        temperature: float = 2.0,
        seed: int = 0,
        only_tasks: Sequence[str] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")
        if weighting == "temperature" and not (math.isfinite(temperature) and temperature > 0):
            raise ValueError("temperature must be a positive number")
        by_task: dict[str, list[int]] = {}
        for index, task in enumerate(tasks_of_examples):
            by_task.setdefault(task, []).append(index)
        if only_tasks is not None:
            unknown = [task for task in only_tasks if task not in by_task]
            if unknown:
                raise ValueError(f"no examples for task(s) {', '.join(map(repr, unknown))}")
            by_task = {task: by_task[task] for task in only_tasks}
        if not by_task:
            raise ValueError("no examples to sample from")
        self.batch_size = batch_size
        self.seed = seed
        self._examples = {task: by_task[task] for task in sorted(by_task)}
        self._fingerprint = hashlib.sha256(
            json.dumps([list(tasks_of_examples), sorted(by_task)]).encode()
        ).hexdigest()[:16]
        sizes = {task: len(indices) for task, indices in self._examples.items()}
        if weighting == "uniform":
            weights = dict.fromkeys(sizes, 1.0)
        elif weighting == "proportional":
            weights = {task: float(n) for task, n in sizes.items()}
        else:
            weights = {task: n ** (1.0 / temperature) for task, n in sizes.items()}
        self._probs: dict[str, float] = {}
        self.set_probabilities(weights)
        self._batches = 0
        self._cursors = {task: [0, 0] for task in self._examples}  # task -> [epoch, position]
        self._orders: dict[str, tuple[int, list[int]]] = {}

    @property
    def tasks(self) -> list[str]:
        return list(self._examples)

    @property
    def probabilities(self) -> dict[str, float]:
        return dict(self._probs)

    def set_probabilities(self, probs: dict[str, float]) -> None:
        """Draw tasks with these weights from now on (normalised; a task left out gets 0)."""
        unknown = [task for task in probs if task not in self._examples]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; the sampler draws from {self.tasks}")
        values = {task: float(probs.get(task, 0.0)) for task in self._examples}
        if any(not math.isfinite(v) or v < 0 for v in values.values()):
            raise ValueError("task probabilities must be finite and not negative")
        total = sum(values.values())
        if total <= 0:
            raise ValueError("at least one task needs a probability above 0")
        self._probs = {task: value / total for task, value in values.items()}

    def _order(self, task: str, epoch: int) -> list[int]:
        cached = self._orders.get(task)
        if cached is None or cached[0] != epoch:
            order = list(self._examples[task])
            random.Random(f"{self.seed}:order:{task}:{epoch}").shuffle(order)
            cached = self._orders[task] = (epoch, order)
        return cached[1]

    def _take(self, task: str) -> int:
        cursor = self._cursors[task]
        order = self._order(task, cursor[0])
        index = order[cursor[1]]
        cursor[1] += 1
        if cursor[1] == len(order):
            cursor[0], cursor[1] = cursor[0] + 1, 0
        return index

    def next_batch(self) -> list[int]:
        rng = random.Random(f"{self.seed}:batch:{self._batches}")
        tasks = [task for task, p in self._probs.items() if p > 0]
        drawn = rng.choices(tasks, weights=[self._probs[task] for task in tasks], k=self.batch_size)
        self._batches += 1
        return [self._take(task) for task in drawn]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "fingerprint": self._fingerprint,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "batches": self._batches,
            "probabilities": dict(self._probs),
            "cursors": {task: list(cursor) for task, cursor in self._cursors.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses a state taken over other examples, another seed or batch size."""
        if state.get("version") != 1:
            raise ValueError(f"unknown sampler state version {state.get('version')!r}")
        for key, mine in (("fingerprint", self._fingerprint), ("seed", self.seed), ("batch_size", self.batch_size)):
            if state.get(key) != mine:
                raise ValueError(f"sampler state has {key} {state.get(key)!r}, this sampler {mine!r}")
        cursors = state["cursors"]
        if set(cursors) != set(self._examples):
            raise ValueError("sampler state is for other tasks")
        for task, (epoch, position) in cursors.items():
            if not (0 <= position < len(self._examples[task]) and epoch >= 0):
                raise ValueError(f"sampler state has an impossible position for task {task!r}")
        self.set_probabilities(state["probabilities"])
        self._probs = {task: float(state["probabilities"].get(task, 0.0)) for task in self._examples}
        self._batches = int(state["batches"])
        self._cursors = {task: [int(epoch), int(position)] for task, (epoch, position) in cursors.items()}
