"""Gradio's own routes on the real launched studio (RELIABILITY.md §4): upload cap, file access, monitoring, queue.

Requests go over real HTTP; traversal payloads are sent with ``http.client`` so that no client library normalises
the ``..`` segments away before they reach the server.
"""

from __future__ import annotations

import http.client
import importlib.metadata
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import sqlalchemy as sa
from packaging.requirements import Requirement
from packaging.version import Version

from app.context import StudioContext
from app.main import build_demo, launch_kwargs
from app.services.datasets import create_dataset
from migrations import upgrade_head
from models.registry import Dataset
from models.settings import Settings
from tests import services

SECRET = "artifact-content-that-must-not-leak"
Launch = Callable[..., tuple[StudioContext, str]]


@pytest.fixture
def launch(data_dir: Path) -> Iterator[Launch]:
    """Start the real page with ``launch_kwargs`` (plus overrides) on a free port; closed at teardown."""
    demos = []

    def start(settings: Settings | None = None, **overrides: object) -> tuple[StudioContext, str]:
        settings = settings or Settings(studio_data_dir=data_dir)
        upgrade_head(settings.db_url)
        ctx = StudioContext(settings=settings)
        demo = build_demo(ctx)
        port = services.free_port()
        demo.launch(**(launch_kwargs(ctx) | {"server_port": port, "prevent_thread_lock": True} | overrides))
        demos.append(demo)
        return ctx, f"http://127.0.0.1:{port}"

    yield start
    for demo in demos:
        demo.close()


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (no dot-segment normalisation)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def upload(url: str, size: int) -> httpx.Response:
    return httpx.post(f"{url}/gradio_api/upload", files=[("files", ("rows.jsonl", b"x" * size))], timeout=30)


def nothing_registered(ctx: StudioContext) -> bool:
    with ctx.session() as s:
        return s.scalar(sa.select(sa.func.count()).select_from(Dataset)) == 0 and ctx.store.list() == []


# --- upload size ------------------------------------------------------------------------------------------------


def test_upload_over_a_tiny_max_file_size_is_413(launch: Launch) -> None:
    ctx, url = launch(max_file_size="1kb")
    refused = upload(url, 2048)
    assert refused.status_code == 413
    assert "maximum allowed size of 1024 bytes" in refused.text
    assert upload(url, 100).status_code == 200  # the route itself works: it is the size that is refused
    assert nothing_registered(ctx)


def test_the_configured_upload_limit_is_the_pages_max_file_size(launch: Launch, data_dir: Path) -> None:
    ctx, url = launch(Settings(studio_data_dir=data_dir, max_upload_mb=1))
    assert launch_kwargs(ctx)["max_file_size"] == 1 << 20
    assert upload(url, (1 << 20) + 1).status_code == 413
    assert upload(url, 1 << 10).status_code == 200


# --- file access ------------------------------------------------------------------------------------------------


def test_file_route_refuses_traversal_to_the_database_data_dir_and_system_files(launch: Launch) -> None:
    ctx, url = launch()
    dataset = create_dataset(
        ctx=ctx, filename="secret.jsonl", data=f'{{"instruction": "{SECRET}", "output": "x"}}\n'.encode()
    )
    db_file = Path(sa.engine.make_url(ctx.settings.db_url).database or "")
    artifact = Path(ctx.store.path(dataset.artifact_key))
    data_dir = ctx.settings.studio_data_dir
    assert db_file.is_file() and artifact.is_file()

    cached = upload(url, 10).json()[0]  # a file Gradio itself holds: the control that the route serves files
    status, body = raw_get(url, f"/gradio_api/file={cached}")
    assert (status, body) == (200, b"x" * 10)

    cache = Path(cached).parent
    up = "/".join([".."] * (len(cache.parts) + 2))
    targets = [db_file, artifact, data_dir, Path("/etc/passwd")]
    payloads = [str(t) for t in targets]
    payloads += [f"{cache}/{up}{t}" for t in targets]  # out of Gradio's cache with '..'
    payloads += [f"../../../../../../..{t}" for t in targets]
    payloads += ["..\\..\\..\\..\\..\\..\\etc\\passwd", "pyproject.toml", str(Path.cwd() / "pyproject.toml")]
    leaks = []
    for payload in payloads:
        for written in (payload, quote(payload, safe=""), quote(quote(payload, safe=""), safe="")):
            status, body = raw_get(url, f"/gradio_api/file={written}")
            if status not in (403, 404) or SECRET.encode() in body or b"root:" in body or b"SQLite format" in body:
                leaks.append((written, status, body[:80]))
    assert leaks == []


def test_launch_settings_serve_no_extra_paths(settings: Settings) -> None:
    kwargs = launch_kwargs(StudioContext(settings=settings))
    assert kwargs["allowed_paths"] == []
    assert str(settings.studio_data_dir) in kwargs["blocked_paths"]
    assert kwargs["enable_monitoring"] is False and kwargs["show_error"] is False and kwargs["strict_cors"] is True
    assert kwargs["server_name"] == "127.0.0.1"


# --- monitoring and the queue -----------------------------------------------------------------------------------


def test_monitoring_is_off(launch: Launch) -> None:
    """Gradio 6 answers 403 'Monitoring is not enabled.' on its monitoring routes (404 under /gradio_api)."""
    _, url = launch()
    for path in ("/monitoring", "/monitoring/summary", "/monitoring/some-key", "/gradio_api/monitoring"):
        status, body = raw_get(url, path)
        assert status in (403, 404), (path, status, body[:80])
        assert b"See console" not in body


def test_monitoring_summary_is_served_when_enabled(launch: Launch) -> None:
    """The control for the test above: the same route answers when monitoring is on."""
    _, url = launch(enable_monitoring=True)
    assert raw_get(url, "/monitoring/summary")[0] == 200


def test_rest_routes_do_not_skip_the_queue(launch: Launch) -> None:
    _, url = launch()
    for route in ("api", "run"):
        response = httpx.post(f"{url}/gradio_api/{route}/list_datasets", json={"data": [None]}, timeout=30)
        assert response.status_code == 404
        assert "join the queue" in response.text


# --- dependency floor -------------------------------------------------------------------------------------------


def test_gradio_is_at_least_the_security_floor() -> None:
    """6.20 enforces max_file_size on /component_server and proxies /file=<url> safely (RELIABILITY.md §4)."""
    installed = Version(importlib.metadata.version("gradio"))
    assert Version("6.20") <= installed < Version("7")
    declared = [Requirement(r) for r in importlib.metadata.requires("mole-studio") or []]
    gradio = next(r for r in declared if r.name == "gradio")
    assert not gradio.specifier.contains("6.19.9") and gradio.specifier.contains(str(installed))
