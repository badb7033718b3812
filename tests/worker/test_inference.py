"""Inference on trained mixtures: loading from the registry and store, greedy output, routing capture, overrides."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import torch

from app.context import StudioContext
from app.services.mixtures import save_mixture
from models.bases import BUILTIN_TINY, load_base
from models.demo import DEMO_TASKS, demo_spec
from models.mixture import attach_mixture
from models.registry import Job, JobState, Mixture
from tests.conftest import demo_studio, train_now
from worker import inference
from worker.inference import InferenceError, LoadedMixture, NotTrainedError, infer, load_trained
from worker.jobs import experts_prefix

PROMPT, INPUT = "Rewrite the date as DD/MM/YYYY.", "2031-07-19"
FIRST, SECOND, THIRD, LAST = (f"{task}-expert" for task in DEMO_TASKS)


@dataclass
class Trained:
    ctx: StudioContext
    mixture_id: uuid.UUID


def _spec(router: str, steps: int = 2, **options: object) -> dict:
    spec = demo_spec(BUILTIN_TINY, router=router).model_dump(mode="json")
    spec["router"]["options"] |= options
    spec["schedule"] |= {
        "kind": "joint",
        "stage_steps": [steps],
        "batch_size": 4,
        "eval_every": 1000,
        "checkpoint_every": 1000,
        "max_length": 96,
    }
    return spec


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, bases_dir: Path) -> Iterator[Trained]:
    """One tiny mixture (softmax router per token) trained a few steps through the real job path."""
    ctx = demo_studio(tmp_path_factory.mktemp("studio"), bases_dir)
    mixture = save_mixture(ctx=ctx, name="softmax", spec_json=_spec("softmax"), dataset_names=list(DEMO_TASKS))
    train_now(ctx.settings, mixture.id)
    yield Trained(ctx, mixture.id)
    inference.clear_cache()


@pytest.fixture
def loaded(trained: Trained) -> LoadedMixture:
    return load_trained(trained.ctx.settings, trained.mixture_id)


def _in_memory(bases_dir: Path, router: str, **options: object) -> LoadedMixture:
    """An untrained mixture (B = 0, routers as initialised): enough to see what each router exposes."""
    from models.spec import MixtureSpec

    model, tokenizer = load_base(BUILTIN_TINY, bases_dir)
    mixture = attach_mixture(model, MixtureSpec.model_validate(_spec(router, **options)))
    return LoadedMixture(uuid.uuid4(), router, "-", mixture.eval(), tokenizer)


def test_infer_returns_the_text_tokens_and_routing_weights_of_every_layer(loaded: LoadedMixture) -> None:
    result = infer(loaded, PROMPT, input_text=INPUT, max_new_tokens=12)
    n_layers, n_experts = len(loaded.model.layer_names), len(DEMO_TASKS)
    assert isinstance(result.text, str) and 1 <= len(result.generated_tokens) <= 12
    assert result.prompt_tokens and all(isinstance(t, str) and t for t in result.prompt_tokens)
    assert len(result.token_probs) == len(result.generated_tokens) and all(0 < p <= 1 for p in result.token_probs)
    assert result.routed_names == [f"{task}-expert" for task in DEMO_TASKS]
    assert result.expert_names == ["universal-0", *result.routed_names]
    assert result.layer_weights.shape == (n_layers, n_experts)
    rows = len(result.prompt_tokens) + len(result.generated_tokens) - 1  # the last token is never fed back in
    assert result.token_weights.shape == (n_layers, rows, n_experts) and len(result.traced_tokens) == rows
    np.testing.assert_allclose(result.token_weights.sum(-1), 1.0, atol=1e-5)  # softmax normalises
    np.testing.assert_allclose(result.layer_weights, result.token_weights.mean(1), atol=1e-6)
    assert result.group_weights is None and result.scale is None


def test_greedy_output_is_deterministic_and_tracing_does_not_change_it(loaded: LoadedMixture) -> None:
    first = infer(loaded, PROMPT, input_text=INPUT)
    again = infer(loaded, PROMPT, input_text=INPUT)
    untraced = infer(loaded, PROMPT, input_text=INPUT, trace=False)
    assert first.text == again.text == untraced.text and first.token_probs == again.token_probs
    np.testing.assert_array_equal(first.token_weights, again.token_weights)
    assert untraced.layer_weights is None and untraced.token_weights is None


def test_a_disabled_expert_gets_weight_zero_and_the_output_moves(loaded: LoadedMixture) -> None:
    routed = infer(loaded, PROMPT, input_text=INPUT, stop_at_eos=False, max_new_tokens=6)
    off = infer(loaded, PROMPT, input_text=INPUT, disabled=[FIRST], stop_at_eos=False, max_new_tokens=6)
    assert (off.token_weights[..., 0] == 0).all() and (routed.token_weights[..., 0] > 0).all()
    np.testing.assert_allclose(off.token_weights.sum(-1), 1.0, atol=1e-5)  # the others renormalised
    assert off.token_probs != routed.token_probs


def test_forced_weights_replace_the_router(loaded: LoadedMixture) -> None:
    routed = infer(loaded, PROMPT, input_text=INPUT, stop_at_eos=False, max_new_tokens=6)
    forced = infer(loaded, PROMPT, input_text=INPUT, forced={THIRD: 30.0}, stop_at_eos=False, max_new_tokens=6)
    expected = np.zeros((len(loaded.model.layer_names), len(DEMO_TASKS)))
    expected[:, 2] = 30.0
    np.testing.assert_allclose(forced.layer_weights, expected)
    assert forced.token_probs != routed.token_probs
    both = infer(loaded, PROMPT, input_text=INPUT, forced={THIRD: 1.0}, disabled=[THIRD])
    assert (both.layer_weights == 0).all()  # disabling wins over forcing


def test_the_playground_folds_fixed_gates_and_answers_as_with_the_experts_apart(trained: Trained) -> None:
    """Forced weights fix the gates for the sequence: the loaded mixture folds them into its base weights, which in
    fp32 gives what the experts kept apart give (bf16's rounding: ``tests/models/test_mixture.py``)."""
    inference.clear_cache()
    try:
        loaded = load_trained(
            trained.ctx.settings.model_copy(update={"inference_dtype": "float32"}), trained.mixture_id
        )
        request = {"input_text": INPUT, "forced": {SECOND: 0.7, THIRD: 0.3}, "stop_at_eos": False, "max_new_tokens": 6}
        assert loaded.model.state.fold_fixed_gates
        folded = infer(loaded, PROMPT, **request)
        assert all("_merged" in layer.__dict__ for layer in loaded.model.layers())
        loaded.model.state.fold_fixed_gates = False
        apart = infer(loaded, PROMPT, **request)
    finally:
        inference.clear_cache()
    assert folded.generated_tokens == apart.generated_tokens
    np.testing.assert_allclose(folded.token_probs, apart.token_probs, atol=1e-5)
    np.testing.assert_array_equal(folded.token_weights, apart.token_weights)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prompt": "   \n"}, "prompt is empty"),
        ({"prompt": ""}, "prompt is empty"),
        ({"max_new_tokens": 0}, "from 1 to 64"),
        ({"max_new_tokens": 65}, "from 1 to 64"),
        ({"task": "poetry"}, "unknown task 'poetry'"),
        ({"disabled": ["nobody"]}, "unknown expert(s) nobody"),
        ({"forced": {FIRST: -1.0}}, "≥ 0"),
        ({"forced": {FIRST: float("nan")}}, "≥ 0"),
        ({"prompt": "bell \x07 here"}, "control character"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(loaded: LoadedMixture, options: dict, message: str) -> None:
    arguments = {"prompt": PROMPT} | options
    with pytest.raises(InferenceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        infer(loaded, arguments.pop("prompt"), **arguments)


def test_an_untrained_or_missing_mixture_cannot_be_loaded(trained: Trained) -> None:
    untrained = save_mixture(
        ctx=trained.ctx, name="untrained", spec_json=_spec("softmax"), dataset_names=list(DEMO_TASKS)
    )
    with pytest.raises(NotTrainedError, match="'untrained' is not trained yet"):
        load_trained(trained.ctx.settings, untrained.id)
    with pytest.raises(InferenceError, match="no such mixture"):
        load_trained(trained.ctx.settings, uuid.uuid4())


def _retrained(trained: Trained, mixture_id: uuid.UUID, *, leave_out: str = "") -> None:
    """A newer successful job of ``mixture_id`` with the trained files (but ``leave_out``), as a retraining leaves."""
    store = trained.ctx.store
    with trained.ctx.session() as s:
        old = s.scalars(sa.select(Job).where(Job.mixture_id == trained.mixture_id).order_by(Job.created_at)).first()
        old_prefix = experts_prefix(old)
        newer = Job(
            mixture_id=mixture_id, spec_json=old.spec_json, state=JobState.SUCCEEDED, finished_at=datetime.now(UTC)
        )
        s.add(newer)
        s.flush()
        new_prefix = experts_prefix(newer)
        s.execute(sa.update(Mixture).where(Mixture.id == mixture_id).values(trained=True))
    for key in store.list(old_prefix):
        if not key.endswith(f"/{leave_out}"):
            store.put_bytes(f"{new_prefix}/{key.rsplit('/', 1)[1]}", store.get_bytes(key))


def test_loaded_mixtures_are_cached_until_a_newer_training(trained: Trained) -> None:
    settings = trained.ctx.settings
    first = load_trained(settings, trained.mixture_id)
    assert load_trained(settings, trained.mixture_id) is first
    _retrained(trained, trained.mixture_id)
    second = load_trained(settings, trained.mixture_id)
    assert second is not first and second.stamp != first.stamp
    assert load_trained(settings, trained.mixture_id) is second
    assert infer(second, PROMPT, input_text=INPUT).text == infer(first, PROMPT, input_text=INPUT).text


def test_deleted_expert_files_give_a_message(trained: Trained) -> None:
    mixture = save_mixture(ctx=trained.ctx, name="damaged", spec_json=_spec("softmax"), dataset_names=list(DEMO_TASKS))
    _retrained(trained, mixture.id, leave_out=f"expert-{LAST}.safetensors")
    with pytest.raises(InferenceError, match="'damaged' could not be loaded: expert file .* is missing"):
        load_trained(trained.ctx.settings, mixture.id)


def test_task_routing_needs_the_task_and_routes_to_its_expert(bases_dir: Path) -> None:
    loaded = _in_memory(bases_dir, "task")
    with pytest.raises(InferenceError, match="routes by task: choose the prompt's task"):
        infer(loaded, PROMPT)
    result = infer(loaded, PROMPT, task=DEMO_TASKS[2], max_new_tokens=3)
    expected = np.zeros_like(result.token_weights)
    expected[..., 2] = 1.0
    np.testing.assert_array_equal(result.token_weights, expected)


def test_grouped_router_exposes_group_weights(bases_dir: Path) -> None:
    result = infer(_in_memory(bases_dir, "grouped"), PROMPT, max_new_tokens=3)
    n_layers, rows = result.token_weights.shape[:2]
    assert result.group_names == [f"{task}-expert" for task in DEMO_TASKS]  # no groups named: one each
    assert result.group_weights.shape == (n_layers, rows, len(DEMO_TASKS))
    np.testing.assert_allclose(result.group_weights.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(result.token_weights.sum(-1), 1.0, atol=1e-5)


def test_semantic_router_exposes_the_task_adaptive_scale(bases_dir: Path) -> None:
    loaded = _in_memory(bases_dir, "semantic")
    result = infer(loaded, PROMPT, task=DEMO_TASKS[0], max_new_tokens=3)
    assert result.scale.shape == (len(loaded.model.layer_names),) and ((result.scale > 0) & (result.scale < 1)).all()
    np.testing.assert_allclose(result.token_weights.sum(-1), 1.0, atol=1e-5)


def test_sequence_routing_gives_every_token_the_prompts_weights(bases_dir: Path) -> None:
    result = infer(_in_memory(bases_dir, "softmax", granularity="sequence"), PROMPT, max_new_tokens=4)
    np.testing.assert_allclose(
        result.token_weights, np.broadcast_to(result.token_weights[:, :1], result.token_weights.shape)
    )


def test_expert_weights_changed_in_place_are_seen_by_the_next_request(bases_dir: Path) -> None:
    """Generation reuses the stacked expert matrices between tokens; a changed parameter must rebuild them."""
    import torch

    loaded = _in_memory(bases_dir, "softmax")
    before = infer(loaded, PROMPT, forced={FIRST: 1.0}, stop_at_eos=False, max_new_tokens=3)
    with torch.no_grad():
        for layer in loaded.model.layers():
            layer.experts.up[1].add_(0.5)  # B of the first task expert (index 0 is the universal expert)
    after = infer(loaded, PROMPT, forced={FIRST: 1.0}, stop_at_eos=False, max_new_tokens=3)
    assert after.token_probs != before.token_probs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_inference_dtype_setting_decides_the_bases_dtype_not_the_experts(trained: Trained, dtype: str) -> None:
    settings = trained.ctx.settings.model_copy(update={"inference_dtype": dtype})
    inference.clear_cache()
    try:
        loaded = load_trained(settings, trained.mixture_id)
        base = next(loaded.model.layers()).base.weight
        experts = [p for n, p in loaded.model.named_parameters() if "experts." in n or "router." in n]
        assert base.dtype == getattr(torch, dtype) and {p.dtype for p in experts} == {torch.float32}
        result = infer(loaded, PROMPT, input_text=INPUT, max_new_tokens=4, stop_at_eos=False)
        assert len(result.generated_tokens) == 4 and np.isfinite(result.token_weights).all()
    finally:
        inference.clear_cache()
