"""Playground tab: prompt a trained mixture and see its routing per layer and per token; compare; override."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import gradio as gr

from app import strings
from app.context import ServiceError, StudioContext
from app.services import playground as services
from worker.inference import DEFAULT_NEW_TOKENS, MAX_NEW_TOKENS


@dataclass
class TabHandles:
    mixture: gr.Dropdown
    refresh: gr.Button
    prompt: gr.Textbox
    run: gr.Button
    output: gr.Textbox


@dataclass
class _Request:
    """The inputs every action shares: which mixture, what prompt, which task, how many tokens."""

    mixture: gr.Dropdown
    prompt: gr.Textbox
    input_text: gr.Textbox
    task: gr.Dropdown
    tokens: gr.Slider
    about: gr.Markdown  # not an input: what the chosen mixture is made of

    def components(self) -> list[Any]:
        return [self.mixture, self.prompt, self.input_text, self.task, self.tokens]


def _asked(mixture: str | None, prompt: str, input_text: str, task: str | None, tokens: float) -> dict[str, Any]:
    """The shared request values as service keywords, in the order of ``_Request.components``."""
    return {"mixture": mixture, "prompt": prompt, "input_text": input_text, "task": task, "max_new_tokens": tokens}


@contextmanager
def _shown() -> Iterator[None]:
    """A service refusal becomes a message in the page and in the API answer."""
    try:
        yield
    except ServiceError as error:
        raise gr.Error(str(error)) from error


def mixture_choices(ctx: StudioContext, current: str | None = None) -> Any:
    """An update for the mixture dropdown: the trained mixtures, keeping the current one when it is still there."""
    names = services.list_trained_mixtures(ctx=ctx)
    value = current if current in names else (names[0] if names else None)
    return gr.update(choices=names, value=value, info="" if names else strings.PLAYGROUND_NO_TRAINED)


def build(ctx: StudioContext) -> TabHandles:
    """Lay out the tab inside the current ``gr.Tab`` and wire its events."""
    gr.Markdown(strings.PLAYGROUND_INTRO)
    request, refresh = _request_section(ctx)
    run, state = _run_section(ctx, request)
    other, expert = _compare_section(ctx, request)
    disabled = _override_section(ctx, request)
    _wire_describe(ctx, request, other=other, expert=expert, disabled=disabled)
    return TabHandles(mixture=request.mixture, refresh=refresh, prompt=request.prompt, run=run, output=state.output)


def _request_section(ctx: StudioContext) -> tuple[_Request, gr.Button]:
    names = services.list_trained_mixtures(ctx=ctx)
    with gr.Row(equal_height=True):
        mixture = gr.Dropdown(  # no value yet: the page load picks one, and that change describes the mixture
            choices=names,
            value=None,
            label=strings.PLAYGROUND_MIXTURE,
            info=None if names else strings.PLAYGROUND_NO_TRAINED,
            allow_custom_value=True,
            elem_id="playground-mixture",
            scale=3,
        )
        refresh = gr.Button(strings.REFRESH, elem_id="playground-refresh", scale=0, min_width=100)
        task = gr.Dropdown(
            choices=[],
            value=None,
            label=strings.PLAYGROUND_TASK_REQUIRED,
            visible=False,
            allow_custom_value=True,
            elem_id="playground-task",
            scale=2,
        )
        tokens = gr.Slider(
            1,
            MAX_NEW_TOKENS,
            value=DEFAULT_NEW_TOKENS,
            step=1,
            label=strings.PLAYGROUND_TOKENS,
            elem_id="playground-tokens-max",
            scale=2,
        )
    about = gr.Markdown(elem_id="playground-about")
    prompt = gr.Textbox(
        label=strings.PLAYGROUND_PROMPT,
        lines=3,
        placeholder=strings.PLAYGROUND_PROMPT_HINT,
        elem_id="playground-prompt",
    )
    input_text = gr.Textbox(label=strings.PLAYGROUND_INPUT, lines=1, elem_id="playground-input")
    request = _Request(mixture, prompt, input_text, task, tokens, about)

    gr.on(triggers=None, fn=lambda: mixture_choices(ctx), outputs=mixture, api_visibility="private")
    refresh.click(
        lambda current: mixture_choices(ctx, current),
        inputs=mixture,
        outputs=mixture,
        api_name="list_trained_mixtures",
    )
    return request, refresh


@dataclass
class _RunOutputs:
    output: gr.Textbox
    details: gr.Markdown
    layers: gr.Plot
    layer: gr.Dropdown
    tokens: gr.Plot
    groups: gr.Plot
    result: gr.State


def _run_section(ctx: StudioContext, request: _Request) -> tuple[gr.Button, _RunOutputs]:
    run = gr.Button(strings.PLAYGROUND_RUN, variant="primary", elem_id="playground-run")
    output = gr.Textbox(label=strings.PLAYGROUND_OUTPUT, lines=2, interactive=False, elem_id="playground-output")
    details = gr.Markdown(elem_id="playground-details")
    with gr.Row():
        layers = gr.Plot(label=strings.PLAYGROUND_LAYERS, elem_id="playground-layers", format="png", show_label=False)
        with gr.Column():
            layer = gr.Dropdown(
                choices=[], label=strings.PLAYGROUND_LAYER, allow_custom_value=True, elem_id="playground-layer"
            )
            tokens = gr.Plot(
                label=strings.PLAYGROUND_TOKEN_MAP, elem_id="playground-token-map", format="png", show_label=False
            )
    groups = gr.Plot(
        label=strings.PLAYGROUND_GROUPS, visible=False, elem_id="playground-groups", format="png", show_label=False
    )
    outputs = _RunOutputs(output, details, layers, layer, tokens, groups, gr.State())

    def run_prompt(*asked: Any) -> tuple:
        with _shown():
            result = services.run_prompt(ctx=ctx, **_asked(*asked))
            first = result.layer_names[0]
            groups_figure = services.group_figure(result)
            return (
                result.text,
                services.describe_result(result),
                services.layer_heatmap(result),
                gr.update(choices=services.layer_choices(result), value=first),
                services.token_heatmap(result, first),
                gr.update(value=groups_figure, visible=groups_figure is not None),
                result,
            )

    def token_heatmap(result: Any, layer_name: str) -> Any:
        with _shown():
            return services.token_heatmap(result, layer_name)

    gr.on(
        [run.click, request.prompt.submit],
        run_prompt,
        inputs=request.components(),
        outputs=[output, details, layers, layer, tokens, groups, outputs.result],
        api_name="run_prompt",
    )
    layer.input(token_heatmap, inputs=[outputs.result, layer], outputs=tokens, api_name="token_heatmap")
    return run, outputs


def _compare_section(ctx: StudioContext, request: _Request) -> tuple[gr.Dropdown, gr.Dropdown]:
    with gr.Accordion(strings.PLAYGROUND_COMPARE, open=False, elem_id="playground-compare-section"):
        gr.Markdown(strings.PLAYGROUND_COMPARE_HELP)
        with gr.Row(equal_height=True):
            other = gr.Dropdown(
                choices=[],
                value=None,
                label=strings.PLAYGROUND_OTHER_MIXTURE,
                allow_custom_value=True,
                elem_id="playground-compare-mixture",
            )
            expert = gr.Dropdown(
                choices=[],
                value=None,
                label=strings.PLAYGROUND_EXPERT,
                allow_custom_value=True,
                elem_id="playground-compare-expert",
            )
            with_universal = gr.Checkbox(
                value=True, label=strings.PLAYGROUND_WITH_UNIVERSAL, elem_id="playground-compare-universal"
            )
        button = gr.Button(strings.PLAYGROUND_COMPARE_RUN, elem_id="playground-compare")
        with gr.Row():
            with gr.Column():
                left_head = gr.Markdown(elem_id="playground-left-details")
                left_text = gr.Textbox(label=strings.PLAYGROUND_LEFT, interactive=False, elem_id="playground-left")
                left_plot = gr.Plot(show_label=False, elem_id="playground-left-layers", format="png")
            with gr.Column():
                right_head = gr.Markdown(elem_id="playground-right-details")
                right_text = gr.Textbox(label=strings.PLAYGROUND_RIGHT, interactive=False, elem_id="playground-right")
                right_plot = gr.Plot(show_label=False, elem_id="playground-right-layers", format="png")

    def compare(*values: Any) -> tuple:
        *asked, other_name, expert_name, universal = values
        mixture = asked[0]
        with _shown():
            left, right = services.compare(
                ctx=ctx, **_asked(*asked), other_mixture=other_name, expert=expert_name, with_universal=universal
            )
        right_title = f"{other_name}" if other_name else strings.PLAYGROUND_EXPERT_ALONE.format(expert=expert_name)
        return (
            f"**{mixture}** — {services.describe_result(left)}",
            left.text,
            services.layer_heatmap(left, title=f"{mixture}: mean router weight per layer"),
            f"**{right_title}** — {services.describe_result(right)}",
            right.text,
            services.layer_heatmap(right, title=f"{right_title}: mean router weight per layer"),
        )

    button.click(
        compare,
        inputs=[*request.components(), other, expert, with_universal],
        outputs=[left_head, left_text, left_plot, right_head, right_text, right_plot],
        api_name="compare",
    )
    return other, expert


def _override_section(ctx: StudioContext, request: _Request) -> gr.CheckboxGroup:
    with gr.Accordion(strings.PLAYGROUND_OVERRIDE, open=False, elem_id="playground-override-section"):
        gr.Markdown(strings.PLAYGROUND_OVERRIDE_HELP)
        with gr.Row(equal_height=True):
            disabled = gr.CheckboxGroup(choices=[], label=strings.PLAYGROUND_DISABLE, elem_id="playground-disable")
            forced = gr.Textbox(
                label=strings.PLAYGROUND_FORCED,
                placeholder=strings.PLAYGROUND_FORCED_HINT,
                elem_id="playground-forced",
            )
        button = gr.Button(strings.PLAYGROUND_OVERRIDE_RUN, elem_id="playground-override")
        change = gr.Markdown(elem_id="playground-change")
        with gr.Row():
            routed_text = gr.Textbox(
                label=strings.PLAYGROUND_ROUTED, interactive=False, elem_id="playground-override-routed"
            )
            changed_text = gr.Textbox(
                label=strings.PLAYGROUND_OVERRIDDEN, interactive=False, elem_id="playground-override-output"
            )
        changed_plot = gr.Plot(show_label=False, elem_id="playground-override-layers", format="png")

    def run_override(*values: Any) -> tuple:
        *asked, off, weights = values
        with _shown():
            routed, changed = services.run_override(ctx=ctx, **_asked(*asked), disabled=off or [], forced=weights)
        plot = services.layer_heatmap(changed, title=strings.PLAYGROUND_OVERRIDDEN_TITLE)
        return services.describe_change(routed, changed), routed.text, changed.text, plot

    button.click(
        run_override,
        inputs=[*request.components(), disabled, forced],
        outputs=[change, routed_text, changed_text, changed_plot],
        api_name="run_override",
    )
    return disabled


def _wire_describe(
    ctx: StudioContext, request: _Request, *, other: gr.Dropdown, expert: gr.Dropdown, disabled: gr.CheckboxGroup
) -> None:
    """A new mixture choice updates the task picker, the expert lists and the compare choices."""

    def describe_mixture(mixture: str | None) -> tuple:
        others = [name for name in services.list_trained_mixtures(ctx=ctx) if name != mixture]
        if not mixture:
            empty = gr.update(choices=[], value=None)
            return (
                gr.update(visible=False, value=None),
                "",
                gr.update(choices=[], value=[]),
                empty,
                gr.update(choices=others, value=None),
            )
        with _shown():
            about = services.describe_mixture(ctx=ctx, mixture=mixture)
        label = strings.PLAYGROUND_TASK_REQUIRED if about.task_use == "required" else strings.PLAYGROUND_TASK_OPTIONAL
        first = about.tasks[0] if about.task_use == "required" else None
        return (
            gr.update(choices=about.tasks, value=first, visible=about.task_use is not None, label=label),
            strings.PLAYGROUND_ABOUT.format(
                router=about.router, tasks=", ".join(about.tasks), experts=", ".join(about.expert_names)
            ),
            gr.update(choices=about.expert_names, value=[]),
            gr.update(choices=about.expert_names, value=None),
            gr.update(choices=others, value=None),
        )

    request.mixture.change(
        describe_mixture,
        inputs=request.mixture,
        outputs=[request.task, request.about, disabled, expert, other],
        api_name="describe_mixture",
    )
