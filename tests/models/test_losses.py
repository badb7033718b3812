"""Task weighting and multi-task loss: the formulas of ALGORITHMS.md §3 on numbers worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from models.losses import (
    achievement,
    achievement_weights,
    combine_task_losses,
    per_task_lm_loss,
    sampling_probabilities,
    weighted_geometric_mean,
)


def test_per_task_loss_averages_answer_tokens_of_each_task_only() -> None:
    vocab = 5
    logits = torch.zeros(3, 4, vocab)  # uniform predictions: every token costs log(5)
    logits[2, :, 1] = 10.0  # sample 2 predicts token 1 confidently
    labels = torch.tensor([[-100, -100, 2, 3], [-100, 1, 1, -100], [-100, -100, 1, 1]])
    losses = per_task_lm_loss(logits, labels, torch.tensor([0, 0, 2]), n_tasks=4)
    assert losses[0] == pytest.approx(math.log(5), rel=1e-5)
    assert losses[2] < 1e-3
    assert math.isnan(losses[1]) and math.isnan(losses[3])  # tasks absent from the batch


def test_sampling_probabilities() -> None:
    counts = {"a": 100, "b": 25}
    assert sampling_probabilities(counts, "uniform") == {"a": 0.5, "b": 0.5}
    assert sampling_probabilities(counts, "proportional") == {"a": 0.8, "b": 0.2}
    temp = sampling_probabilities(counts, "temperature", temperature=2.0)
    assert temp["a"] == pytest.approx(10 / 15) and 0.5 < temp["a"] < 0.8


def test_achievement_weights_focus_on_lagging_tasks() -> None:
    assert achievement(0.45, 0.9) == pytest.approx(0.5) and achievement(1.2, 1.0) == 1.0
    weights = achievement_weights({"done": 1.0, "half": 0.5, "new": None}, {"half": 1.0}, gamma=2.0, epsilon=0.05)
    assert weights == pytest.approx({"done": 0.05, "half": 0.3, "new": 1.0})


def test_weighted_geometric_mean_ignores_absent_tasks_and_is_scale_balanced() -> None:
    losses = torch.tensor([4.0, 1.0, float("nan")])
    assert weighted_geometric_mean(losses, torch.tensor([1.0, 1.0, 5.0])) == pytest.approx(2.0)
    assert weighted_geometric_mean(losses, torch.tensor([3.0, 1.0, 1.0])) == pytest.approx(4.0**0.75)
    assert combine_task_losses(losses, "uniform") == pytest.approx(2.5)
    assert combine_task_losses(losses, "achievement", [1.0, 1.0, 1.0]) == pytest.approx(2.0)


def test_geometric_mean_passes_gradients_to_every_present_task() -> None:
    losses = torch.tensor([2.0, 3.0], requires_grad=True)
    weighted_geometric_mean(losses, torch.tensor([1.0, 2.0])).backward()
    assert torch.all(losses.grad > 0)
