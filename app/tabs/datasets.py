"""Datasets tab: upload, validate and preview task datasets."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from app import services, strings
from app.services import StudioContext


@dataclass
class TabHandles:
    table: gr.Dataframe
    refresh: gr.Button


def build(ctx: StudioContext) -> TabHandles:
    """Lay out the tab inside the current ``gr.Tab`` and wire its events."""
    gr.Markdown(strings.DATASETS_INTRO)
    table = gr.Dataframe(
        value=lambda: services.list_datasets(ctx=ctx),
        label="Registered datasets",
        interactive=False,
        elem_id="datasets-table",
    )
    refresh = gr.Button(strings.REFRESH, elem_id="datasets-refresh")

    refresh.click(lambda: services.list_datasets(ctx=ctx), outputs=table, api_name="list_datasets")
    return TabHandles(table=table, refresh=refresh)
