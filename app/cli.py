"""The ``mole-studio`` command: ``serve``, ``worker`` and ``migrate``."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from migrations import upgrade_head
from models.settings import get_settings

WORKER_STOP_TIMEOUT_S = 30


def _migrate(_: argparse.Namespace) -> int:
    settings = get_settings()
    upgrade_head(settings.db_url)
    print(f"database at head: {settings.db_url}")
    return 0


def _worker(args: argparse.Namespace) -> int:
    """Run a Celery worker on ``BROKER_URL`` (or the embedded broker), one training job at a time."""
    settings = get_settings()
    upgrade_head(settings.db_url)
    from worker.celery_app import celery_app

    argv = ["worker", f"--loglevel={args.loglevel}", f"--queues={args.queues}", "--pool=prefork", "--concurrency=1"]
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    celery_app.worker_main(argv)
    return 0


def _start_embedded_worker() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--loglevel=WARNING"], env=os.environ.copy())


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Warm shutdown first (the worker finishes or checkpoints its job), then force."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _serve(args: argparse.Namespace) -> int:
    """Migrate, start the embedded worker when no broker is configured, serve the page until Ctrl-C."""
    from app.main import build_demo, launch_kwargs
    from app.services import StudioContext

    ctx = StudioContext()
    upgrade_head(ctx.settings.db_url)
    worker = _start_embedded_worker() if ctx.settings.embedded_broker and not args.no_worker else None
    demo = build_demo(ctx)
    kwargs = launch_kwargs(ctx) | {"prevent_thread_lock": True}
    kwargs["server_name"] = args.host or kwargs["server_name"]
    kwargs["server_port"] = args.port or kwargs["server_port"]
    stop = False

    def _request_stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _request_stop)
    try:
        demo.launch(**kwargs)
        mode = "embedded worker" if worker else "external workers"
        print(f"MoLE Studio running at http://{kwargs['server_name']}:{kwargs['server_port']} ({mode})", flush=True)
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping MoLE Studio ...", flush=True)
        demo.close()
        if worker is not None:
            _stop(worker)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mole-studio", description="MoLE Studio: mixtures of LoRA experts.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="migrate and run the studio (with its own worker by default)")
    serve.add_argument("--host", default=None, help="bind address (default: HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default: PORT or 7860)")
    serve.add_argument("--no-worker", action="store_true", help="do not start the embedded worker")
    serve.set_defaults(func=_serve)
    worker = commands.add_parser("worker", help="run a Celery worker on BROKER_URL")
    worker.add_argument("--queues", default="default,train,eval", help="comma-separated queues to consume")
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("--hostname", default=None, help="Celery node name, e.g. gpu0@%%h")
    worker.set_defaults(func=_worker)
    migrate = commands.add_parser("migrate", help="bring the database to the latest schema")
    migrate.set_defaults(func=_migrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
