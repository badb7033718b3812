"""Playground tab: prompt a trained mixture and see its routing weights per layer and per token."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from app import strings
from app.services import StudioContext


@dataclass
class TabHandles:
    prompt: gr.Textbox


def build(ctx: StudioContext) -> TabHandles:
    """Lay out the tab inside the current ``gr.Tab``; generation arrives with the engine."""
    gr.Markdown(strings.PLAYGROUND_INTRO)
    prompt = gr.Textbox(
        label="Prompt",
        lines=3,
        elem_id="playground-prompt",
        interactive=False,
        placeholder="Available once a mixture is trained.",
    )
    return TabHandles(prompt=prompt)
