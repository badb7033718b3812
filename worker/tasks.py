"""Celery tasks. Each is thin: it loads what it needs and calls a plain function."""

from __future__ import annotations

import os
import socket

from celery import shared_task


@shared_task(name="studio.ping")
def ping() -> dict[str, object]:
    """Round trip check: answers with the worker's host and pid, so a caller sees a real worker replied."""
    return {"pong": True, "host": socket.gethostname(), "pid": os.getpid()}
