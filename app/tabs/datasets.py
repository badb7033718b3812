"""Datasets tab: upload (validated, all or nothing), browse, preview, per-task counts, rename and delete."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr
import pandas as pd

from app import strings
from app.context import ServiceError, StudioContext
from app.services import datasets as services


@dataclass
class TabHandles:
    """Components other tabs may refresh or listen to.

    ``changed`` holds the events after which the set of datasets may differ (upload, rename, delete): chain
    ``.success(...)`` on them to refresh another tab's dataset choices; ``refresh_outputs`` gives this tab's values.
    """

    table: gr.Dataframe
    selector: gr.Dropdown
    refresh: gr.Button
    files: gr.File
    upload: gr.Button
    report: gr.Markdown
    preview: gr.Dataframe
    counts: gr.BarPlot
    status: gr.Markdown
    changed: list[Any] = field(default_factory=list)


def refresh_outputs(ctx: StudioContext, selected: str | None = None) -> tuple[pd.DataFrame, Any]:
    """The datasets table and the selector's choices (keeping ``selected`` when it still exists)."""
    names = services.dataset_names(ctx=ctx)
    return services.list_datasets(ctx=ctx), gr.Dropdown(choices=names, value=selected if selected in names else None)


def build(ctx: StudioContext) -> TabHandles:
    """Lay out the tab inside the current ``gr.Tab`` and wire its events."""
    gr.Markdown(strings.DATASETS_INTRO)
    gr.Markdown(strings.DATASETS_LIMIT.format(limit=services.human_size(ctx.settings.max_upload_bytes)))
    files, name, upload, report = _upload_section()
    table, refresh = _table_section()
    selector, preview, counts, new_name, rename, delete, status = _browse_section()
    handles = TabHandles(table, selector, refresh, files, upload, report, preview, counts, status)
    _wire_upload(ctx, handles, name)
    _wire_browse(ctx, handles, new_name, rename, delete)
    return handles


def _upload_section() -> tuple[gr.File, gr.Textbox, gr.Button, gr.Markdown]:
    with gr.Row():
        files = gr.File(
            label=strings.DATASETS_FILES,
            file_count="multiple",
            file_types=list(services.UPLOAD_TYPES),
            elem_id="datasets-files",
            scale=3,
        )
        with gr.Column(scale=2):
            name = gr.Textbox(
                label=strings.DATASETS_NAME, placeholder=strings.DATASETS_NAME_HINT, elem_id="datasets-name"
            )
            upload = gr.Button(strings.DATASETS_UPLOAD, variant="primary", elem_id="datasets-upload")
    report = gr.Markdown(strings.DATASETS_REPORT_EMPTY, elem_id="datasets-report")
    return files, name, upload, report


def _table_section() -> tuple[gr.Dataframe, gr.Button]:
    table = gr.Dataframe(label=strings.DATASETS_TABLE, interactive=False, elem_id="datasets-table")
    refresh = gr.Button(strings.REFRESH, size="sm", elem_id="datasets-refresh")
    return table, refresh


def _browse_section() -> tuple[gr.Dropdown, gr.Dataframe, gr.BarPlot, gr.Textbox, gr.Button, gr.Button, gr.Markdown]:
    with gr.Row():
        selector = gr.Dropdown(
            label=strings.DATASETS_SELECT, choices=[], value=None, allow_custom_value=True, elem_id="datasets-select"
        )
        new_name = gr.Textbox(label=strings.DATASETS_NEW_NAME, elem_id="datasets-new-name")
        with gr.Column(min_width=120):
            rename = gr.Button(strings.DATASETS_RENAME, size="sm", elem_id="datasets-rename")
            delete = gr.Button(strings.DATASETS_DELETE, size="sm", variant="stop", elem_id="datasets-delete")
    status = gr.Markdown(elem_id="datasets-status")
    with gr.Row():
        preview = gr.Dataframe(
            label=strings.DATASETS_PREVIEW, interactive=False, wrap=True, elem_id="datasets-preview", scale=3
        )
        counts = gr.BarPlot(
            x="task",
            y="rows",
            color="dataset",
            y_lim=[0, None],
            y_axis_format="d",
            label=strings.DATASETS_COUNTS,
            elem_id="datasets-task-counts",
            scale=2,
        )
    return selector, preview, counts, new_name, rename, delete, status


def _wire_upload(ctx: StudioContext, h: TabHandles, name: gr.Textbox) -> None:
    def check(paths: list[str] | None) -> str:
        return services.upload_report(services.check_uploads(ctx=ctx, paths=paths)) or strings.DATASETS_REPORT_EMPTY

    def upload(paths: list[str] | None, typed: str | None) -> tuple[str, str]:
        """Only the report (and a state) are outputs, so a refusal marks nothing else of the page as failed."""
        try:
            stored = services.upload_datasets(ctx=ctx, paths=paths, name=typed)
        except ServiceError as error:
            raise gr.Error(str(error), duration=20) from error  # the report below keeps every problem
        names = [d.name for d in stored]
        return strings.DATASETS_STORED.format(count=len(names), names=", ".join(f"'{n}'" for n in names)), names[0]

    def after_upload(first: str) -> tuple[Any, ...]:
        return (*refresh_outputs(ctx, first), None, "")

    gr.on(triggers=None, fn=lambda: refresh_outputs(ctx), outputs=[h.table, h.selector], api_visibility="private")
    h.files.upload(check, inputs=h.files, outputs=h.report, api_name="check_uploads")
    h.files.clear(lambda: strings.DATASETS_REPORT_EMPTY, outputs=h.report, api_visibility="private")
    first = gr.State()
    uploaded = h.upload.click(upload, inputs=[h.files, name], outputs=[h.report, first], api_name="upload_datasets")
    h.changed.append(uploaded)
    uploaded.success(
        after_upload, inputs=first, outputs=[h.table, h.selector, h.files, name], api_visibility="private"
    )
    h.refresh.click(
        lambda selected: refresh_outputs(ctx, selected),
        inputs=h.selector,
        outputs=[h.table, h.selector],
        api_name="list_datasets",
    )


def _wire_browse(
    ctx: StudioContext, h: TabHandles, new_name: gr.Textbox, rename: gr.Button, delete: gr.Button
) -> None:
    def preview(selected: str | None) -> pd.DataFrame:
        return _call(services.preview_dataset, ctx=ctx, name=selected) if selected else None

    def counts(selected: str | None) -> pd.DataFrame:
        """Rows per task of the chosen dataset; of every dataset while none is chosen."""
        return _call(services.task_counts, ctx=ctx, name=selected)

    def do_rename(selected: str | None, typed: str | None) -> tuple[str, str]:
        dataset = _call(services.rename_dataset, ctx=ctx, name=selected, new_name=typed)
        return strings.DATASETS_RENAMED.format(old=selected, new=dataset.name), dataset.name

    def do_delete(selected: str | None) -> tuple[str, None]:
        deleted = _call(services.delete_dataset, ctx=ctx, name=selected)
        return strings.DATASETS_DELETED.format(name=deleted), None

    h.selector.change(preview, inputs=h.selector, outputs=h.preview, api_name="preview_dataset")
    h.selector.change(counts, inputs=h.selector, outputs=h.counts, api_name="task_counts")
    gr.on(triggers=None, fn=lambda: counts(None), outputs=h.counts, api_visibility="private")
    # A refusal ("in use", "name taken") marks only the status line; the table and the selector follow on success.
    chosen = gr.State()
    renamed = rename.click(
        do_rename, inputs=[h.selector, new_name], outputs=[h.status, chosen], api_name="rename_dataset"
    )
    deleted = delete.click(do_delete, inputs=h.selector, outputs=[h.status, chosen], api_name="delete_dataset")
    for event in (renamed, deleted):
        h.changed.append(event)
        event.success(
            lambda name: (*refresh_outputs(ctx, name), ""),
            inputs=chosen,
            outputs=[h.table, h.selector, new_name],
            api_visibility="private",
        )


def _call(fn: Any, **kwargs: Any) -> Any:
    """Run one service function; its refusal becomes a ``gr.Error`` (shown on the page and returned to the API)."""
    try:
        return fn(**kwargs)
    except ServiceError as error:
        raise gr.Error(str(error)) from error
