"""Smoke test of ``python -m bench.mixture_overhead``: it runs and its last line parses. Timings are never asserted.

At ``--quick`` sizes an adapter path can be below timing noise; the benchmark then reports ``nan``, never a
negative ratio.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from bench import mixture_overhead

RATIO = r"(\d+\.\d+|nan)"
LAST_LINE = re.compile(rf"overhead_vs_single_lora={RATIO} speedup_vs_loop={RATIO}")


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
    for name, value in result.items():
        assert math.isnan(value) or value > 0, (name, value)
    assert result["whole_layer_vs_peft"] > 0 and result["llama_whole_vs_peft"] > 0  # whole times are never noise
