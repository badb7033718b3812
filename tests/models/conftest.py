"""A tiny random Llama for engine tests: fast, deterministic, no downloads (learnability is not needed here)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from models.spec import MixtureSpec, default_spec

TASKS = ["dates", "emails", "questions"]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def model() -> LlamaForCausalLM:
    return tiny_llama()


def make_spec(kind: str = "task", **changes: object) -> MixtureSpec:
    spec = default_spec("tiny-random", TASKS, router=kind)
    data = spec.model_dump() | {"target_modules": ["q_proj", "v_proj", "up_proj"]}
    return MixtureSpec.model_validate(data | changes)


def randomise_experts(mixture: torch.nn.Module, seed: int = 1) -> None:
    """Give every B (and router) non-zero values so the experts actually change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mixture.named_parameters():
            if any(k in name for k in ("experts.up", "shared.up", "router", "sigma")) and p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


IDS_FOR_SENTENCES = torch.tensor([[3, 8, 12, 4, 9], [7, 1, 1, 30, 2]])
