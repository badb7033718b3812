"""The dtype a frozen base is stored in for inference (experts and routers stay fp32).

Why: decoding one token reads every base weight once, so on a CPU a 135M-parameter base is bound by memory traffic,
not arithmetic; bf16 halves that traffic (SmolLM2-135M, one decoding step here: 58 ms in fp32, 36 ms in bf16).
``auto`` takes bf16 only where the hardware computes it natively (CUDA with bf16, x86 with AVX512-BF16 or AMX);
elsewhere PyTorch emulates bf16 and fp32 is faster. Training is unaffected: the trainer keeps fp32 weights.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Literal

import torch

InferenceDtype = Literal["auto", "float32", "bfloat16"]
NATIVE_BF16_FLAGS = re.compile(r"\b(avx512_bf16|amx_bf16)\b")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU flags (``/proc/cpuinfo`` unless given) name a bf16 instruction set."""
    if cpuinfo is None:
        cpuinfo = _read_cpuinfo()
    return NATIVE_BF16_FLAGS.search(cpuinfo) is not None


@cache
def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux: no flags to read, so no native bf16 is assumed
        return ""


def inference_dtype(choice: InferenceDtype, device: torch.device) -> torch.dtype:
    """The dtype for the frozen base on ``device``: the setting, or for ``auto`` bf16 where it is native."""
    if choice == "float32":
        return torch.float32
    if choice == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32
