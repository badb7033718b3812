"""Datasets: validate uploads, store them under generated keys, list, preview, rename and delete them.

Uploads are all or nothing per batch: when any file of a batch is refused (or its name is taken), nothing of the
batch is stored and the refusal lists every file's problems, so a person fixes them in one go instead of finding half
a batch registered. Users' names never become paths: files go to the artifact store under generated keys.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from app.context import ServiceError, StudioContext
from models.data import DataValidationError, ValidationReport, task_name_from_filename, validate_upload
from models.registry import LOCAL_OWNER, Dataset, Mixture, MixtureDataset
from models.spec import NAME
from models.storage import new_key

UPLOAD_TYPES = (".jsonl", ".json", ".csv", ".parquet")
PREVIEW_ROWS = 20
PREVIEW_CHARS = 300
READ_CHUNK = 1 << 20
ISSUES_SHOWN = 10
_PATHLIKE = re.compile(r"[/\\]|\.\.")
_NAME_RULE = "use 1-64 letters, digits, '_' or '-', starting with a letter or digit"


def human_size(n: int) -> str:
    """Bytes for people, in the binary units the upload limit is set in (50 MB = 50 MiB)."""
    if n < 1 << 10:
        return f"{n:,} bytes"
    value, unit = (n / (1 << 20), "MB") if n >= 1 << 20 else (n / (1 << 10), "KB")
    return f"{value:.1f}".removesuffix(".0") + f" {unit}"


@dataclass
class FileCheck:
    """One uploaded file after the checks: its bytes and validation report, or why it was refused before parsing."""

    filename: str
    size: int
    data: bytes = field(default=b"", repr=False)
    report: ValidationReport | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None and self.report is not None and self.report.ok

    def lines(self) -> list[str]:
        """Markdown lines for the report: a verdict, then the problems with their row numbers."""
        if self.problem is not None or self.report is None:
            return [f"- ❌ **{self.filename}**: {self.problem or 'was not checked'}"]
        if self.report.ok:
            return [f"- ✅ {self.report.summary()}"]
        issues = [f"  - {_explain(str(issue))}" for issue in self.report.issues[:ISSUES_SHOWN]]
        if self.report.issue_count > len(issues):
            issues.append(f"  - … and {self.report.issue_count - len(issues):,} more")
        return [f"- ❌ {self.report.summary().split('; first:')[0]}:", *issues]


def _explain(issue: str) -> str:
    """Say outright why a path-like task name is refused (the validator's rule alone leaves people guessing)."""
    quoted = re.search(r"'([^']*)' is not a valid task name", issue)
    if quoted and _PATHLIKE.search(quoted.group(1)):
        return f"{issue} (task names must not look like file paths)"
    return issue


def check_name(name: str, what: str = "dataset name") -> str:
    """The spec's name rule for names people type; a path-like name gets its own message."""
    name = name.strip()
    if not name:
        raise ServiceError(f"the {what} is empty; {_NAME_RULE}")
    if _PATHLIKE.search(name):
        raise ServiceError(f"{what} {name!r} looks like a file path; {_NAME_RULE}")
    if not NAME.fullmatch(name):
        raise ServiceError(f"{what} {name!r} is not allowed; {_NAME_RULE}")
    return name


def read_upload(path: str | os.PathLike[str], *, max_bytes: int) -> bytes:
    """A file's bytes read in chunks; ``ServiceError`` as soon as it is larger than ``max_bytes`` (not read whole)."""
    size = os.path.getsize(path)
    too_large = f"the file is {human_size(size)}; the limit is {human_size(max_bytes)}"
    if size > max_bytes:
        raise ServiceError(too_large)
    buffer = bytearray()
    with open(path, "rb") as handle:
        while chunk := handle.read(min(READ_CHUNK, max_bytes + 1 - len(buffer))):
            buffer += chunk
    if len(buffer) > max_bytes:  # grew since it was measured
        raise ServiceError(f"the file is larger than the limit of {human_size(max_bytes)}")
    return bytes(buffer)


def _as_paths(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None) -> list[Path]:
    if paths is None:
        return []
    if isinstance(paths, str | os.PathLike):
        return [Path(paths)]
    return [Path(p) for p in paths]


def check_uploads(
    *, ctx: StudioContext, paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None
) -> list[FileCheck]:
    """Read and validate each file (Gradio temp paths keep the uploaded file's name); stores nothing."""
    checks = []
    limit = ctx.settings.max_upload_bytes
    for path in _as_paths(paths):
        check = FileCheck(filename=path.name, size=0)
        try:
            check.size = os.path.getsize(path)
            check.data = read_upload(path, max_bytes=limit)
        except ServiceError as error:
            check.problem = str(error)
        except OSError as error:
            check.problem = f"could not be read ({error.strerror or error})"
        else:
            default_task = task_name_from_filename(path.name)
            check.report = validate_upload(check.data, path.name, default_task=default_task, max_bytes=limit)
        checks.append(check)
    return checks


def upload_report(checks: Sequence[FileCheck]) -> str:
    """The validation report as Markdown, one entry per file."""
    if not checks:
        return ""
    return "\n".join(line for check in checks for line in check.lines())


def _batch_names(checks: Sequence[FileCheck], name: str | None) -> list[str]:
    """One dataset name per file: the typed name for a single file, ``<name>-<file stem>`` for several."""
    name = (name or "").strip()
    if name:
        check_name(name)
    stems = [task_name_from_filename(check.filename) for check in checks]
    if len(checks) == 1:
        return [name or stems[0]]
    return [f"{name}-{stem}"[:64].rstrip("_-") if name else stem for stem in stems]


def _name_problems(ctx: StudioContext, names: Sequence[str], owner: str) -> list[str]:
    problems = [
        f"two files would both be named '{n}'; rename one file" for n in sorted(set(names)) if names.count(n) > 1
    ]
    with ctx.session() as s:
        taken = set(s.scalars(sa.select(Dataset.name).where(Dataset.owner_id == owner, Dataset.name.in_(names))))
    problems += [f"a dataset named '{n}' exists already; choose another name" for n in sorted(taken)]
    return problems


def upload_datasets(
    *,
    ctx: StudioContext,
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    name: str | None = None,
    owner: str = LOCAL_OWNER,
) -> list[Dataset]:
    """Register one dataset per file, all or nothing: any bad file refuses the batch with every file's problems."""
    checks = check_uploads(ctx=ctx, paths=paths)
    if not checks:
        raise ServiceError("choose one or more files to upload (.jsonl, .json, .csv or .parquet)")
    names = _batch_names(checks, name)
    problems = _name_problems(ctx, names, owner)
    bad = [check for check in checks if not check.ok]
    if bad or problems:
        what = f"{len(bad)} of {len(checks)} files" if bad else "the dataset names"
        lines = [f"Nothing was stored: {what} must be fixed first.", "", upload_report(checks)]
        raise ServiceError("\n".join(lines + [f"- ❌ {problem}" for problem in problems]))
    items = [(n, c.filename, c.data, c.report) for n, c in zip(names, checks, strict=True) if c.report is not None]
    return _store(ctx, items, owner)


def create_dataset(
    *, ctx: StudioContext, filename: str, data: bytes, name: str | None = None, owner: str = LOCAL_OWNER
) -> Dataset:
    """Validate an upload, store the file under a generated key, then insert the row; nothing is kept on refusal."""
    if len(data) > ctx.settings.max_upload_bytes:
        limit = human_size(ctx.settings.max_upload_bytes)
        raise ServiceError(f"{filename}: the file is {human_size(len(data))}; the limit is {limit}")
    report = validate_upload(
        data, filename, default_task=task_name_from_filename(filename), max_bytes=ctx.settings.max_upload_bytes
    )
    if not report.ok:
        raise ServiceError(_explain(str(DataValidationError(report))))
    name = check_name(name) if name and name.strip() else task_name_from_filename(filename)
    problems = _name_problems(ctx, [name], owner)
    if problems:
        raise ServiceError(problems[0])
    return _store(ctx, [(name, filename, data, report)], owner)[0]


def _store(ctx: StudioContext, items: Sequence[tuple[str, str, bytes, ValidationReport]], owner: str) -> list[Dataset]:
    """Write every file under a generated key, then insert every row in one transaction; on any failure undo all."""
    keys: list[str] = []
    try:
        digests = []
        for _name, _filename, data, _report in items:
            keys.append(new_key("datasets", owner))
            digests.append(ctx.store.put_bytes(keys[-1], data))
        with ctx.session() as s:  # the rows commit only with their files in place
            datasets = [
                Dataset(
                    name=name,
                    owner_id=owner,
                    size_bytes=len(data),
                    artifact_key=key,
                    sha256=digest,
                    **report.dataset_fields(),
                )
                for (name, filename, data, report), key, digest in zip(items, keys, digests, strict=True)
            ]
            s.add_all(datasets)
    except IntegrityError as error:
        _delete_keys(ctx, keys)
        raise ServiceError("a dataset with one of these names exists already; choose another name") from error
    except BaseException:
        _delete_keys(ctx, keys)
        raise
    return datasets


def _delete_keys(ctx: StudioContext, keys: Sequence[str]) -> None:
    for key in keys:
        ctx.store.delete(key)


# --- reading ----------------------------------------------------------------------------------------------------


def list_datasets(*, ctx: StudioContext, owner: str = LOCAL_OWNER) -> pd.DataFrame:
    with ctx.session() as s:
        rows = s.scalars(sa.select(Dataset).where(Dataset.owner_id == owner).order_by(Dataset.created_at)).all()
        return pd.DataFrame(
            [
                {
                    "name": d.name,
                    "format": d.format,
                    "tasks": ", ".join(d.tasks),
                    "rows": d.n_rows,
                    "size": human_size(d.size_bytes),
                }
                for d in rows
            ],
            columns=["name", "format", "tasks", "rows", "size"],
        )


def dataset_names(*, ctx: StudioContext, owner: str = LOCAL_OWNER) -> list[str]:
    """Names for selectors, oldest first (as in the table)."""
    with ctx.session() as s:
        return list(s.scalars(sa.select(Dataset.name).where(Dataset.owner_id == owner).order_by(Dataset.created_at)))


def _get(s: sa.orm.Session, name: str | None, owner: str) -> Dataset:
    if not name or not name.strip():
        raise ServiceError("choose a dataset first")
    dataset = s.scalars(sa.select(Dataset).where(Dataset.owner_id == owner, Dataset.name == name.strip())).first()
    if dataset is None:
        raise ServiceError(f"no dataset named '{name.strip()}'")
    return dataset


def _clip(text: str) -> str:
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def preview_dataset(
    *, ctx: StudioContext, name: str | None, n: int = PREVIEW_ROWS, owner: str = LOCAL_OWNER
) -> pd.DataFrame:
    """The first ``n`` rows as parsed for training (chat rows read as instruction → output), long texts clipped."""
    with ctx.session() as s:
        dataset = _get(s, name, owner)
    data = ctx.store.get_bytes(dataset.artifact_key)
    default_task = dataset.tasks[0] if len(dataset.tasks) == 1 else None
    report = validate_upload(
        data, f"{dataset.name}.{dataset.format}", default_task=default_task, max_bytes=max(len(data), 1)
    )
    if not report.ok:  # the stored file is the truth; say so rather than show a partial preview
        raise ServiceError(f"dataset '{dataset.name}' no longer validates: {report.summary()}")
    rows = report.rows[: max(int(n), 0)]
    return pd.DataFrame(
        [
            {
                "row": i,
                "task": r.task,
                "instruction": _clip(r.instruction),
                "input": _clip(r.input),
                "output": _clip(r.output),
            }
            for i, r in enumerate(rows, 1)
        ],
        columns=["row", "task", "instruction", "input", "output"],
    )


def task_counts(*, ctx: StudioContext, name: str | None = None, owner: str = LOCAL_OWNER) -> pd.DataFrame:
    """Rows per task for the bar chart: of one dataset, or of every registered one when ``name`` is empty."""
    with ctx.session() as s:
        if name and name.strip():
            datasets = [_get(s, name, owner)]
        else:
            query = sa.select(Dataset).where(Dataset.owner_id == owner).order_by(Dataset.created_at)
            datasets = list(s.scalars(query))
        records = [
            {"task": task, "rows": int(count), "dataset": d.name}
            for d in datasets
            for task, count in d.task_counts.items()
        ]
    return pd.DataFrame(records, columns=["task", "rows", "dataset"])


# --- changing ---------------------------------------------------------------------------------------------------


def rename_dataset(*, ctx: StudioContext, name: str | None, new_name: str | None, owner: str = LOCAL_OWNER) -> Dataset:
    """Give a dataset a new name; mixtures keep using it (they refer to it by id)."""
    new_name = check_name(new_name or "", "new dataset name")
    try:
        with ctx.session() as s:
            dataset = _get(s, name, owner)
            if dataset.name == new_name:
                raise ServiceError(f"the dataset is already named '{new_name}'")
            if s.scalar(sa.select(Dataset.id).where(Dataset.owner_id == owner, Dataset.name == new_name)):
                raise ServiceError(f"a dataset named '{new_name}' exists already; choose another name")
            dataset.name = new_name
    except IntegrityError as error:
        raise ServiceError(f"a dataset named '{new_name}' exists already; choose another name") from error
    return dataset


def delete_dataset(*, ctx: StudioContext, name: str | None, owner: str = LOCAL_OWNER) -> str:
    """Remove the row, then its file; refused while a mixture trains on it. Returns the deleted name."""
    with ctx.session() as s:
        dataset = _get(s, name, owner)
        users = s.scalars(
            sa.select(Mixture.name)
            .join(MixtureDataset, MixtureDataset.mixture_id == Mixture.id)
            .where(MixtureDataset.dataset_id == dataset.id)
            .order_by(Mixture.name)
        ).all()
        if users:
            noun = "mixture" if len(users) == 1 else "mixtures"
            listed = ", ".join(f"'{u}'" for u in users)
            raise ServiceError(
                f"dataset '{dataset.name}' is used by the {noun} {listed}; delete or change those first"
            )
        key, deleted = dataset.artifact_key, dataset.name
    try:
        with ctx.session() as s:  # the foreign key (RESTRICT) still guards a mixture saved meanwhile
            s.execute(sa.delete(Dataset).where(Dataset.owner_id == owner, Dataset.name == deleted))
    except IntegrityError as error:
        raise ServiceError(f"dataset '{deleted}' is now used by a mixture; it was not deleted") from error
    ctx.store.delete(key)  # after the commit: a failure here leaves an unreferenced file, never a dangling row
    return deleted
