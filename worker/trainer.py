"""The training loop: a ``MixtureSpec`` and validated rows in, trained experts (safetensors) and metrics out.

Stage by stage (``worker.stages``), with task-aware batches, the spec's multi-task weighting (achievement
weights recomputed from held-out scores at each evaluation), gradient accumulation, a linear warm-up/decay
schedule from transformers, and checkpoints to the artifact store that resume bit-exactly. It knows nothing of
Celery or the database: the caller passes ``TrainerHooks`` for progress, cancellation and the lease heartbeat.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import get_scheduler

from models.bases import load_base
from models.data import ExampleRow, TaskBatchSampler, collate, split_holdout, tokenize_example
from models.losses import achievement_weights, combine_task_losses, per_task_lm_loss
from models.mixture import MixtureModel, attach_mixture, load_experts, read_manifest, save_experts, universal_names
from models.spec import MixtureSpec
from models.storage import ArtifactStore
from worker import checkpoints
from worker.evaluate import evaluate_tasks
from worker.stages import Stage, plan_stages

log = logging.getLogger(__name__)
HOLDOUT_FRACTION = 0.1  # of every task's rows, held out for evaluation (split by the schedule's seed)
EVAL_MAX_PER_TASK = 32  # held-out rows scored per task at each evaluation
MAX_GRAD_NORM = 1.0


class TrainingCancelled(Exception):
    """The job's cancel flag was seen; the last checkpoint is kept."""


@dataclass
class Progress:
    step: int
    total: int
    stage: str
    loss: float
    task_losses: dict[str, float]
    learning_rate: float
    eta_s: float | None


@dataclass
class TrainerHooks:
    """What the caller wants to hear about, and how it tells the loop to stop. All optional."""

    on_progress: Callable[[Progress], None] = lambda progress: None
    on_metrics: Callable[[int, dict[str, dict[str, float]], dict[str, float]], None] = lambda step, m, w: None
    on_checkpoint: Callable[[int, str], None] = lambda step, key: None
    on_resume: Callable[[int], None] = lambda step: None
    should_stop: Callable[[], bool] = lambda: False


@dataclass
class TrainResult:
    experts_folder: Path
    metrics: dict[str, dict[str, float]]
    steps: int
    resumed_from: int | None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    trainable: dict[str, int] = field(default_factory=dict)


@dataclass
class _Data:
    examples: list[dict[str, list[int]]]
    task_ids: list[int]
    tasks: list[str]
    counts: dict[str, int]
    holdout: list[ExampleRow]


def _prepare(spec: MixtureSpec, rows: Sequence[ExampleRow], tokenizer: Any, holdout_fraction: float) -> _Data:
    unknown = sorted({r.task for r in rows} - set(spec.tasks))
    if unknown:
        raise ValueError(f"the data has task(s) {unknown} that the mixture does not list ({', '.join(spec.tasks)})")
    missing = [t for t in spec.tasks if not any(r.task == t for r in rows)]
    if missing:
        raise ValueError(f"task(s) {missing} of the mixture have no rows in its datasets")
    train_rows, holdout = split_holdout(list(rows), fraction=holdout_fraction, seed=spec.schedule.seed)
    examples = [tokenize_example(r, tokenizer, max_length=spec.schedule.max_length) for r in train_rows]
    counts: dict[str, int] = {}
    for r in train_rows:
        counts[r.task] = counts.get(r.task, 0) + 1
    return _Data(
        examples, [spec.tasks.index(r.task) for r in train_rows], [r.task for r in train_rows], counts, holdout
    )


def build_mixture(
    spec: MixtureSpec, *, data_dir: Path, parent_experts: Path | None = None, device: torch.device | str = "cpu"
) -> tuple[MixtureModel, Any]:
    """Load the base and attach ``spec``; for ``add_task``, load the parent mixture first and plug the new expert."""
    model, tokenizer = load_base(spec.base_model, data_dir, device=device)
    if spec.schedule.kind != "add_task":
        mixture = attach_mixture(model, spec)
        if parent_experts is not None:
            load_experts(mixture, parent_experts)
        return mixture.to(device), tokenizer
    if parent_experts is None:
        raise ValueError("the add_task schedule needs the trained mixture to add the task to")
    parent_spec = MixtureSpec.model_validate(read_manifest(parent_experts)["spec"])
    mixture = attach_mixture(model, parent_spec)
    load_experts(mixture, parent_experts)
    mixture.add_task_expert(spec)
    return mixture.to(device), tokenizer


class Trainer:
    """One training run of one spec; ``run()`` resumes from the newest intact checkpoint under its prefix."""

    def __init__(
        self,
        spec: MixtureSpec,
        rows: Sequence[ExampleRow],
        *,
        data_dir: Path,
        work_dir: Path,
        store: ArtifactStore | None = None,
        checkpoint_prefix: str | None = None,
        hooks: TrainerHooks | None = None,
        parent_experts: Path | None = None,
        holdout_fraction: float = HOLDOUT_FRACTION,
        eval_max_per_task: int = EVAL_MAX_PER_TASK,
        device: str | None = None,
    ) -> None:
        self.spec, self.work_dir, self.store = spec, work_dir, store
        self.prefix = checkpoint_prefix
        self.hooks = hooks or TrainerHooks()
        self.eval_max_per_task = eval_max_per_task
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(spec.schedule.seed)
        self.mixture, self.tokenizer = build_mixture(
            spec, data_dir=data_dir, parent_experts=parent_experts, device=self.device
        )
        self.data = _prepare(spec, rows, self.tokenizer, holdout_fraction)
        self.stages = plan_stages(spec)
        self.total = sum(s.steps for s in self.stages)
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        self.scores: dict[str, float | None] = dict.fromkeys(spec.tasks)
        self.metrics: dict[str, dict[str, float]] = {}
        longest_answer = max(sum(label != -100 for label in e["labels"]) for e in self.data.examples)
        self.answer_tokens = min(64, longest_answer + 2)  # generation budget at evaluation
        work_dir.mkdir(parents=True, exist_ok=True)

    # --- the loop ---

    def run(self) -> TrainResult:
        resumed = self._resume()
        position = resumed.state if resumed else {"stage": 0, "stage_step": 0, "step": 0}
        if resumed:
            log.info("resumed at step %d", resumed.step)
            self.hooks.on_resume(resumed.step)
            self.scores = resumed.state.get("scores", self.scores)
        step = position["step"]
        stage_seconds: dict[str, float] = {}
        trainable: dict[str, int] = {}
        for index, stage in enumerate(self.stages):
            if index < position["stage"]:
                continue
            start_step = position["stage_step"] if index == position["stage"] else 0
            started = time.monotonic()
            step, n_trainable = self._run_stage(
                index, stage, start_step, step, resumed if index == position["stage"] else None
            )
            stage_seconds[stage.name] = time.monotonic() - started
            trainable[stage.name] = n_trainable
            self._evaluate(step)
        final = self.work_dir / "experts"
        save_experts(self.mixture, final)
        return TrainResult(final, self.metrics, step, resumed.step if resumed else None, stage_seconds, trainable)

    def _run_stage(
        self, index: int, stage: Stage, start: int, step: int, resumed: checkpoints.Checkpoint | None
    ) -> tuple[int, int]:
        mixture, schedule = self.mixture, self.spec.schedule
        n_trainable = mixture.set_trainable(
            experts=stage.experts, router=stage.router, shared=stage.shared, extras=stage.extras
        )
        params = [p for p in mixture.parameters() if p.requires_grad]
        if not params:
            return step, 0
        router_only = stage.router and not stage.experts
        lr = schedule.router_learning_rate if router_only and schedule.router_learning_rate else schedule.learning_rate
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        scheduler = get_scheduler(
            "linear",
            optimizer,
            num_warmup_steps=min(schedule.warmup_steps, stage.steps),
            num_training_steps=stage.steps,
        )
        sampler = self._sampler(index, stage)
        if resumed is not None:
            self._restore(resumed, optimizer, scheduler, sampler)
        mixture.train()
        began, done_here = time.monotonic(), 0
        with self._routing(stage):
            for stage_step in range(start, stage.steps):
                loss, task_losses = self._optimizer_step(sampler, optimizer, scheduler)
                step, done_here = step + 1, done_here + 1
                elapsed = time.monotonic() - began
                eta = elapsed / done_here * (self.total - step)
                self.hooks.on_progress(
                    Progress(step, self.total, stage.name, loss, task_losses, scheduler.get_last_lr()[0], eta)
                )
                last = stage_step + 1 == stage.steps
                if step % schedule.eval_every == 0 and not last:
                    self._evaluate(step)
                if self.prefix and self.store and (step % schedule.checkpoint_every == 0 or last):
                    self._checkpoint(index, stage_step + 1, step, optimizer, scheduler, sampler)
                if self.hooks.should_stop():
                    raise TrainingCancelled(f"cancelled at step {step}")
        mixture.eval()
        return step, n_trainable

    def _optimizer_step(
        self, sampler: TaskBatchSampler, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> tuple[float, dict[str, float]]:
        accum = self.spec.schedule.grad_accum
        totals: dict[str, list[float]] = {}
        loss_value = 0.0
        for _ in range(accum):
            indices = sampler.next_batch()
            batch = collate(
                [self.data.examples[i] for i in indices],
                pad_id=self.pad_id,
                task_ids=[self.data.task_ids[i] for i in indices],
            )
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self._autocast():
                out = self.mixture(
                    batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    labels=batch["labels"],
                    task_ids=batch["task_ids"],
                )
            per_task = per_task_lm_loss(out.logits, batch["labels"], batch["task_ids"], len(self.spec.tasks))
            loss = combine_task_losses(per_task, self.spec.loss.weighting, self._loss_weights())
            router_loss = self.mixture.router_loss()
            if router_loss is not None:
                loss = loss + router_loss
            (loss / accum).backward()
            loss_value += float(loss.detach()) / accum
            for task, value in zip(self.spec.tasks, per_task.tolist(), strict=True):
                if not math.isnan(value):
                    totals.setdefault(task, []).append(value)
        torch.nn.utils.clip_grad_norm_([p for p in self.mixture.parameters() if p.requires_grad], MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_value, {t: sum(v) / len(v) for t, v in totals.items()}

    # --- weighting and evaluation ---

    def _sampler(self, index: int, stage: Stage) -> TaskBatchSampler:
        loss = self.spec.loss
        weighting = loss.weighting if loss.weighting != "achievement" else "uniform"
        return TaskBatchSampler(
            self.data.tasks,
            batch_size=self.spec.schedule.batch_size,
            weighting=weighting,
            temperature=loss.temperature,
            seed=self.spec.schedule.seed + index,
            only_tasks=list(stage.tasks) if stage.tasks else None,
        )

    def _loss_weights(self) -> list[float] | None:
        if self.spec.loss.weighting != "achievement":
            return None
        weights = achievement_weights(
            self.scores, self.spec.loss.targets, gamma=self.spec.loss.gamma, epsilon=self.spec.loss.epsilon
        )
        return [weights[t] for t in self.spec.tasks]

    def _evaluate(self, step: int) -> None:
        if not self.data.holdout:
            return
        self.metrics = evaluate_tasks(
            self.mixture,
            self.tokenizer,
            self.data.holdout,
            max_per_task=self.eval_max_per_task,
            max_new_tokens=self.answer_tokens,
        )
        for task, values in self.metrics.items():
            self.scores[task] = values.get("accuracy", values["exact_match"])
        weights = dict(zip(self.spec.tasks, self._loss_weights() or [1.0] * len(self.spec.tasks), strict=True))
        self.hooks.on_metrics(step, self.metrics, weights)

    # --- routing and precision ---

    def _routing(self, stage: Stage) -> contextlib.AbstractContextManager[None]:
        if stage.routing == "own_task":
            return self.mixture.own_task_routing(universal_on=stage.universal_on)
        if stage.routing == "universal_only":
            return self.mixture.overridden(forced=dict.fromkeys(universal_names(self.spec), 1.0))
        return contextlib.nullcontext()

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    # --- checkpoints ---

    def _checkpoint(
        self,
        stage: int,
        stage_step: int,
        step: int,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        sampler: TaskBatchSampler,
    ) -> None:
        assert self.store is not None and self.prefix is not None
        folder = self.work_dir / f"checkpoint-{step}"
        save_experts(self.mixture, folder / "experts")
        tensors, meta = checkpoints.optimizer_tensors(optimizer)
        checkpoints.save_tensors(folder / "optimizer.safetensors", tensors)
        checkpoints.save_tensors(folder / "rng.safetensors", checkpoints.rng_tensors())
        state = {
            "stage": stage,
            "stage_step": stage_step,
            "step": step,
            "optimizer": meta,
            "scheduler": _jsonable(scheduler.state_dict()),
            "sampler": sampler.state_dict(),
            "scores": self.scores,
        }
        (folder / "state.json").write_text(json.dumps(state))
        key = checkpoints.write_checkpoint(self.store, self.prefix, step, folder)
        for path in sorted(folder.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        folder.rmdir()
        self.hooks.on_checkpoint(step, key)

    def _resume(self) -> checkpoints.Checkpoint | None:
        if not (self.store and self.prefix):
            return None
        found = checkpoints.load_latest(self.store, self.prefix, self.work_dir)
        if found is not None:
            load_experts(self.mixture, found.folder / "experts")
        return found

    def _restore(
        self,
        found: checkpoints.Checkpoint,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        sampler: TaskBatchSampler,
    ) -> None:
        state = found.state
        if state["stage_step"] == 0:
            return
        checkpoints.restore_optimizer(
            optimizer, checkpoints.load_tensors(found.folder / "optimizer.safetensors"), state["optimizer"]
        )
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        checkpoints.restore_rng(checkpoints.load_tensors(found.folder / "rng.safetensors"))


def _jsonable(value: Any) -> Any:
    """Scheduler state with its lambdas as ``None`` (they are rebuilt from the spec, as torch itself does)."""
    return {k: ([None] * len(v) if k == "lr_lambdas" else v) for k, v in value.items()}
