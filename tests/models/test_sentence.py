"""The bundled sentence encoder loads offline and embeds by meaning; the semantic router routes on it."""

from __future__ import annotations

import torch

from models.mixture import attach_mixture
from models.sentence import SENTENCE_DIM, shared_encoder
from tests.models.conftest import IDS_FOR_SENTENCES, make_spec, randomise_experts, tiny_llama


def test_embeddings_are_unit_vectors_that_place_paraphrases_closer() -> None:
    encoder = shared_encoder()
    vectors = encoder.encode(
        [
            "Convert the date 2024-03-05 to DD/MM/YYYY.",
            "Rewrite this date in day/month/year format: 1999-12-31.",
            "What is the domain of the email address alice@example.org?",
        ]
    )
    assert vectors.shape == (3, SENTENCE_DIM)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(3))
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] + 0.1


def test_semantic_router_with_the_sentence_encoder_routes_on_the_prompt_embedding() -> None:
    spec = make_spec(
        "semantic", router={"kind": "semantic", "options": {"encoder": "sentence", "granularity": "sequence"}}
    )
    mixture = attach_mixture(tiny_llama(), spec)
    randomise_experts(mixture)
    embeddings = shared_encoder().encode(["Reformat this date: 2024-03-05", "Is 17 odd or even?"])
    with mixture.tracing() as trace, torch.no_grad():
        mixture(IDS_FOR_SENTENCES, sentence_embedding=embeddings)
    weights = trace.stacked()  # (layers, tokens, experts) of the first prompt
    assert weights.shape == (len(mixture.layer_names), IDS_FOR_SENTENCES.shape[1], len(spec.experts))
    with mixture.tracing() as swapped, torch.no_grad():
        mixture(IDS_FOR_SENTENCES, sentence_embedding=embeddings.flip(0))
    assert not torch.allclose(trace.stacked(), swapped.stacked())  # routing follows the embedding
