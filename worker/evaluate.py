"""Held-out evaluation per task (ALGORITHMS.md §6): exact match, token F1, ROUGE-L, and accuracy for label tasks.

The achievement weighting of C-LoRAE reads these scores; the Jobs tab plots them.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence

import torch

from models.data import ExampleRow, prompt_ids
from models.mixture import MixtureModel

LABEL_TASK_MAX_LABELS = 10  # a task whose answers take at most this many distinct values is a label task


def normalise(text: str) -> str:
    """Lower-case and collapse whitespace: what exact match compares."""
    return re.sub(r"\s+", " ", text.strip().lower())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise(prediction) == normalise(reference))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalise(prediction).split(), normalise(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """F-measure of the longest common subsequence of tokens."""
    a, b = normalise(prediction).split(), normalise(reference).split()
    if not a or not b:
        return float(a == b)
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def is_label_task(references: Sequence[str]) -> bool:
    return 1 < len({normalise(r) for r in references}) <= LABEL_TASK_MAX_LABELS and len(references) > 2 * len(
        {normalise(r) for r in references}
    )


def score(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean metrics over pairs; ``accuracy`` (first word of the prediction vs the label's) for label tasks."""
    n = max(len(references), 1)
    metrics = {
        "exact_match": sum(map(exact_match, predictions, references)) / n,
        "token_f1": sum(map(token_f1, predictions, references)) / n,
        "rouge_l": sum(map(rouge_l, predictions, references)) / n,
    }
    if is_label_task(references):
        first = [re.findall(r"\w+", normalise(p))[:1] for p in predictions]
        labels = [re.findall(r"\w+", normalise(r))[:1] for r in references]
        metrics["accuracy"] = sum(f == label for f, label in zip(first, labels, strict=True)) / n
    return metrics


@torch.no_grad()
def generate_answers(
    mixture: MixtureModel,
    tokenizer,
    rows: Sequence[ExampleRow],
    *,  # noqa: ANN001
    task_ids: Sequence[int],
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers with left padding, routed by each row's task id."""
    was_training = mixture.training
    mixture.eval()
    device = next(mixture.parameters()).device
    answers: list[str] = []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [prompt_ids(r, tokenizer) for r in chunk]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        tasks = torch.tensor(task_ids[start : start + batch_size], device=device)
        out = mixture.generate(
            ids,
            attention_mask=mask,
            task_ids=tasks,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    mixture.train(was_training)
    return answers


def evaluate_tasks(
    mixture: MixtureModel,
    tokenizer,
    rows: Sequence[ExampleRow],
    *,  # noqa: ANN001
    max_per_task: int = 32,
    max_new_tokens: int = 32,
) -> dict[str, dict[str, float]]:
    """Per-task metrics on (up to ``max_per_task`` of) the held-out rows."""
    by_task: dict[str, list[ExampleRow]] = defaultdict(list)
    for row in rows:
        if len(by_task[row.task]) < max_per_task:
            by_task[row.task].append(row)
    tasks = mixture.spec.tasks
    results = {}
    for task, task_rows in by_task.items():
        task_id = tasks.index(task) if task in tasks else -1
        answers = generate_answers(
            mixture, tokenizer, task_rows, task_ids=[task_id] * len(task_rows), max_new_tokens=max_new_tokens
        )
        results[task] = score(answers, [r.output for r in task_rows])
    return results
