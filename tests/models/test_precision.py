"""Which dtype the frozen base takes at inference."""

from __future__ import annotations

import pytest
import torch

from models import precision
from models.precision import cpu_has_native_bf16, inference_dtype

ZEN4_FLAGS = "flags\t\t: fpu vme avx2 avx512f avx512bw avx512_bf16 avx512_vnni"
SKYLAKE_FLAGS = "flags\t\t: fpu vme avx2 avx512f avx512bw avx512_vnni"


def test_native_bf16_is_read_from_the_cpu_flags() -> None:
    assert cpu_has_native_bf16(ZEN4_FLAGS)
    assert cpu_has_native_bf16("flags : sse4_2 amx_bf16 amx_tile")
    assert not cpu_has_native_bf16(SKYLAKE_FLAGS)
    assert not cpu_has_native_bf16("")


@pytest.mark.parametrize(("flags", "expected"), [(ZEN4_FLAGS, torch.bfloat16), (SKYLAKE_FLAGS, torch.float32)])
def test_auto_on_a_cpu_takes_bf16_only_where_it_is_native(
    monkeypatch: pytest.MonkeyPatch, flags: str, expected: torch.dtype
) -> None:
    monkeypatch.setattr(precision, "_read_cpuinfo", lambda: flags)
    assert inference_dtype("auto", torch.device("cpu")) == expected


def test_an_explicit_choice_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "_read_cpuinfo", lambda: ZEN4_FLAGS)
    assert inference_dtype("float32", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(precision, "_read_cpuinfo", lambda: SKYLAKE_FLAGS)
    assert inference_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
