"""Running a trained mixture on one prompt: load it from the registry and the artifact store, generate, trace routing.

The playground calls this; a Celery ``infer`` task or an evaluation can reuse it (it never imports ``app``).
Loading reuses what training wrote: the experts of the mixture's newest successful job, read back through the
manifest's checksums (safetensors only) onto a frozen base from ``load_base``. Loaded mixtures stay in a small LRU
cache keyed by (mixture id, the job that trained it), so a retrained mixture is loaded afresh and an old one falls out.

Generation is greedy with the KV cache, so the same request gives the same answer. Routing capture records one
``(tokens, experts)`` tensor per layer and forward (``RoutingTrace``); it is turned into arrays once, at the end.
"""

from __future__ import annotations

import copy
import math
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
import torch
from pydantic import ValidationError

from models.bases import UnknownBaseModelError
from models.data import ExampleRow, prompt_ids
from models.decoding import greedy_decode
from models.mixture import MixtureError, MixtureModel, load_trained_mixture
from models.precision import inference_dtype
from models.registry import Job, JobState, Mixture, session_scope
from models.settings import Settings
from models.spec import MixtureSpec
from models.storage import ArtifactStore
from worker.jobs import download_folder, experts_prefix

MAX_NEW_TOKENS = 64
DEFAULT_NEW_TOKENS = 16
MAX_PROMPT_TOKENS = 1024
HEADS_KEPT = 8  # template heads kept per loaded mixture (one per routing setting: task, overrides)
CACHE_SIZE = 2  # loaded mixtures kept in memory (SmolLM2-135M, bf16 base + folded copies: about 0.5 GB each)


class InferenceError(ValueError):
    """A request that cannot run, with a message meant for the person who sent it."""


class NotTrainedError(InferenceError):
    """The mixture has no successful training job, so there are no experts to load."""


@dataclass
class LoadedMixture:
    """A trained mixture ready to generate; ``lock`` serialises requests (the routing state is per model)."""

    mixture_id: uuid.UUID
    name: str
    stamp: str
    model: MixtureModel
    tokenizer: Any
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    head_ids: list[int] | None = None  # the prompt template's fixed head (None: found on first use; []: not cached)
    heads: OrderedDict[tuple, _Head] = field(default_factory=OrderedDict, repr=False)

    @property
    def spec(self) -> MixtureSpec:
        return self.model.spec


@dataclass
class _Head:
    """The template head run once for one routing setting: its KV cache and its routing rows per layer."""

    cache: Any  # transformers DynamicCache, copied for each request
    weights: dict[str, torch.Tensor]  # layer -> (H, E)
    group_weights: dict[str, torch.Tensor]  # layer -> (H, K)
    scale: dict[str, list[torch.Tensor]]  # layer -> [(1,)]


@dataclass
class InferenceResult:
    """One generation and the routing behind it. Weight arrays are over ``routed_names`` (their last axis)."""

    text: str
    prompt_tokens: list[str]  # readable strings, one per prompt token
    generated_tokens: list[str]
    token_probs: list[float]  # probability of each generated token when it was chosen
    expert_names: list[str]  # every expert, universal first
    routed_names: list[str]  # the experts the router weighs (universal ones only when they are routed)
    layer_names: list[str]  # mixture layers in model order (full module names)
    layer_weights: np.ndarray | None  # (L, E) mean over the traced tokens; None without trace or router
    token_weights: np.ndarray | None  # (L, T, E), rows = ``traced_tokens``
    group_names: list[str] = field(default_factory=list)
    group_weights: np.ndarray | None = None  # (L, T, K) group weights (grouped router)
    scale: np.ndarray | None = None  # (L,) task-adaptive scale c(t) (semantic router with task scaling)
    task: str | None = None
    seconds: float = 0.0

    @property
    def traced_tokens(self) -> list[str]:
        """The token each traced row belongs to: the prompt, then each generated token fed back in."""
        rows = 0 if self.token_weights is None else self.token_weights.shape[1]
        return (self.prompt_tokens + self.generated_tokens)[:rows]


# --- loading, with a small LRU cache ---------------------------------------------------------------------------

_cache: OrderedDict[tuple[str, uuid.UUID, str], LoadedMixture] = OrderedDict()
_cache_lock = threading.Lock()


def _trained_source(settings: Settings, mixture_id: uuid.UUID) -> tuple[str, str, str]:
    """(name, stamp, experts prefix) of the newest successful training of the mixture."""
    with session_scope(settings.db_url) as s:
        mixture = s.get(Mixture, mixture_id)
        if mixture is None:
            raise InferenceError("no such mixture (deleted?)")
        job = s.scalars(
            sa.select(Job)
            .where(Job.mixture_id == mixture_id, Job.state == JobState.SUCCEEDED)
            .order_by(Job.finished_at.desc(), Job.created_at.desc())
        ).first()
        if not mixture.trained or job is None:
            raise NotTrainedError(f"mixture '{mixture.name}' is not trained yet: train it first, then try again")
        finished = job.finished_at.isoformat() if job.finished_at else ""
        return mixture.name, f"{job.id.hex}:{finished}", experts_prefix(job)


def _load(settings: Settings, name: str, prefix: str) -> tuple[MixtureModel, Any]:
    """Base + mixture + experts, from safetensors checked against the manifest's sha256 sums."""
    store = ArtifactStore(settings.artifact_url)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        with tempfile.TemporaryDirectory(prefix="mole-infer-") as tmp:
            folder = download_folder(store, prefix, Path(tmp) / "experts")
            mixture, tokenizer = load_trained_mixture(folder, data_dir=settings.bases_data_dir, device=device)
    except (MixtureError, UnknownBaseModelError, FileNotFoundError, ValidationError) as error:
        raise InferenceError(f"the trained experts of '{name}' could not be loaded: {error}") from error
    dtype = inference_dtype(settings.inference_dtype, torch.device(device))
    if dtype != torch.float32:
        mixture.store_base_in(dtype)
    mixture.state.fold_fixed_gates = True  # one prompt at a time: sequence gates folded into the base weights
    return mixture, tokenizer


def load_trained(settings: Settings, mixture_id: uuid.UUID) -> LoadedMixture:
    """The trained mixture, from the cache when the same training is already loaded."""
    name, stamp, prefix = _trained_source(settings, mixture_id)
    key = (settings.artifact_url, mixture_id, stamp)
    with _cache_lock:  # loads are rare and large: one at a time, so two requests never load the same model twice
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        for old in [k for k in _cache if k[:2] == key[:2]]:
            del _cache[old]  # an older training of the same mixture
        model, tokenizer = _load(settings, name, prefix)
        loaded = LoadedMixture(mixture_id, name, stamp, model, tokenizer)
        _cache[key] = loaded
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
        return loaded


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


# --- one request -----------------------------------------------------------------------------------------------


def readable_token(text: str) -> str:
    """A token as a label: spaces and line breaks made visible, nothing left blank."""
    shown = text.replace("\n", "↵").replace("\t", "⇥").replace(" ", "␣")
    return shown or "∅"


def _task_id(spec: MixtureSpec, task: str | None) -> int:
    if task in (None, ""):
        if spec.router.kind == "task":
            raise InferenceError(f"this mixture routes by task: choose the prompt's task ({', '.join(spec.tasks)})")
        return -1
    if task not in spec.tasks:
        raise InferenceError(f"unknown task '{task}'; the mixture's tasks are {', '.join(spec.tasks)}")
    return spec.tasks.index(task)


def _checked_overrides(
    model: MixtureModel, disabled: Sequence[str], forced: Mapping[str, float] | None
) -> tuple[list[str], dict[str, float] | None]:
    names = model.expert_names
    unknown = [n for n in [*disabled, *(forced or {})] if n not in names]
    if unknown:
        raise InferenceError(f"unknown expert(s) {', '.join(map(str, unknown))}; the mixture has {', '.join(names)}")
    if forced is None:
        return list(disabled), None
    bad = [n for n, w in forced.items() if not isinstance(w, int | float) or not math.isfinite(w) or w < 0]
    if bad:
        raise InferenceError(f"forced weights must be numbers ≥ 0; check {', '.join(bad)}")
    # forcing bypasses the router, so a disabled expert must also be forced to 0 to stay off
    return list(disabled), {n: 0.0 if n in disabled else float(w) for n, w in forced.items()}


def _encode_prompt(loaded: LoadedMixture, prompt: str, input_text: str) -> list[int]:
    if not prompt or not prompt.strip():
        raise InferenceError("the prompt is empty: type an instruction first")
    try:
        row = ExampleRow(task=loaded.spec.tasks[0], instruction=prompt, input=input_text or "", output="-")
    except ValidationError as error:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise InferenceError(f"the prompt cannot be used: {reasons.removeprefix('Value error, ')}") from error
    ids = prompt_ids(row, loaded.tokenizer)
    if len(ids) > MAX_PROMPT_TOKENS:
        raise InferenceError(f"the prompt is {len(ids)} tokens long; at most {MAX_PROMPT_TOKENS} are accepted")
    return ids


def _sentence_embedding(spec: MixtureSpec, text: str, device: torch.device) -> torch.Tensor | None:
    """SAMoRA with ``encoder: sentence`` routes by a frozen embedding of the prompt."""
    if spec.router.kind != "semantic" or getattr(spec.router_options, "encoder", "") != "sentence":
        return None
    from models.sentence import SentenceEncoderUnavailableError, shared_encoder

    try:
        return shared_encoder().encode([text]).to(device)  # (1, 384)
    except SentenceEncoderUnavailableError as error:
        raise InferenceError(str(error)) from error


def _eos_ids(tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def template_head(tokenizer: Any, spec: MixtureSpec) -> list[int]:
    """The token ids every rendered prompt starts with (chat template, system prompt...): what two prompts share."""
    first, second = (
        prompt_ids(ExampleRow(task=spec.tasks[0], instruction=text, output="-"), tokenizer) for text in ("a", "b")
    )
    shared = next((i for i, (x, y) in enumerate(zip(first, second, strict=False)) if x != y), 0)
    return first[:shared]


def _head_cacheable(spec: MixtureSpec) -> bool:
    """True when a prompt token's hidden states depend only on the tokens before it (token routing, no sentence
    embedding): then the template head's KV cache and routing can be computed once and reused."""
    if spec.router.kind == "single":
        return True
    options = spec.router_options
    return options.granularity == "token" and getattr(options, "encoder", "lowrank") != "sentence"


def _head(
    loaded: LoadedMixture, ids: list[int], task_id: int, forced: dict[str, float] | None, disabled: list[str]
) -> _Head | None:
    """The template head of ``ids`` run under the request's routing (overrides already in force), from its cache.

    Every request that can use the head uses it, computed alone the same way, so one prompt always gives the same
    numbers; a prompt that does not start with the head (or a sequence-level router) is run whole.
    """
    if loaded.head_ids is None:
        loaded.head_ids = template_head(loaded.tokenizer, loaded.spec) if _head_cacheable(loaded.spec) else []
    head = loaded.head_ids
    if len(head) < 2 or len(ids) <= len(head) or ids[: len(head)] != head:
        return None
    key = (task_id, tuple(sorted((forced or {}).items())) if forced is not None else None, tuple(sorted(disabled)))
    if key in loaded.heads:
        loaded.heads.move_to_end(key)
        return loaded.heads[key]
    from transformers import DynamicCache

    model = loaded.model
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.model.config)
    with model.tracing() as trace:
        model(
            torch.tensor([head], device=device),
            task_ids=torch.tensor([task_id], device=device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    found = _Head(
        cache,
        {layer: torch.cat(parts) for layer, parts in trace.weights.items()},
        {layer: torch.cat(parts) for layer, parts in trace.group_weights.items()},
        dict(trace.scale),
    )
    loaded.heads[key] = found
    while len(loaded.heads) > HEADS_KEPT:
        loaded.heads.popitem(last=False)
    return found


def infer(
    loaded: LoadedMixture,
    prompt: str,
    *,
    input_text: str = "",
    task: str | None = None,
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
    disabled: Sequence[str] = (),
    forced: Mapping[str, float] | None = None,
    trace: bool = True,
    stop_at_eos: bool = True,
) -> InferenceResult:
    """Greedy generation from ``prompt`` (rendered as in training), with the routing weights when ``trace``.

    ``disabled`` switches experts off (the others renormalised); ``forced`` replaces the router by fixed weights
    (expert name -> weight, unnamed routed experts 0). ``stop_at_eos=False`` always generates ``max_new_tokens``.
    """
    if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise InferenceError(f"max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS}, got {max_new_tokens}")
    model, tokenizer = loaded.model, loaded.tokenizer
    task_id = _task_id(model.spec, task)
    disabled, forced = _checked_overrides(model, disabled, forced)
    ids = _encode_prompt(loaded, prompt, input_text)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)  # (1, T)
    sentence = _sentence_embedding(model.spec, f"{prompt}\n{input_text}".strip(), device)
    started = time.perf_counter()
    with loaded.lock, torch.inference_mode(), ExitStack() as stack:
        if disabled or forced is not None:
            stack.enter_context(model.overridden(forced=forced, disabled=disabled))
        head = _head(loaded, ids, task_id, forced, disabled) if sentence is None else None
        recorder = stack.enter_context(model.tracing()) if trace else None
        out = greedy_decode(
            model,
            input_ids,
            max_new_tokens=max_new_tokens,
            eos_token_ids=_eos_ids(tokenizer),
            stop_at_eos=stop_at_eos,
            task_ids=torch.tensor([task_id], device=device),
            sentence_embedding=sentence,
            past_key_values=copy.deepcopy(head.cache) if head is not None else None,
        )
    seconds = time.perf_counter() - started
    new_ids = out.tokens
    result = InferenceResult(
        text=tokenizer.decode(new_ids, skip_special_tokens=True),
        prompt_tokens=[readable_token(tokenizer.decode([i])) for i in ids],
        generated_tokens=[readable_token(tokenizer.decode([i])) for i in new_ids],
        token_probs=out.probs,
        expert_names=model.expert_names,
        routed_names=[],
        layer_names=list(model.layer_names),
        layer_weights=None,
        token_weights=None,
        task=task or None,
        seconds=seconds,
    )
    if recorder is not None:
        _fill_routing(result, recorder, model, head)
    return result


def _fill_routing(result: InferenceResult, trace: Any, model: MixtureModel, head: _Head | None) -> None:
    """Turn the recorded per-forward tensors (after the head's rows) into arrays, once: (L, T, E), (L, T, K), (L,)."""
    layers = [name for name in model.layer_names if trace.weights.get(name)]
    if not layers:
        return  # no router (a single plain LoRA): nothing is routed

    def rows(recorded: dict[str, list[torch.Tensor]], cached: dict[str, torch.Tensor] | None) -> torch.Tensor:
        return torch.stack([torch.cat([*([cached[n]] if cached else []), *recorded[n]]) for n in layers])

    result.layer_names = layers
    result.routed_names = list(trace.expert_names[layers[0]])
    weights = rows(trace.weights, head.weights if head else None)  # (L, T, E)
    result.token_weights = weights.numpy()
    result.layer_weights = weights.mean(dim=1).numpy()  # (L, E)
    if all(trace.group_weights.get(name) for name in layers):
        result.group_weights = rows(trace.group_weights, head.group_weights if head else None).numpy()  # (L, T, K)
        result.group_names = model.spec.group_names()
    if all(trace.scale.get(name) for name in layers):
        scales = {n: [*(head.scale.get(n, []) if head else []), *trace.scale[n]] for n in layers}
        result.scale = torch.stack([torch.cat(scales[n]).mean() for n in layers]).numpy()  # (L,)
