"""Experts tab: the expert registry, lineage and export."""

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
    gr.Markdown(strings.EXPERTS_INTRO)
    table = gr.Dataframe(
        value=lambda: services.list_experts(ctx=ctx),
        label="Expert registry",
        interactive=False,
        elem_id="experts-table",
    )
    refresh = gr.Button(strings.REFRESH, elem_id="experts-refresh")

    refresh.click(lambda: services.list_experts(ctx=ctx), outputs=table, api_name="list_experts")
    return TabHandles(table=table, refresh=refresh)
