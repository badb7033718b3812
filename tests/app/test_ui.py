"""The page in a real headless Chromium: the five tabs are there and each one opens."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.main import TABS

pytestmark = pytest.mark.ui


def test_page_shows_the_five_tabs(studio: tuple[object, str], browser: object, artifacts_dir: Path) -> None:
    _, url = studio
    page = browser.new_page(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    page.goto(url, wait_until="load")
    tabs = page.get_by_role("tab")
    tabs.first.wait_for(timeout=30_000)
    names = [name.strip() for name in tabs.all_inner_texts()]
    assert names == [label for label, _ in TABS]
    for label, _ in TABS:
        page.get_by_role("tab", name=label).click()
        assert page.get_by_role("tab", name=label).get_attribute("aria-selected") == "true"
        page.screenshot(path=str(artifacts_dir / f"shell-{label.lower()}.png"))
    page.close()
