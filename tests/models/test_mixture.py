"""Attaching a mixture to a real (tiny) Llama: base equality, PEFT equality, gradients, save/load, export, traces."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from models.mixture import (
    MANIFEST,
    MixtureError,
    MixtureModel,
    UnsafeWeightsError,
    _sha256,
    attach_mixture,
    expert_file,
    export_peft_adapter,
    export_route,
    load_experts,
    save_experts,
)
from models.routers import ROUTER_KINDS
from tests.models.conftest import TASKS, make_spec, randomise_experts, tiny_llama

IDS = torch.tensor([[1, 5, 9, 13, 2, 7, 3], [4, 4, 8, 15, 16, 23, 42]])
TASK_IDS = torch.tensor([0, 2])


def _logits(mixture: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return mixture(IDS, task_ids=TASK_IDS).logits


@pytest.mark.parametrize("kind", list(ROUTER_KINDS))
def test_at_init_the_mixture_equals_the_base_exactly(kind: str) -> None:
    base_logits = tiny_llama()(IDS).logits.detach()
    mixture = attach_mixture(tiny_llama(), make_spec(kind))
    assert torch.equal(_logits(mixture), base_logits)


def test_single_expert_equals_peft_lora_with_the_same_weights() -> None:
    spec = make_spec("single", universal={"count": 1, "rank": 4, "alpha": 8.0})
    mixture = attach_mixture(tiny_llama(), spec)
    randomise_experts(mixture)
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8.0, target_modules=spec.target_modules))
    with torch.no_grad():
        for layer in mixture.layers():
            lora = peft_model.base_model.model.get_submodule(layer.name)
            lora.lora_A["default"].weight.copy_(layer.experts.down[0])
            lora.lora_B["default"].weight.copy_(layer.experts.up[0])
        peft_logits = peft_model(IDS).logits
    assert (_logits(mixture) - peft_logits).abs().max() <= 1e-6
    assert not torch.allclose(peft_logits, tiny_llama()(IDS).logits)  # the experts do change the output


def test_missing_target_module_is_named() -> None:
    with pytest.raises(MixtureError, match="qq_proj"):
        attach_mixture(tiny_llama(), make_spec("task", target_modules=["q_proj", "qq_proj"]))


def test_only_mixture_parameters_get_gradients_and_the_base_stays_bit_identical() -> None:
    spec = make_spec("topk", universal={"count": 1, "train_embeddings": True})
    mixture = attach_mixture(tiny_llama(), spec)
    base_before = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    groups = mixture.parameter_groups()
    n_trainable = mixture.set_trainable(experts=mixture.expert_names, router=True, extras=True)
    opted_in = {id(p) for params in groups.values() for p in params}
    assert n_trainable == sum(p.numel() for p in mixture.parameters() if id(p) in opted_in)
    optimizer = torch.optim.AdamW([p for p in mixture.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        mixture.train()
        out = mixture(IDS, task_ids=TASK_IDS)
        loss = out.logits.float().pow(2).mean() + mixture.router_loss()
        loss.backward()
        for name, p in mixture.named_parameters():
            assert (p.grad is not None) == (id(p) in opted_in), name
        optimizer.step()
        optimizer.zero_grad()
    # the frozen base linears, norms and head are bit-identical; the embedding copy trained, the base's did not
    state = mixture.model.state_dict()
    for key, value in base_before.items():
        mapped = (
            key.replace(".weight", ".base.weight") if any(f"{t}.weight" in key for t in spec.target_modules) else key
        )
        if "embed_tokens" not in key:
            assert torch.equal(state[mapped], value), key
    assert not torch.equal(mixture.model.get_input_embeddings().weight, base_before["model.embed_tokens.weight"])


def test_stage_freezing_trains_only_the_chosen_expert() -> None:
    mixture = attach_mixture(tiny_llama(), make_spec("softmax"))
    randomise_experts(mixture)
    before = {n: [p.clone() for p in ps] for n, ps in mixture.parameter_groups().items()}
    mixture.set_trainable(experts=["dates-expert"])
    optimizer = torch.optim.AdamW([p for p in mixture.parameters() if p.requires_grad], lr=1e-2)
    mixture(IDS, task_ids=TASK_IDS).logits.pow(2).mean().backward()
    optimizer.step()
    after = mixture.parameter_groups()
    for group, params in before.items():
        changed = any(not torch.equal(a, b) for a, b in zip(params, after[group], strict=True))
        assert changed == (group == "expert:dates-expert"), group


@pytest.mark.parametrize("kind", ["task", "topk", "grouped", "semantic", "modula"])
def test_save_then_load_gives_identical_logits(kind: str, tmp_path: Path) -> None:
    spec = make_spec(kind)
    mixture = attach_mixture(tiny_llama(), spec)
    randomise_experts(mixture)
    expected = _logits(mixture)
    checksums = save_experts(mixture, tmp_path / "saved")
    assert all(name.endswith(".safetensors") for name in checksums)
    loaded = attach_mixture(tiny_llama(), spec)
    assert not torch.equal(_logits(loaded), expected)
    load_experts(loaded, tmp_path / "saved")
    assert torch.equal(_logits(loaded), expected)


def _saved(tmp_path: Path) -> tuple[object, Path]:
    spec = make_spec("softmax")
    mixture = attach_mixture(tiny_llama(), spec)
    randomise_experts(mixture)
    folder = tmp_path / "saved"
    save_experts(mixture, folder)
    return spec, folder


class _Sentinel:
    path = ""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (Path(self.path),))


def test_a_pickle_file_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    spec, folder = _saved(tmp_path)
    sentinel = tmp_path / "pwned"
    payload = _Sentinel()
    payload.path = str(sentinel)
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(payload))
    with pytest.raises(UnsafeWeightsError, match="adapter_model.bin"):
        load_experts(attach_mixture(tiny_llama(), spec), folder)
    assert not sentinel.exists()


def test_a_truncated_file_is_reported_not_crashed(tmp_path: Path) -> None:
    spec, folder = _saved(tmp_path)
    path = folder / expert_file("dates-expert")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(MixtureError, match="checksum"):
        load_experts(attach_mixture(tiny_llama(), spec), folder)


def test_wrong_shapes_and_undeclared_modules_are_named(tmp_path: Path) -> None:
    spec, folder = _saved(tmp_path)
    path = folder / expert_file("dates-expert")
    good = load_file(str(path))
    key = next(iter(good))
    manifest = json.loads((folder / MANIFEST).read_text())
    for tensors, message in [
        (good | {key: torch.zeros(3, 3)}, "has shape"),
        (good | {"model.layers.9.mlp.x_proj.lora_A": torch.zeros(1)}, "does not declare"),
        ({k: v.to(torch.int64) for k, v in good.items()}, "dtype"),
    ]:
        save_file(tensors, str(path))
        manifest["files"][path.name] = _sha256(path)
        (folder / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(MixtureError, match=message):
            load_experts(attach_mixture(tiny_llama(), spec), folder)


@pytest.mark.parametrize(
    ("kind", "expert", "with_universal"),
    [
        ("single", "universal-0", True),
        ("task", "emails-expert", True),
        ("task", "emails-expert", False),
        ("semantic", "questions-expert", True),
        ("modula", "dates-expert", True),
    ],
)
def test_export_loads_in_plain_peft_with_the_same_logits(
    kind: str, expert: str, with_universal: bool, tmp_path: Path
) -> None:
    options = {"variant": "flan"} if kind == "modula" else {}
    spec = make_spec(kind, router={"kind": kind, "options": options})
    if kind == "single":
        spec = make_spec("single", experts=[])
    mixture = attach_mixture(tiny_llama(), spec)
    randomise_experts(mixture)
    folder = export_peft_adapter(mixture, expert, tmp_path / "adapter", with_universal=with_universal)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(folder))
    with torch.no_grad(), mixture.overridden(**export_route(mixture, expert, with_universal=with_universal)):
        expected = mixture(IDS, task_ids=TASK_IDS).logits
        got = peft_model(IDS).logits
    assert (expected - got).abs().max() <= 1e-5
    assert not torch.allclose(got, tiny_llama()(IDS).logits)


@pytest.mark.parametrize("kind", ["task", "topk", "grouped", "semantic"])
def test_trace_records_layer_token_expert_weights_that_sum_to_one(kind: str) -> None:
    mixture = attach_mixture(tiny_llama(), make_spec(kind))
    randomise_experts(mixture)
    prompt = IDS[:1]
    with mixture.tracing() as trace:
        out = mixture.generate(prompt, task_ids=TASK_IDS[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    weights = trace.stacked()  # (layers, tokens, experts)
    n_layers = len(mixture.layer_names)
    generated = out.shape[1] - prompt.shape[1]
    assert weights.shape == (n_layers, prompt.shape[1] + generated - 1, len(mixture.spec.experts))
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2]))
    if kind == "grouped":
        assert trace.group_weights and trace.expert_names[mixture.layer_names[0]] == [
            e.name for e in mixture.spec.experts
        ]
    if kind == "semantic":
        assert trace.scale


def test_tracing_off_records_nothing_and_adds_no_hooks() -> None:
    mixture = attach_mixture(tiny_llama(), make_spec("softmax"))
    _logits(mixture)
    assert mixture.state.trace is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in mixture.modules())
    with mixture.tracing() as trace:
        _logits(mixture)
    assert len(trace.weights) == len(mixture.layer_names)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in mixture.modules())


def test_sequence_gates_are_computed_once_per_generation() -> None:
    mixture = attach_mixture(
        tiny_llama(), make_spec("softmax", router={"kind": "softmax", "options": {"granularity": "sequence"}})
    )
    layer = next(mixture.layers())
    calls = []
    original = layer.router.forward
    layer.router.forward = lambda *a, **k: calls.append(1) or original(*a, **k)  # type: ignore[method-assign]
    mixture.generate(IDS[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("kind", "granularity", "forced"),
    [
        ("softmax", "token", False),
        ("softmax", "sequence", False),
        ("modula", "sequence", False),
        ("topk", "token", True),
    ],
)
def test_cached_decoding_computes_what_full_forwards_compute(kind: str, granularity: str, forced: bool) -> None:
    """Generation reuses the KV cache and, where the gates are fixed for the sequence, their per-rank coefficients;
    each step's scores must equal a full forward of the sequence so far (the prompt alone feeding sequence gates)."""
    router = {"kind": kind, "options": {"granularity": granularity}}
    mixture = attach_mixture(tiny_llama(), make_spec(kind, router=router)).eval()
    randomise_experts(mixture)
    prompt = IDS[:1]
    weights = dict.fromkeys(mixture.expert_names[1:3], 0.5) if forced else None
    with torch.no_grad(), mixture.overridden(forced=weights):
        out = mixture.generate(
            prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True
        )
        for step, scores in enumerate(out.scores):
            seen = out.sequences[:, : prompt.shape[1] + step]
            labels = torch.full_like(seen, -100)
            labels[:, prompt.shape[1] :] = 0  # generated tokens are not prompt: sequence gates ignore them
            full = mixture(seen, labels=labels).logits[:, -1]
            torch.testing.assert_close(scores, full, atol=1e-5, rtol=1e-5)


def _decoded_scores(mixture: MixtureModel, prompt: torch.Tensor, *, fold: bool = True) -> torch.Tensor:
    mixture.state.fold_fixed_gates = fold
    try:
        out = mixture.generate(
            prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True
        )
    finally:
        mixture.state.fold_fixed_gates = False
    return torch.stack(out.scores, dim=1).float()  # (B, steps, V)


def _sequence_mixture() -> MixtureModel:
    router = {"kind": "modula", "options": {"granularity": "sequence"}}
    mixture = attach_mixture(tiny_llama(), make_spec("modula", router=router)).eval()
    randomise_experts(mixture)
    return mixture


def test_fixed_gates_are_folded_into_one_weight_for_one_sequence_and_kept_apart_for_a_batch() -> None:
    mixture = _sequence_mixture()
    layers = list(mixture.layers())
    _decoded_scores(mixture, IDS[1:], fold=False)
    assert not any("_merged" in layer.__dict__ for layer in layers)  # off unless asked for: no folded copies
    batch = _decoded_scores(mixture, IDS)
    assert not any("_merged" in layer.__dict__ for layer in layers)  # per-sample gates: no folding
    for row in range(IDS.shape[0]):
        alone = _decoded_scores(mixture, IDS[row : row + 1])
        torch.testing.assert_close(alone, batch[row : row + 1], atol=1e-5, rtol=1e-5)
    buffers = [layer.__dict__["_merged"].data_ptr() for layer in layers]
    _decoded_scores(mixture, IDS[1:])
    assert [layer.__dict__["_merged"].data_ptr() for layer in layers] == buffers  # allocated once, reused
    unfolded = _decoded_scores(mixture, IDS[1:], fold=False)
    torch.testing.assert_close(unfolded, batch[1:], atol=1e-5, rtol=1e-5)


def test_folding_into_a_bf16_base_errs_no_more_than_the_bf16_base_itself() -> None:
    """Folding rounds W + B diag(c) A to the base's dtype once: an error of the size bf16 already brings."""
    mixture = _sequence_mixture()
    exact = _decoded_scores(mixture, IDS[:1])
    mixture.store_base_in(torch.bfloat16)
    folded_error = (_decoded_scores(mixture, IDS[:1]) - exact).abs().max()
    apart_error = (_decoded_scores(mixture, IDS[:1], fold=False) - exact).abs().max()
    assert 0 < apart_error < 0.1
    assert folded_error <= 3 * apart_error


def test_modula_res_keeps_universal_on_when_every_domain_expert_is_off() -> None:
    mixture = attach_mixture(tiny_llama(), make_spec("modula"))
    randomise_experts(mixture)
    domain = [e.name for e in mixture.spec.experts]
    with mixture.overridden(disabled=domain):
        only_universal = _logits(mixture)
    with mixture.overridden(disabled=[*domain, "universal-0"]):
        nothing = _logits(mixture)
    assert torch.allclose(
        nothing,
        tiny_llama()(
            IDS,
        ).logits,
        atol=1e-6,
    )
    assert not torch.allclose(only_universal, nothing)


def test_add_task_keeps_every_old_expert_bit_identical(tmp_path: Path) -> None:
    spec = make_spec("softmax")
    mixture = attach_mixture(tiny_llama(), spec)
    randomise_experts(mixture)
    save_experts(mixture, tmp_path / "parent")
    grown_spec = spec.with_task_expert("times")
    grown = attach_mixture(tiny_llama(), spec)
    load_experts(grown, tmp_path / "parent")
    assert grown.add_task_expert(grown_spec) == "times"
    assert TASKS + ["times"] == grown.spec.tasks
    old = mixture.parameter_groups()
    new = grown.parameter_groups()
    for name in mixture.expert_names:
        assert all(torch.equal(a, b) for a, b in zip(old[f"expert:{name}"], new[f"expert:{name}"], strict=True))
    with torch.no_grad():
        assert grown(IDS, task_ids=torch.tensor([3, 0])).logits.shape == _logits(mixture).shape


def test_seq2seq_models_take_a_mixture_too() -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config).eval()
    source, target = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[0, 5, 6]])
    with torch.no_grad():
        base = model(input_ids=source, decoder_input_ids=target).logits
        mixture = attach_mixture(model, make_spec("softmax", target_modules=["q", "v"]))
        assert torch.equal(mixture(source, decoder_input_ids=target).logits, base)
        randomise_experts(mixture)
        assert not torch.allclose(mixture(source, decoder_input_ids=target).logits, base)
    assert mixture.generate(source, max_new_tokens=3, do_sample=False).shape[1] >= 2


def test_own_task_routing_sends_each_sample_to_its_task_expert_only() -> None:
    mixture = attach_mixture(tiny_llama(), make_spec("softmax"))
    randomise_experts(mixture)
    with torch.no_grad(), mixture.own_task_routing():
        routed = mixture(IDS, task_ids=TASK_IDS).logits
    for row, task in enumerate(TASK_IDS.tolist()):
        with torch.no_grad(), mixture.overridden(forced={mixture.spec.experts[task].name: 1.0}):
            expected = mixture(IDS[row : row + 1], task_ids=TASK_IDS[row : row + 1]).logits
        torch.testing.assert_close(routed[row : row + 1], expected)
    with torch.no_grad(), mixture.own_task_routing(universal_on=False):
        no_universal = mixture(IDS, task_ids=TASK_IDS).logits
    assert not torch.allclose(no_universal, routed)


@pytest.mark.parametrize("kind", ["modula", "semantic"])
def test_a_bf16_base_keeps_experts_and_routers_in_fp32_and_the_same_outputs(kind: str) -> None:
    mixture = attach_mixture(tiny_llama(), make_spec(kind)).eval()
    randomise_experts(mixture)
    full = _logits(mixture)
    mixture.store_base_in(torch.bfloat16)
    adapters = {n for n, _ in mixture.named_parameters() if any(k in n for k in ("experts.", "shared.", "router."))}
    dtypes = {n: p.dtype for n, p in mixture.named_parameters()}
    assert adapters and all(dtypes[n] == torch.float32 for n in adapters)
    assert {dtypes[n] for n in dtypes if n not in adapters} == {torch.bfloat16}  # embeddings, norms, base linears
    half = _logits(mixture)
    assert half.dtype == torch.bfloat16
    assert (half.float().argmax(-1) == full.argmax(-1)).float().mean() >= 0.9
    torch.testing.assert_close(half.float(), full, atol=0.1, rtol=0.05)
