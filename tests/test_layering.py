"""Floors never import upward: models imports neither gradio, celery, worker nor app; worker never imports app."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _modules(package: str) -> list[str]:
    return sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in (ROOT / package).rglob("*.py")
    )


def _import_with_blocked(modules: list[str], blocked: list[str]) -> subprocess.CompletedProcess[str]:
    code = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
    code += "".join(f"import {module}\n" for module in modules)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("package", "blocked"),
    [("models", ["gradio", "celery", "worker", "app"]), ("worker", ["gradio", "app"])],
)
def test_floor_imports_without_the_floors_above(package: str, blocked: list[str]) -> None:
    result = _import_with_blocked(_modules(package), blocked)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_check_would_catch_an_upward_import() -> None:
    result = _import_with_blocked(["app.main"], ["gradio"])
    assert result.returncode != 0 and "gradio" in result.stderr


def test_gradio_is_at_or_above_the_security_floor() -> None:
    from importlib.metadata import version

    major, minor = (int(part) for part in version("gradio").split(".")[:2])
    assert (major, minor) >= (6, 20)
