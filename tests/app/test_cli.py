"""``mole-studio serve`` as a user runs it: migrates, starts its worker, answers 200, stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from app.cli import build_parser
from migrations import current_revision
from models.settings import Settings
from tests import services

ROOT = Path(__file__).resolve().parents[2]


def _wait_for_200(url: str, process: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, "the studio exited before serving"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer 200 within {seconds} s")


def test_parser_knows_the_sub_commands() -> None:
    parser = build_parser()
    for command in ("serve", "worker", "migrate"):
        assert parser.parse_args([command]).command == command
    with pytest.raises(SystemExit):
        parser.parse_args(["fly"])


@pytest.mark.slow
def test_serve_answers_200_and_ctrl_c_stops_app_and_worker(settings: Settings, tmp_path: Path) -> None:
    port = services.free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env=os.environ | {"STUDIO_DATA_DIR": str(settings.studio_data_dir)},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_for_200(f"http://127.0.0.1:{port}/", process, 90)
        assert current_revision(settings.db_url) is not None  # serve migrated the database
        children = psutil.Process(process.pid).children(recursive=True)
        assert any("worker" in " ".join(child.cmdline()) for child in children), "no embedded worker started"
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        assert process.wait(60) == 0
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert alive == [], f"left running after Ctrl-C: {[p.pid for p in alive]}"
        assert f"running at http://127.0.0.1:{port}" in (tmp_path / "serve.log").read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
