"""Real services for tests: find them, start them when down, and fail (never skip) under CI when missing.

A skipped Redis or PostgreSQL test in CI would hide a broken install step, so ``CI=true`` turns every
"service missing" into a failure. Locally a developer without the service gets a skip that says why.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
POSTGRES_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))

_START_REDIS = [
    "redis-server",
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "-::1",
    "--port",
    str(REDIS_PORT),
    "--save",
    "",
    "--appendonly",
    "no",
    "--dir",
    "/var/lib/redis",
    "--logfile",
    "/var/log/redis/ci.log",
]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing(what: str) -> None:
    """Fail under CI, skip elsewhere."""
    message = f"{what} is not available"
    if in_ci():
        pytest.fail(f"{message} (CI=true: a missing service is a failure, not a skip)")
    pytest.skip(message)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait_for_port(host: str, port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if port_open(host, port):
            return True
        time.sleep(0.2)
    return False


def _run_quietly(command: list[str]) -> None:
    try:
        subprocess.run(command, check=False, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        pass


def ensure_redis() -> str:
    """The shared Redis at 127.0.0.1:6379, started the way the machine starts it if it is down."""
    if not port_open(REDIS_HOST, REDIS_PORT) and shutil.which("redis-server"):
        Path("/var/lib/redis").mkdir(parents=True, exist_ok=True)
        Path("/var/log/redis").mkdir(parents=True, exist_ok=True)
        _run_quietly(_START_REDIS)
    if not _wait_for_port(REDIS_HOST, REDIS_PORT, 10):
        missing(f"Redis at {REDIS_HOST}:{REDIS_PORT}")
    return f"redis://{REDIS_HOST}:{REDIS_PORT}"


def ensure_postgres() -> str:
    """An admin URL of the PostgreSQL at 127.0.0.1:5432, started with pg_ctlcluster if it is down."""
    if not port_open("127.0.0.1", 5432) and shutil.which("pg_ctlcluster") and Path("/etc/postgresql").is_dir():
        for version in os.listdir("/etc/postgresql"):
            _run_quietly(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"])
    if not _wait_for_port("127.0.0.1", 5432, 15):
        missing("PostgreSQL at 127.0.0.1:5432")
    return POSTGRES_ADMIN_URL


def ensure_chromium() -> Path:
    if not CHROMIUM.exists():
        missing(f"Chromium at {CHROMIUM} (install Debian's 'chromium' package; `make test` does)")
    return CHROMIUM


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
