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

    argv = [
        "worker",
        f"--loglevel={args.loglevel}",
        f"--queues={args.queues}",
        "--pool=prefork",
        f"--concurrency={args.concurrency}",
    ]
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
    from app.context import StudioContext
    from app.main import build_demo, launch_kwargs

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


def _demo(args: argparse.Namespace) -> int:
    """Register the bundled demo datasets and a demo mixture, ready to train."""
    from app.context import StudioContext
    from app.services.mixtures import register_demo

    ctx = StudioContext()
    upgrade_head(ctx.settings.db_url)
    mixture = register_demo(ctx=ctx, base_model=BASES[args.base], router=args.router)
    print(f"demo mixture '{mixture.name}' on {mixture.base_model} is registered; train it from the Compose tab")
    return 0


def _print_progress(progress: object) -> None:
    p = progress  # worker.trainer.Progress
    losses = " ".join(f"{task}={value:.3f}" for task, value in p.task_losses.items())  # type: ignore[attr-defined]
    eta = f" eta {p.eta_s:.0f}s" if p.eta_s is not None else ""  # type: ignore[attr-defined]
    print(f"[{p.stage}] step {p.step}/{p.total} loss {p.loss:.4f} {losses}{eta}", flush=True)  # type: ignore[attr-defined]


def _train(args: argparse.Namespace) -> int:
    """Headless: register the data files and the spec, then train in this process, printing progress."""
    import json
    import uuid
    from pathlib import Path

    from app.context import ServiceError, StudioContext
    from app.services.datasets import create_dataset
    from app.services.mixtures import save_mixture
    from models.data import task_name_from_filename
    from worker.dispatch import submit_training
    from worker.jobs import run_job

    ctx = StudioContext()
    upgrade_head(ctx.settings.db_url)
    suffix = uuid.uuid4().hex[:6]
    try:
        spec_json = json.loads(Path(args.spec).read_text())
        names = []
        for path in map(Path, args.data):
            name = f"{task_name_from_filename(path.name)[:56]}-{suffix}"
            dataset = create_dataset(ctx=ctx, filename=path.name, data=path.read_bytes(), name=name)
            names.append(dataset.name)
        mixture = save_mixture(
            ctx=ctx, name=args.name or f"{Path(args.spec).stem}-{suffix}", spec_json=spec_json, dataset_names=names
        )
    except (OSError, json.JSONDecodeError, ServiceError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    job_id = submit_training(ctx.settings, mixture.id, send=False)
    outcome = run_job(job_id, settings=ctx.settings, on_progress=_print_progress)
    print(f"job {job_id}: {outcome}")
    return 0 if outcome == "succeeded" else 1


BASES = {"smollm2": "builtin:smollm2-135m-instruct", "tiny": "builtin:tiny"}


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
    worker.add_argument("--concurrency", type=int, default=1, help="job slots (one training job per GPU)")
    worker.add_argument("--hostname", default=None, help="Celery node name, e.g. gpu0@%%h")
    worker.set_defaults(func=_worker)
    migrate = commands.add_parser("migrate", help="bring the database to the latest schema")
    migrate.set_defaults(func=_migrate)
    demo = commands.add_parser("demo", help="register the bundled demo datasets and mixture")
    demo.add_argument("--base", choices=sorted(BASES), default="smollm2")
    demo.add_argument("--router", default="modula", help="router kind of the demo mixture")
    demo.set_defaults(func=_demo)
    train = commands.add_parser("train", help="train a mixture spec on data files, headless, printing progress")
    train.add_argument("spec", help="a MixtureSpec as JSON")
    train.add_argument("--data", nargs="+", required=True, help="JSONL / CSV / Parquet files")
    train.add_argument("--name", default=None, help="name of the mixture in the registry")
    train.set_defaults(func=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
