"""The playground's greedy loop: the same tokens and probabilities as ``generate``, EOS handling, a prompt cache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from models.decoding import greedy_decode
from models.mixture import MixtureModel, attach_mixture
from tests.models.conftest import make_spec, randomise_experts, tiny_llama

PROMPT = torch.tensor([[1, 5, 9, 13, 2, 7, 3, 11]])


def _mixture(kind: str, granularity: str = "token") -> MixtureModel:
    spec = make_spec(kind, router={"kind": kind, "options": {"granularity": granularity}})
    mixture = attach_mixture(tiny_llama(), spec).eval()
    randomise_experts(mixture)
    return mixture


def _generate(model: torch.nn.Module, tokens: int, **routing: torch.Tensor):  # noqa: ANN202 - GenerateOutput
    return model.generate(
        PROMPT,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
        **routing,
    )


@pytest.mark.parametrize(
    ("kind", "granularity"),
    [("softmax", "token"), ("modula", "sequence"), ("task", "sequence"), ("semantic", "token")],
)
def test_greedy_decode_chooses_what_generate_chooses(kind: str, granularity: str) -> None:
    mixture = _mixture(kind, granularity)
    task_ids = torch.tensor([1])
    expected = _generate(mixture, 6, task_ids=task_ids)
    out = greedy_decode(mixture, PROMPT, max_new_tokens=6, eos_token_ids=[0], stop_at_eos=False, task_ids=task_ids)
    assert out.tokens == expected.sequences[0, PROMPT.shape[1] :].tolist()
    chosen = [scores[0].softmax(-1)[t].item() for scores, t in zip(expected.scores, out.tokens, strict=True)]
    assert out.probs == pytest.approx(chosen, abs=1e-5)
    assert not mixture.state.generating and not mixture.state.decode_cache  # nothing leaks into the next forward


def test_the_base_alone_decodes_through_the_same_loop() -> None:
    base = tiny_llama()
    expected = _generate(base, 5).sequences[0, PROMPT.shape[1] :].tolist()
    assert greedy_decode(base, PROMPT, max_new_tokens=5, eos_token_ids=[0], stop_at_eos=False).tokens == expected


def test_eos_stops_the_loop_or_is_never_chosen() -> None:
    mixture = _mixture("softmax")
    first = greedy_decode(mixture, PROMPT, max_new_tokens=4).tokens[0]
    stopped = greedy_decode(mixture, PROMPT, max_new_tokens=4, eos_token_ids=[first])
    assert stopped.tokens == [first]
    ignored = greedy_decode(mixture, PROMPT, max_new_tokens=4, eos_token_ids=[first], stop_at_eos=False)
    assert len(ignored.tokens) == 4 and first not in ignored.tokens


def test_a_cached_prompt_head_gives_the_same_tokens() -> None:
    """The playground runs the template head once and decodes from a copy of its KV cache (token routing)."""
    mixture = _mixture("softmax")
    whole = greedy_decode(mixture, PROMPT, max_new_tokens=5, stop_at_eos=False)
    cache = DynamicCache(config=mixture.model.config)
    with torch.no_grad():
        mixture(PROMPT[:, :4], past_key_values=cache, use_cache=True)
    headed = greedy_decode(mixture, PROMPT, max_new_tokens=5, stop_at_eos=False, past_key_values=cache)
    assert headed.tokens == whole.tokens
    assert headed.probs == pytest.approx(whole.probs, abs=1e-5)


def test_one_sequence_only() -> None:
    with pytest.raises(ValueError, match="one sequence"):
        greedy_decode(_mixture("softmax"), PROMPT.repeat(2, 1), max_new_tokens=2)
