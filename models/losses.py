"""Multi-task losses and task weighting (ALGORITHMS.md §3), as pure functions.

The router losses live beside their routers (``routers.load_balance_loss``, ``SemanticRouter.regulariser``);
this module turns per-token losses into per-task losses and per-task losses into one training loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def per_task_lm_loss(logits: Tensor, labels: Tensor, task_ids: Tensor, n_tasks: int) -> Tensor:
    """Token cross-entropy on answer tokens, averaged per task: ``L_t`` for each task id (nan when absent).

    logits (B, T, V), labels (B, T) with -100 on prompt and padding, task_ids (B,) -> (n_tasks,).
    """
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(shift_labels)  # (B, T-1)
    valid = (shift_labels != IGNORE_INDEX).float()  # (B, T-1)
    onehot = F.one_hot(task_ids.clamp(min=0), n_tasks).float()  # (B, n_tasks)
    loss_sum = onehot.T @ (token_loss * valid).sum(1)  # (n_tasks,)
    count = onehot.T @ valid.sum(1)  # (n_tasks,)
    return torch.where(count > 0, loss_sum / count.clamp(min=1.0), torch.full_like(count, math.nan))


def sampling_probabilities(counts: Mapping[str, int], weighting: str, temperature: float = 2.0) -> dict[str, float]:
    """Task sampling probabilities: ``uniform`` 1/n, ``proportional`` n_t/Σn, ``temperature`` ∝ n_t^(1/T).

    Achievement weighting samples uniformly and weights the loss instead.
    """
    tasks = list(counts)
    if weighting == "proportional":
        raw = [float(counts[t]) for t in tasks]
    elif weighting == "temperature":
        raw = [float(counts[t]) ** (1.0 / temperature) for t in tasks]
    elif weighting in ("uniform", "achievement"):
        raw = [1.0 for _ in tasks]
    else:
        raise ValueError(f"unknown weighting {weighting!r}")
    total = sum(raw)
    return {t: r / total for t, r in zip(tasks, raw, strict=True)}


def achievement(score: float, potential: float) -> float:
    """``a_t = min(1, m_t / m*_t)``: how far a task is towards its potential score."""
    if potential <= 0:
        return 1.0
    return min(1.0, max(0.0, score / potential))


def achievement_weights(
    scores: Mapping[str, float | None], potentials: Mapping[str, float], *, gamma: float = 2.0, epsilon: float = 0.05
) -> dict[str, float]:
    """C-LoRAE's task weights ``w_t = (1 − a_t)^γ + ε``; 1 for a task not evaluated yet."""
    weights = {}
    for task, score in scores.items():
        if score is None:
            weights[task] = 1.0
        else:
            weights[task] = (1.0 - achievement(score, potentials.get(task, 1.0))) ** gamma + epsilon
    return weights


def weighted_geometric_mean(task_losses: Tensor, weights: Tensor) -> Tensor:
    """``L = exp(Σ_t w_t log L_t / Σ_t w_t)`` over the tasks present (finite losses), so no task's scale dominates."""
    present = torch.isfinite(task_losses)
    w = torch.where(present, weights, torch.zeros_like(weights))
    logs = torch.where(present, task_losses.clamp_min(1e-8).log(), torch.zeros_like(task_losses))
    return torch.exp((w * logs).sum() / w.sum().clamp_min(1e-12))


def weighted_mean(task_losses: Tensor, weights: Tensor | None = None) -> Tensor:
    """Arithmetic mean of the tasks present in the batch (the loss for uniform / proportional / temperature)."""
    present = torch.isfinite(task_losses)
    w = present.float() if weights is None else torch.where(present, weights, torch.zeros_like(weights))
    return (w * torch.where(present, task_losses, torch.zeros_like(task_losses))).sum() / w.sum().clamp_min(1e-12)


def combine_task_losses(task_losses: Tensor, weighting: str, task_weights: Sequence[float] | None = None) -> Tensor:
    """One loss from per-task losses: weighted geometric mean for ``achievement``, plain mean otherwise."""
    if weighting == "achievement":
        weights = torch.tensor(
            task_weights if task_weights is not None else [1.0] * task_losses.numel(),
            dtype=task_losses.dtype,
            device=task_losses.device,
        )
        return weighted_geometric_mean(task_losses, weights)
    return weighted_mean(task_losses)
