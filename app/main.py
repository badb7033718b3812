"""Builds the studio page from its tabs, wires the hand-offs between them, and launches it with the security
settings of RELIABILITY.md §4."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import gradio as gr

from app import strings
from app.context import StudioContext
from app.services.datasets import dataset_names
from app.tabs import compose, datasets, experts, jobs, playground

TABS: tuple[tuple[str, ModuleType], ...] = (
    (strings.TAB_DATASETS, datasets),
    (strings.TAB_COMPOSE, compose),
    (strings.TAB_JOBS, jobs),
    (strings.TAB_EXPERTS, experts),
    (strings.TAB_PLAYGROUND, playground),
)


def tab_id(label: str) -> str:
    return label.lower()


def build_demo(ctx: StudioContext | None = None) -> gr.Blocks:
    """The whole page: a header, one tab per module in ``TABS``, and the events that lead from one tab to the next."""
    ctx = ctx or StudioContext()
    with gr.Blocks(title=strings.TITLE, delete_cache=(3600, 86_400)) as demo:
        gr.Markdown(f"# {strings.TITLE}\n{strings.SUBTITLE}")
        handles: dict[str, Any] = {}
        shown: dict[str, gr.Tab] = {}
        with gr.Tabs() as tabs:
            for label, module in TABS:
                with gr.Tab(label, id=tab_id(label)) as shown[tab_id(label)]:
                    handles[tab_id(label)] = module.build(ctx)
        _wire_hand_offs(ctx, tabs, handles)
        _wire_refresh_on_show(ctx, shown, handles)
    demo.queue(default_concurrency_limit=1, max_size=64, api_open=False)
    return demo


def _wire_hand_offs(ctx: StudioContext, tabs: gr.Tabs, handles: dict[str, Any]) -> None:
    """New datasets reach the composer; "use in a new mixture" opens the composer; "start training" opens the job."""
    composer, queue = handles["compose"], handles["jobs"]

    def dataset_choices() -> Any:
        return gr.Dropdown(choices=dataset_names(ctx=ctx))

    for event in handles["datasets"].changed:
        event.success(dataset_choices, outputs=composer.datasets, api_visibility="private")

    handles["experts"].use_event.success(
        lambda spec: compose.prefill_from_spec(spec, ctx),
        inputs=handles["experts"].spec,
        outputs=composer.prefill_outputs,
        api_visibility="private",
    ).then(lambda: gr.Tabs(selected="compose"), outputs=tabs, api_visibility="private")

    composer.start_event.success(
        lambda job_id: jobs.select_job(ctx, job_id),
        inputs=composer.job_id,
        outputs=queue.select_outputs,
        api_visibility="private",
    ).then(lambda: gr.Tabs(selected="jobs"), outputs=tabs, api_visibility="private")


def _wire_refresh_on_show(ctx: StudioContext, shown: dict[str, gr.Tab], handles: dict[str, Any]) -> None:
    """Tabs whose content a job changes elsewhere (new experts, newly trained mixtures) refresh when opened."""
    handles["experts"].refresh_on(shown["experts"].select)
    mixture = handles["playground"].mixture
    shown["playground"].select(
        lambda current: playground.mixture_choices(ctx, current),
        inputs=mixture,
        outputs=mixture,
        api_visibility="private",
    )


# Gradio 6 takes page CSS at launch. Lineage steps ("dataset", "mixture") stay on one line in their narrow column.
PAGE_CSS = "#experts-lineage td:first-child { white-space: nowrap; }"


def launch_kwargs(ctx: StudioContext) -> dict[str, Any]:
    """Upload cap, no extra served paths, the data dir blocked, monitoring off, errors only as messages."""
    return {
        "css": PAGE_CSS,
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
