"""Compose tab: the no-code mixture composer."""

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
    gr.Markdown(strings.COMPOSE_INTRO)
    table = gr.Dataframe(
        value=lambda: services.list_mixtures(ctx=ctx),
        label="Saved mixtures",
        interactive=False,
        elem_id="compose-table",
    )
    refresh = gr.Button(strings.REFRESH, elem_id="compose-refresh")

    refresh.click(lambda: services.list_mixtures(ctx=ctx), outputs=table, api_name="list_mixtures")
    return TabHandles(table=table, refresh=refresh)
