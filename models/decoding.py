"""Greedy decoding of one prompt, as the playground runs it: a plain loop over the KV cache, not ``generate``.

For one greedy sequence ``generate``'s logits processors, stopping criteria and bookkeeping cost about 2 ms a token
on two CPU cores (SmolLM2-135M: 35 ms of a 16-token request, against 6 ms for this loop). Its prompt step also hands
the output head a one-row slice of the hidden states with the prompt's strides, which sends PyTorch's 3-D linear
down a path that copies the whole head (49152 x 576 in bf16: 60 ms instead of 4 ms); this loop asks for the last
row by index, which gives a fresh tensor.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from models.mixture import MixtureModel
from models.routers import RoutingInputs


@dataclass
class Greedy:
    """The chosen tokens and the probability each had when it was chosen."""

    tokens: list[int]
    probs: list[float]


def _keeps_logits(model: Any) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.inference_mode()
def greedy_decode(
    model: MixtureModel | PreTrainedModel,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    stop_at_eos: bool = True,
    task_ids: Tensor | None = None,
    sentence_embedding: Tensor | None = None,
    past_key_values: Any = None,
) -> Greedy:
    """Up to ``max_new_tokens`` argmax tokens after ``input_ids`` (one sequence, ``(1, T)``) from a mixture (the
    routing inputs apply) or a plain causal LM (the same loop on the base alone: the benchmark's baseline).

    ``past_key_values`` may hold the KV cache of the prompt's first tokens (the template head); only the rest is
    run. ``stop_at_eos=False`` never chooses an EOS token (its logit is masked), so exactly ``max_new_tokens`` come.
    """
    from transformers import DynamicCache

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"greedy_decode takes one sequence (1, T), got {tuple(input_ids.shape)}")
    lm = model.model if isinstance(model, MixtureModel) else model
    cache = past_key_values if past_key_values is not None else DynamicCache(config=lm.config)
    fed = input_ids[:, cache.get_seq_length() :]  # (1, T') the tokens the cache does not hold yet
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=input_ids.device)
    if fed.shape[1] == 0:
        raise ValueError("the KV cache already holds the whole prompt: nothing to decode from")
    last_row = {"logits_to_keep": torch.tensor([fed.shape[1] - 1], device=fed.device)} if _keeps_logits(lm) else {}
    tokens: list[int] = []
    probs: list[float] = []
    generation: AbstractContextManager[None] = nullcontext()
    if isinstance(model, MixtureModel):
        # one unpadded sequence: every fed token is prompt, so no mask (sequence gates take a plain mean)
        inputs = RoutingInputs(task_ids=task_ids, sentence_embedding=sentence_embedding)
        generation = model.generation(inputs)
    with generation:
        logits = lm(input_ids=fed, past_key_values=cache, use_cache=True, **last_row).logits[0, -1]  # (V,)
        while True:
            logits = logits.float()
            if not stop_at_eos and len(eos):
                logits[eos] = float("-inf")
            token = int(logits.argmax())
            tokens.append(token)
            probs.append(float(logits.softmax(-1)[token]))
            if len(tokens) == max_new_tokens or (stop_at_eos and token in eos_token_ids):
                return Greedy(tokens, probs)
            step = torch.tensor([[token]], device=input_ids.device)
            logits = lm(input_ids=step, past_key_values=cache, use_cache=True).logits[0, -1]
