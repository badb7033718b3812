"""Experts tab: the registry as a filterable table, an expert's lineage and metrics, export, delete and reuse."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from app import strings
from app.context import ServiceError, StudioContext
from app.services import experts as services


@dataclass
class TabHandles:
    """Components other tabs may use.

    ``use_event`` is the "Use in a new mixture" click; it has already written the spec into ``spec`` (a dict, the
    composer's starting point): chain ``use_event.success(fn, inputs=spec, outputs=[...composer...])`` to prefill
    the composer and switch to its tab.
    """

    table: gr.Dataframe
    refresh: gr.Button
    selector: gr.Dropdown
    use_button: gr.Button
    spec: gr.JSON
    use_event: Any
    refresh_on: Callable[[Any], None]  # refresh_on(trigger): redo the table and filters when ``trigger`` fires


@dataclass
class _Filters:
    base: gr.Dropdown
    task: gr.Dropdown
    kind: gr.Dropdown
    mixture: gr.Dropdown
    metric: gr.Dropdown
    search: gr.Textbox

    @property
    def inputs(self) -> list[gr.components.Component]:
        return [self.base, self.task, self.kind, self.mixture, self.metric, self.search]

    def with_selector(self, selector: gr.Dropdown) -> list[gr.components.Component]:
        """The outputs of ``filter_choices``, in its order."""
        return [self.base, self.task, self.mixture, self.metric, selector]


@dataclass
class _Detail:
    lineage: gr.Markdown
    metrics: gr.Dataframe
    with_universal: gr.Checkbox
    export: gr.Button
    file: gr.File
    delete: gr.Button
    status: gr.Markdown
    use: gr.Button
    spec: gr.JSON


def _any(values: list[str]) -> list[tuple[str, str]]:
    """Dropdown choices with "All" (the empty value, no filter) first."""
    return [(strings.EXPERTS_ALL, ""), *((v, v) for v in values)]


def filter_choices(ctx: StudioContext, selected: str | None = None) -> tuple[Any, ...]:
    """Updates for the base, task, mixture and metric filters and the selector: what the registry holds now."""
    found = services.expert_filters(ctx=ctx)
    return (
        gr.Dropdown(choices=_any(found.base_models)),
        gr.Dropdown(choices=_any(found.tasks)),
        gr.Dropdown(choices=_any(found.mixtures)),
        gr.Dropdown(choices=found.metrics),
        gr.Dropdown(choices=found.experts, value=selected if selected in found.experts else None),
    )


def build(ctx: StudioContext) -> TabHandles:
    """Lay out the tab inside the current ``gr.Tab`` and wire its events."""
    gr.Markdown(strings.EXPERTS_INTRO)
    filters, refresh = _filter_section()
    table = gr.Dataframe(
        value=lambda: services.list_experts(ctx=ctx),
        label=strings.EXPERTS_TABLE,
        interactive=False,
        max_height=420,
        elem_id="experts-table",
    )
    selector, detail = _detail_section()
    refresh_on = _wire_table(ctx, filters, refresh, table, selector)
    _wire_detail(ctx, filters, table, selector, detail)
    use_event = detail.use.click(
        lambda expert: _call(services.expert_to_spec, ctx=ctx, expert=expert),
        inputs=selector,
        outputs=detail.spec,
        api_name="expert_to_spec",
    )
    return TabHandles(table, refresh, selector, detail.use, detail.spec, use_event, refresh_on)


def _filter_section() -> tuple[_Filters, gr.Button]:
    def dropdown(label: str, elem: str, choices: list[tuple[str, str]] | list[str], value: str) -> gr.Dropdown:
        return gr.Dropdown(
            label=label,
            choices=choices,
            value=value,
            allow_custom_value=True,
            elem_id=f"experts-{elem}",
            min_width=140,
        )

    with gr.Row(equal_height=True):
        filters = _Filters(
            base=dropdown(strings.EXPERTS_BASE, "base", _any([]), ""),
            task=dropdown(strings.EXPERTS_TASK, "task", _any([]), ""),
            kind=dropdown(strings.EXPERTS_KIND, "kind", _any(["universal", "specific"]), ""),
            mixture=dropdown(strings.EXPERTS_MIXTURE, "mixture", _any([]), ""),
            metric=dropdown(strings.EXPERTS_METRIC, "metric", [services.DEFAULT_METRIC], services.DEFAULT_METRIC),
            search=gr.Textbox(
                label=strings.EXPERTS_SEARCH,
                placeholder=strings.EXPERTS_SEARCH_HINT,
                elem_id="experts-search",
                min_width=180,
            ),
        )
        refresh = gr.Button(strings.REFRESH, size="sm", elem_id="experts-refresh", scale=0, min_width=90)
    return filters, refresh


def _detail_section() -> tuple[gr.Dropdown, _Detail]:
    selector = gr.Dropdown(
        label=strings.EXPERTS_SELECT, choices=[], value=None, allow_custom_value=True, elem_id="experts-select"
    )
    with gr.Row():
        with gr.Column(scale=3):
            lineage = gr.Markdown(strings.EXPERTS_LINEAGE_EMPTY, elem_id="experts-lineage")
        metrics = gr.Dataframe(
            value=pd.DataFrame(columns=["task"]),
            label=strings.EXPERTS_METRICS,
            interactive=False,
            elem_id="experts-metrics",
            scale=2,
        )
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            with_universal = gr.Checkbox(
                value=True, label=strings.EXPERTS_WITH_UNIVERSAL, elem_id="experts-with-universal"
            )
            export = gr.Button(strings.EXPERTS_EXPORT, variant="primary", elem_id="experts-export")
            use = gr.Button(strings.EXPERTS_USE, elem_id="experts-use")
            delete = gr.Button(strings.EXPERTS_DELETE, variant="stop", elem_id="experts-delete")
        with gr.Column(scale=2):
            file = gr.File(
                label=strings.EXPERTS_EXPORT_FILE, interactive=False, height=120, elem_id="experts-export-file"
            )
            status = gr.Markdown(elem_id="experts-status")
    gr.Markdown(f"{strings.EXPERTS_EXPORT_HELP}\n\n{strings.EXPERTS_DELETE_RULE}")
    with gr.Accordion(strings.EXPERTS_SPEC, open=False):
        spec = gr.JSON(label=strings.EXPERTS_SPEC, elem_id="experts-spec")
    return selector, _Detail(lineage, metrics, with_universal, export, file, delete, status, use, spec)


def _wire_table(
    ctx: StudioContext, filters: _Filters, refresh: gr.Button, table: gr.Dataframe, selector: gr.Dropdown
) -> Callable[[Any], None]:
    def list_experts(
        base_model: str | None,
        task: str | None,
        kind: str | None,
        mixture: str | None,
        metric: str | None,
        search: str | None,
    ) -> pd.DataFrame:
        filters_given = _filter_kwargs(base_model, task, kind, mixture, metric, search)
        return _call(services.list_experts, ctx=ctx, **filters_given)

    def pick(event: gr.SelectData) -> str | None:
        row = event.row_value or []
        return row[0] if row else None

    choice_outputs = filters.with_selector(selector)
    gr.on(triggers=None, fn=lambda: filter_choices(ctx), outputs=choice_outputs, api_visibility="private")
    gr.on(
        triggers=[refresh.click, filters.search.submit, *(d.change for d in filters.inputs[:5])],
        fn=list_experts,
        inputs=filters.inputs,
        outputs=table,
        api_name="list_experts",
    )
    refresh.click(
        lambda chosen: filter_choices(ctx, chosen), inputs=selector, outputs=choice_outputs, api_visibility="private"
    )
    table.select(pick, outputs=selector, api_visibility="private")

    def refresh_on(trigger: Any) -> None:
        """Experts trained since the page loaded appear when ``trigger`` (the tab's select) fires."""
        trigger(list_experts, inputs=filters.inputs, outputs=table, api_visibility="private").then(
            lambda chosen: filter_choices(ctx, chosen),
            inputs=selector,
            outputs=choice_outputs,
            api_visibility="private",
        )

    return refresh_on


def _wire_detail(
    ctx: StudioContext, filters: _Filters, table: gr.Dataframe, selector: gr.Dropdown, d: _Detail
) -> None:
    def expert_lineage(expert: str | None) -> str:
        return _call(services.expert_lineage, ctx=ctx, expert=expert) if expert else strings.EXPERTS_LINEAGE_EMPTY

    def expert_metrics(expert: str | None) -> pd.DataFrame | None:
        return _call(services.expert_metrics, ctx=ctx, expert=expert) if expert else None

    def export_expert(expert: str | None, with_universal: bool) -> str:
        return str(_call(services.export_expert, ctx=ctx, expert=expert, with_universal=bool(with_universal)))

    def delete_expert(expert: str | None) -> str:
        return _call(services.delete_expert, ctx=ctx, expert=expert)

    selector.change(expert_lineage, inputs=selector, outputs=d.lineage, api_name="expert_lineage")
    selector.change(expert_metrics, inputs=selector, outputs=d.metrics, api_name="expert_metrics")
    d.export.click(export_expert, inputs=[selector, d.with_universal], outputs=d.file, api_name="export_expert")
    choice_outputs = filters.with_selector(selector)
    deleted = d.delete.click(delete_expert, inputs=selector, outputs=d.status, api_name="delete_expert")
    deleted.success(
        lambda *values: _call(services.list_experts, ctx=ctx, **_filter_kwargs(*values)),
        inputs=filters.inputs,
        outputs=table,
        api_visibility="private",
    ).then(lambda: filter_choices(ctx), outputs=choice_outputs, api_visibility="private")


def _filter_kwargs(base: Any, task: Any, kind: Any, mixture: Any, metric: Any, search: Any) -> dict[str, str]:
    return {
        "base_model": base or "",
        "task": task or "",
        "kind": kind or "",
        "mixture": mixture or "",
        "metric": metric or services.DEFAULT_METRIC,
        "search": search or "",
    }


def _call(fn: Any, **kwargs: Any) -> Any:
    """Run one service function; its refusal becomes a ``gr.Error`` (shown on the page and returned to the API)."""
    try:
        return fn(**kwargs)
    except ServiceError as error:
        raise gr.Error(str(error)) from error
