"""A running studio (in this process) and a headless Chromium driven by Playwright."""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr
import pytest

from app.context import StudioContext
from app.main import build_demo, launch_kwargs
from migrations import upgrade_head
from models.settings import Settings
from tests import services

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def studio(settings: Settings) -> Iterator[tuple[gr.Blocks, str]]:
    """The real page on a free port over a migrated SQLite database; yields the demo and its URL."""
    upgrade_head(settings.db_url)
    ctx = StudioContext(settings=settings)
    demo = build_demo(ctx)
    port = services.free_port()
    demo.launch(**(launch_kwargs(ctx) | {"server_port": port, "prevent_thread_lock": True}))
    yield demo, f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture
def browser() -> Iterator[object]:
    chromium = services.ensure_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        yield instance
        instance.close()
