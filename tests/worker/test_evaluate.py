"""Evaluation metrics on worked examples."""

from __future__ import annotations

import pytest

from worker.evaluate import exact_match, is_label_task, rouge_l, score, token_f1


def test_exact_match_ignores_case_and_whitespace_only() -> None:
    assert exact_match("  Paris \n", "paris") == 1.0
    assert exact_match("Paris.", "Paris") == 0.0


def test_token_f1_and_rouge_l_on_hand_worked_pairs() -> None:
    assert token_f1("the cat sat", "the cat sat down") == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert rouge_l("a b c d", "a x c d") == pytest.approx(0.75)
    assert rouge_l("d c b a", "a b c d") == pytest.approx(0.25)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_label_tasks_get_accuracy_on_the_first_word() -> None:
    references = ["even", "odd"] * 5
    assert is_label_task(references) and not is_label_task([f"answer {i}" for i in range(10)])
    metrics = score(["even, surely", "odd"] * 5, references)
    assert metrics["accuracy"] == 1.0 and metrics["exact_match"] == 0.5
