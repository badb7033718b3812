"""Smoke test of ``python -m bench.playground`` on the tiny base: it trains, times, and prints its line last."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import playground
from worker import inference

LAST_LINE = re.compile(r"p50_ms=(\d+\.\d) trace_overhead=(\d+\.\d\d)")


def test_tiny_run_prints_the_median_and_the_trace_overhead_last(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["--base", "tiny", "--train-steps", "1", "--repeats", "1", "--warmup", "1", "--new-tokens", "4"]
    try:
        result = playground.main([*argv, "--data-dir", str(tmp_path)])
        out = capsys.readouterr().out
        assert "trained demo-tiny" in out and "experts apart" in out and "base, generate" in out
        assert "mixture_vs_base=" in out and "folded_vs_apart=" in out
        match = LAST_LINE.fullmatch(out.strip().splitlines()[-1])
        assert match is not None, out
        assert float(match.group(1)) > 0 and float(match.group(2)) > 0
        assert result["p50_plain_ms"] > 0 and result["p50_base_ms"] > 0
        playground.main([*argv, "--data-dir", str(tmp_path)])  # the same data dir: the trained mixture is reused
        assert "reusing the trained mixture demo-tiny-" in capsys.readouterr().out
    finally:
        inference.clear_cache()
