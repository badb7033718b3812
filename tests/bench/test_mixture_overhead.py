"""Smoke test of ``python -m bench.mixture_overhead``: it runs and its last line parses. Timings are never asserted."""

from __future__ import annotations

import re

import pytest
import torch

from bench import mixture_overhead

LAST_LINE = re.compile(r"overhead_vs_single_lora=(\d+\.\d+) speedup_vs_loop=(\d+\.\d+)")


def test_quick_run_prints_the_two_ratios_last(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    try:
        result = mixture_overhead.main(["--quick", "--repeats", "2", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)  # the benchmark sets it for the whole process
    out = capsys.readouterr().out
    assert "single linear" in out and "Llama" in out
    last = out.strip().splitlines()[-1]
    match = LAST_LINE.fullmatch(last)
    assert match is not None, last
    overhead, speedup = (float(group) for group in match.groups())
    assert overhead > 0 and speedup > 0
    assert result["overhead_vs_single_lora"] > 0 and result["speedup_vs_loop"] > 0
