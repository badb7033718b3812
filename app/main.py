"""Builds the studio page from its tabs and launches it with the security settings of RELIABILITY.md §4."""

from __future__ import annotations

from typing import Any

import gradio as gr

from app import strings
from app.services import StudioContext
from app.tabs import compose, datasets, experts, jobs, playground

TABS = (
    (strings.TAB_DATASETS, datasets),
    (strings.TAB_COMPOSE, compose),
    (strings.TAB_JOBS, jobs),
    (strings.TAB_EXPERTS, experts),
    (strings.TAB_PLAYGROUND, playground),
)


def build_demo(ctx: StudioContext | None = None) -> gr.Blocks:
    """The whole page: a header and one tab per module in ``TABS``."""
    ctx = ctx or StudioContext()
    with gr.Blocks(title=strings.TITLE, delete_cache=(3600, 86_400)) as demo:
        gr.Markdown(f"# {strings.TITLE}\n{strings.SUBTITLE}")
        with gr.Tabs():
            for label, module in TABS:
                with gr.Tab(label, id=label.lower()):
                    module.build(ctx)
    demo.queue(default_concurrency_limit=1, max_size=64, api_open=False)
    return demo


def launch_kwargs(ctx: StudioContext) -> dict[str, Any]:
    """Upload cap, no extra served paths, the data dir blocked, monitoring off, errors only as messages."""
    return {
        "server_name": ctx.settings.host,
        "server_port": ctx.settings.port,
        "max_file_size": ctx.settings.max_upload_bytes,
        "allowed_paths": [],
        "blocked_paths": [str(ctx.settings.studio_data_dir)],
        "enable_monitoring": False,
        "strict_cors": True,
        "show_error": False,
        "quiet": True,
    }
