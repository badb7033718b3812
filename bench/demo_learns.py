"""Does the demo mixture learn, and do its routers specialise? ``python -m bench.demo_learns --base tiny|smollm2``.

Trains the bundled demo (four tasks, universal + one expert per task, a learned router) on the chosen base,
evaluates exact match per task on held-out rows, and measures specialisation: for each task, the mean routing
weight (over layers and tokens of its held-out prompts, the router seeing the prompt alone, no task id) must be
largest on that task's own expert. Defaults: MoDULA-Res (universal → domain experts → router, sequence-level
gates), C-LoRAE's achievement weighting (held-out scores every ``eval_every`` steps), attention + MLP targets.
Last line: ``tasks_at_0.9=<n> of <m> minutes=<x.x> specialised=<n> of <m>``.

With ``--add-task TASK``: trains the demo without TASK, then plugs TASK in with the ``add_task`` schedule and
checks that every old expert is bit-identical and the old tasks' held-out scores (on the parent's held-out rows,
which the child never sees) move by at most 0.02. Last line:
``add_task_old_experts_identical=<bool> max_old_task_delta=<x.xx>``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from models.bases import BUILTIN_SMOLLM2, BUILTIN_TINY
from models.data import prompt_ids
from models.demo import ALL_PROJECTIONS, DEMO_TASKS, demo_rows, tuned_demo_spec
from models.settings import get_settings
from models.spec import MixtureSpec
from worker.evaluate import evaluate_tasks
from worker.trainer import Progress, Trainer, TrainerHooks

BASES = {"tiny": BUILTIN_TINY, "smollm2": BUILTIN_SMOLLM2}
SCHEDULES = {"grouped": "at_moe"}  # each router's own schedule (ALGORITHMS.md §4); the others train as MoDULA


@torch.no_grad()
def routing_by_task(trainer: Trainer, rows: list, per_task: int = 16) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The routed experts' names, and per task the mean router weight over layers and prompt tokens (experts,)."""
    mixture, tokenizer = trainer.mixture, trainer.tokenizer
    mixture.eval()
    found, names = {}, []
    for task in mixture.spec.tasks:
        task_rows = [r for r in rows if r.task == task][:per_task]
        means = []
        for row in task_rows:
            ids = torch.tensor([prompt_ids(row, tokenizer)], device=trainer.device)
            with mixture.tracing() as trace:
                mixture(ids)  # no task id: what the router makes of the prompt alone
            means.append(trace.stacked().mean(dim=(0, 1)))  # (experts,)
            names = next(iter(trace.expert_names.values()))
        found[task] = torch.stack(means).mean(0)
    return list(names), found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=sorted(BASES), default="tiny")
    parser.add_argument("--router", default="modula", help="a learned router: modula, grouped, semantic, softmax")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="steps of each stage of the schedule")
    parser.add_argument("--rows", type=int, default=400, help="rows per task")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--granularity", choices=["token", "sequence"], default="sequence")
    parser.add_argument("--variant", choices=["res", "flan"], default="res", help="MoDULA variant (router modula)")
    parser.add_argument("--add-task", default=None, choices=DEMO_TASKS, help="measure add_task with this task")
    parser.add_argument("--add-task-steps", type=int, nargs=2, default=None, help="new-expert and router steps")
    parser.add_argument("--add-task-router-lr", type=float, default=None, help="router lr of the add_task run")
    parser.add_argument(
        "--weighting",
        choices=["uniform", "proportional", "temperature", "achievement"],
        default="achievement",
        help="multi-task loss weighting (default: C-LoRAE's achievement weights)",
    )
    parser.add_argument("--eval-every", type=int, default=None, help="held-out evaluation (achievement) cadence")
    parser.add_argument("--router-lr", type=float, default=None, help="learning rate of router-only stages")
    parser.add_argument("--targets", nargs="+", default=ALL_PROJECTIONS, help="target modules")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = tuned_demo_spec(BASES[args.base], router=args.router).model_dump(mode="json")
    schedule = spec["schedule"]
    schedule["kind"] = SCHEDULES.get(args.router, "modula")
    schedule["checkpoint_every"] = 10_000
    if args.steps:
        schedule["stage_steps"] = args.steps
    if args.eval_every:
        schedule["eval_every"] = args.eval_every
    if args.router_lr:
        schedule["router_learning_rate"] = args.router_lr
    spec["loss"] = {"weighting": args.weighting}
    spec["target_modules"] = args.targets
    spec["router"]["options"] |= {"granularity": args.granularity}
    if args.router == "modula":
        spec["router"]["options"]["variant"] = args.variant
    spec_obj = MixtureSpec.model_validate(spec)
    rows = demo_rows(per_task=args.rows)
    settings = get_settings()
    if args.add_task:
        add_task(spec_obj, rows, args.add_task, settings.bases_data_dir, args.add_task_steps, args.add_task_router_lr)
        return
    last = [0.0]

    def report(p: Progress) -> None:
        if time.monotonic() - last[0] > 10 or p.step == p.total:
            last[0] = time.monotonic()
            losses = " ".join(f"{t}={v:.3f}" for t, v in p.task_losses.items())
            print(f"[{p.stage}] step {p.step}/{p.total} loss {p.loss:.3f} {losses}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            spec_obj,
            rows,
            data_dir=settings.bases_data_dir,
            work_dir=Path(tmp),
            hooks=TrainerHooks(on_progress=report),
            eval_max_per_task=40,
        )
        started = time.monotonic()
        result = trainer.run()
        minutes = (time.monotonic() - started) / 60
        metrics = evaluate_tasks(
            trainer.mixture,
            trainer.tokenizer,
            trainer.data.holdout,
            max_per_task=40,
            max_new_tokens=trainer.answer_tokens,
        )
        names, routing = routing_by_task(trainer, trainer.data.holdout)
    print(f"stage seconds: {', '.join(f'{k}={v:.0f}' for k, v in result.stage_seconds.items())}")
    print(f"trainable parameters per stage: {result.trainable}")
    good = 0
    specialised = 0
    for task in DEMO_TASKS:
        em = metrics[task]["exact_match"]
        weights = routing[task]
        own = names.index(f"{task}-expert")
        top = int(weights.argmax())
        good += em >= 0.9
        specialised += top == own
        shown = " ".join(f"{n.split('-')[0]}={w:.2f}" for n, w in zip(names, weights.tolist(), strict=True))
        print(f"{task:8s} exact_match={em:.2f} routing: {shown} {'(own expert)' if top == own else ''}")
    print(
        f"tasks_at_0.9={good} of {len(DEMO_TASKS)} minutes={minutes:.1f} specialised={specialised} of "
        f"{len(DEMO_TASKS)}"
    )


def _expert_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{f.name}:{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def add_task(
    spec: MixtureSpec,
    rows: list,
    task: str,
    data_dir: Path,
    steps: tuple[int, int] | None = None,
    router_lr: float | None = None,
) -> None:
    """Train the demo without ``task``, add it with the add_task schedule, compare the old experts and scores."""
    old_tasks = [t for t in spec.tasks if t != task]
    parent_spec = MixtureSpec.model_validate(
        spec.model_dump()
        | {"tasks": old_tasks, "experts": [e.model_dump() for e in spec.experts if e.tasks != [task]]}
    )
    with tempfile.TemporaryDirectory() as tmp:
        parent = Trainer(parent_spec, [r for r in rows if r.task != task], data_dir=data_dir, work_dir=Path(tmp) / "p")
        parent_result = parent.run()
        holdout = parent.data.holdout  # old-task rows neither run trains on
        held = {(r.task, r.input, r.output) for r in holdout}
        before = evaluate_tasks(parent.mixture, parent.tokenizer, holdout, max_per_task=40)
        steps = steps or (spec.schedule.stage_steps[1] // len(spec.tasks), spec.schedule.stage_steps[2])
        grown = parent_spec.with_task_expert(task, name=f"{task}-expert", steps=steps)
        if router_lr:
            schedule = grown.schedule.model_copy(update={"router_learning_rate": router_lr})
            grown = MixtureSpec.model_validate(grown.model_dump() | {"schedule": schedule.model_dump()})
        child_rows = [r for r in rows if (r.task, r.input, r.output) not in held]
        child = Trainer(
            grown, child_rows, data_dir=data_dir, work_dir=Path(tmp) / "c", parent_experts=parent_result.experts_folder
        )
        started = time.monotonic()
        child_result = child.run()
        after = evaluate_tasks(child.mixture, child.tokenizer, holdout, max_per_task=40)
        new = evaluate_tasks(child.mixture, child.tokenizer, child.data.holdout, max_per_task=40)
        old_tensors, new_tensors = (
            _expert_tensors(parent_result.experts_folder),
            _expert_tensors(child_result.experts_folder),
        )
    old_experts = {k: v for k, v in old_tensors.items() if k.startswith("expert-")}  # the router retrains
    identical = bool(old_experts) and all(
        k in new_tensors and torch.equal(v, new_tensors[k]) for k, v in old_experts.items()
    )
    deltas = {t: abs(after[t]["exact_match"] - before[t]["exact_match"]) for t in old_tasks}
    for t in old_tasks:
        print(f"{t:9s} exact_match before={before[t]['exact_match']:.2f} after={after[t]['exact_match']:.2f}")
    print(f"{task:9s} (new) exact_match={new[task]['exact_match']:.2f} in {(time.monotonic() - started) / 60:.1f} min")
    print(f"add_task_old_experts_identical={identical} max_old_task_delta={max(deltas.values()):.2f}")


if __name__ == "__main__":
    main()
