"""Jobs tab: the queue with progress bars, the selected job's live loss and eval curves, its error, cancel / retry."""

from __future__ import annotations

import hashlib
import html
import uuid
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from app import strings
from app.context import ServiceError, StudioContext
from app.services import jobs as services

REFRESH_EVERY_S = 2.0
BAR_COLOUR = "#8fd19e"


@dataclass
class TabHandles:
    """Components other tabs may use.

    To show a job from another tab (e.g. after "start training"), chain
    ``.success(lambda job_id: select_job(ctx, job_id), inputs=<job id>, outputs=handles.select_outputs)`` and select
    this tab (``gr.Tabs(selected="jobs")``): setting ``selector`` draws the job's detail and curves.
    """

    table: gr.Dataframe
    refresh: gr.Button
    selector: gr.Dropdown
    timer: gr.Timer
    select_outputs: list[gr.components.Component]


@dataclass
class _Detail:
    summary: gr.HTML
    error: gr.Textbox
    loss: gr.LinePlot
    metric: gr.Dropdown
    evals: gr.LinePlot
    events: gr.Dataframe

    @property
    def view(self) -> list[gr.components.Component]:
        """The outputs of ``_detail_values`` then ``_curve_values``, in that order."""
        return [self.summary, self.error, self.events, self.loss, self.evals]


def build(ctx: StudioContext) -> TabHandles:
    """Lay out the tab inside the current ``gr.Tab`` and wire its events."""
    gr.Markdown(strings.JOBS_INTRO)
    table = gr.Dataframe(
        value=lambda: styled(services.list_jobs(ctx=ctx)),
        label=strings.JOBS_TABLE,
        interactive=False,
        max_height=360,
        elem_id="jobs-table",
    )
    selector, refresh, cancel, retry, status = _controls_section()
    detail = _detail_section()
    timer = gr.Timer(REFRESH_EVERY_S)
    seen = gr.State({})
    _wire_view(ctx, table, selector, refresh, detail)
    _wire_actions(ctx, table, selector, cancel, retry, status, detail)
    _wire_timer(ctx, timer, seen, table, selector, detail)
    return TabHandles(table, refresh, selector, timer, [table, selector])


def select_job(ctx: StudioContext, job: str | uuid.UUID) -> tuple[Any, Any]:
    """Values for ``TabHandles.select_outputs`` (table, selector): the queue now, with ``job`` selected."""
    choices = services.job_choices(ctx=ctx)
    return styled(services.list_jobs(ctx=ctx)), gr.Dropdown(choices=choices, value=services.short_id(job))


def styled(frame: pd.DataFrame) -> Any:
    """The jobs table with a progress bar drawn in its progress cells (the data itself stays numeric)."""
    if frame.empty:
        return frame
    return frame.style.bar(subset=["progress"], vmin=0, vmax=100, color=BAR_COLOUR).format({"progress": "{:.0f}%"})


def _controls_section() -> tuple[gr.Dropdown, gr.Button, gr.Button, gr.Button, gr.Markdown]:
    with gr.Row():
        selector = gr.Dropdown(
            label=strings.JOBS_SELECT, choices=[], value=None, allow_custom_value=True, elem_id="jobs-select", scale=3
        )
        refresh = gr.Button(strings.REFRESH, size="sm", elem_id="jobs-refresh", scale=0, min_width=90)
        cancel = gr.Button(strings.JOBS_CANCEL, variant="stop", size="sm", elem_id="jobs-cancel", scale=0)
        retry = gr.Button(strings.JOBS_RETRY, variant="primary", size="sm", elem_id="jobs-retry", scale=0)
    status = gr.Markdown(elem_id="jobs-status")
    gr.Markdown(strings.JOBS_HELP)
    return selector, refresh, cancel, retry, status


def _detail_section() -> _Detail:
    summary = gr.HTML(strings.JOBS_SUMMARY_EMPTY, elem_id="jobs-summary")
    error = gr.Textbox(
        label=strings.JOBS_ERROR, placeholder=strings.JOBS_NO_ERROR, interactive=False, lines=2, elem_id="jobs-error"
    )
    with gr.Row():
        loss = gr.LinePlot(
            None, x="step", y="value", color="task", y_lim=[0, None], label=strings.JOBS_LOSS, elem_id="jobs-loss"
        )
        with gr.Column():
            metric = gr.Dropdown(
                label=strings.JOBS_EVAL_METRIC,
                choices=list(services.EVAL_METRICS),
                value=services.DEFAULT_EVAL_METRIC,
                allow_custom_value=True,  # so an unknown metric gets the service's message, with the choices
                elem_id="jobs-eval-metric",
            )
            evals = gr.LinePlot(  # every metric, and the achievement weights, lie in [0, 1 + ε]
                None, x="step", y="value", color="task", y_lim=[0, None], label=strings.JOBS_EVAL, elem_id="jobs-eval"
            )
    with gr.Accordion(strings.JOBS_EVENTS, open=False):
        events = gr.Dataframe(
            value=pd.DataFrame(columns=services.EVENT_COLUMNS),
            interactive=False,
            max_height=300,
            elem_id="jobs-events",
        )
    return _Detail(summary, error, loss, metric, evals, events)


def _wire_view(ctx: StudioContext, table: gr.Dataframe, selector: gr.Dropdown, refresh: gr.Button, d: _Detail) -> None:
    def list_jobs() -> Any:
        return styled(_call(services.list_jobs, ctx=ctx))

    def job_detail(job: str | None) -> tuple[Any, ...]:
        return _detail_values(_call(services.job_detail, ctx=ctx, job=job) if job else None)

    def job_curves(job: str | None, metric: str | None) -> tuple[Any, ...]:
        return _curve_values(_call(services.job_curves, ctx=ctx, job=job, metric=metric) if job else None)

    def pick(event: gr.SelectData) -> str | None:
        row = event.row_value or []
        return row[0] if row else None

    def choices(job: str | None) -> Any:
        return gr.Dropdown(choices=services.job_choices(ctx=ctx), value=job)

    gr.on(triggers=None, fn=lambda: choices(None), outputs=selector, api_visibility="private")
    refresh.click(list_jobs, outputs=table, api_name="list_jobs")
    refresh.click(choices, inputs=selector, outputs=selector, api_visibility="private")
    table.select(pick, outputs=selector, api_visibility="private")
    selector.change(job_detail, inputs=selector, outputs=[d.summary, d.error, d.events], api_name="job_detail")
    gr.on(
        triggers=[selector.change, d.metric.input],
        fn=job_curves,
        inputs=[selector, d.metric],
        outputs=[d.loss, d.evals],
        api_name="job_curves",
    )


def _wire_actions(
    ctx: StudioContext,
    table: gr.Dataframe,
    selector: gr.Dropdown,
    cancel: gr.Button,
    retry: gr.Button,
    status: gr.Markdown,
    d: _Detail,
) -> None:
    def redraw(job: str | None, metric: str | None) -> tuple[Any, ...]:
        poll = services.poll_jobs(ctx=ctx, job=job, metric=metric or services.DEFAULT_EVAL_METRIC)
        return styled(poll.table), *_detail_values(poll.detail), *_curve_values(poll.curves)

    def cancel_job(job: str | None) -> str:
        return _call(services.cancel_job, ctx=ctx, job=job)

    def retry_job(job: str | None) -> str:
        return _call(services.retry_job, ctx=ctx, job=job)

    for event in (
        cancel.click(cancel_job, inputs=selector, outputs=status, api_name="cancel_job"),
        retry.click(retry_job, inputs=selector, outputs=status, api_name="retry_job"),
    ):
        event.success(redraw, inputs=[selector, d.metric], outputs=[table, *d.view], api_visibility="private")


def _wire_timer(
    ctx: StudioContext, timer: gr.Timer, seen: gr.State, table: gr.Dataframe, selector: gr.Dropdown, d: _Detail
) -> None:
    def tick(job: str | None, metric: str | None, before: dict[str, Any] | None) -> tuple[Any, ...]:
        """Only what changed goes back: an idle page costs one query and sends nothing."""
        before = before or {}
        try:
            poll = services.poll_jobs(ctx=ctx, job=job, seen=before.get("job", ""), metric=metric or "")
        except ServiceError:
            return (gr.skip(),) * (4 + len(d.view))
        digest = hashlib.sha1(poll.table.to_csv().encode()).hexdigest()
        now = {"job": poll.seen, "jobs": poll.jobs, "table": digest}
        rows = styled(poll.table) if digest != before.get("table") else gr.skip()
        picks = gr.Dropdown(choices=poll.jobs) if poll.jobs != before.get("jobs") else gr.skip()
        if poll.detail is None or poll.curves is None:
            return rows, picks, now, *(gr.skip(),) * len(d.view)
        return rows, picks, now, *_detail_values(poll.detail), *_curve_values(poll.curves)

    timer.tick(
        tick,
        inputs=[selector, d.metric, seen],
        outputs=[table, selector, seen, *d.view],
        api_visibility="private",
        show_progress="hidden",
        concurrency_limit=None,
    )


def _detail_values(detail: services.JobDetail | None) -> tuple[str, str, pd.DataFrame]:
    """Summary (with a progress bar), error box and events of a job; placeholders when none is chosen."""
    if detail is None:
        return (
            strings.JOBS_SUMMARY_EMPTY,
            "",
            pd.DataFrame(columns=services.EVENT_COLUMNS),
        )
    e = html.escape
    text = strings.JOBS_SUMMARY.format(
        job=e(detail.job),
        mixture=e(detail.mixture),
        state=e(detail.state),
        stage=strings.JOBS_SUMMARY_STAGE.format(stage=e(detail.stage)) if detail.stage else "",
        step=detail.step,
        total=detail.total_steps,
        progress=detail.progress,
        attempt=detail.attempt,
        eta=strings.JOBS_SUMMARY_ETA.format(eta=e(detail.eta)) if detail.eta else "",
        checkpoint=(
            strings.JOBS_SUMMARY_CHECKPOINT.format(step=detail.checkpoint_step)
            if detail.checkpoint_step is not None
            else ""
        ),
    )
    bar = f'<progress value="{detail.progress:.1f}" max="100" style="width:100%"></progress>'
    return f"<div>{text}</div>{bar}", detail.error, detail.events


def _curve_values(curves: services.JobCurves | None) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """An empty curve goes out as None: a LinePlot once given an empty frame draws no lines afterwards (Gradio 6)."""
    if curves is None:
        return None, None
    return (None if curves.loss.empty else curves.loss), (None if curves.evals.empty else curves.evals)


def _call(fn: Any, **kwargs: Any) -> Any:
    """Run one service function; its refusal becomes a ``gr.Error`` (shown on the page and returned to the API)."""
    try:
        return fn(**kwargs)
    except ServiceError as error:
        raise gr.Error(str(error)) from error
