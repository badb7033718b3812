"""Jobs tab: training jobs, progress and live loss curves."""

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
    gr.Markdown(strings.JOBS_INTRO)
    table = gr.Dataframe(
        value=lambda: services.list_jobs(ctx=ctx), label="Jobs", interactive=False, elem_id="jobs-table"
    )
    refresh = gr.Button(strings.REFRESH, elem_id="jobs-refresh")

    refresh.click(lambda: services.list_jobs(ctx=ctx), outputs=table, api_name="list_jobs")
    return TabHandles(table=table, refresh=refresh)
