"""Playground: prompt a trained mixture and see its routing; compare it with another mixture or one expert; override.

Generation and routing capture live in ``worker.inference`` (shared with workers); this module finds mixtures by
name for an owner, turns refusals into ``ServiceError`` and draws the routing as matplotlib figures with readable
labels (expert names, short layer names, token strings).
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from matplotlib.figure import Figure

from app.context import ServiceError, StudioContext
from models.mixture import MixtureError, export_route, universal_names
from models.registry import LOCAL_OWNER, Mixture
from models.spec import MixtureSpec
from worker.inference import (
    DEFAULT_NEW_TOKENS,
    MAX_NEW_TOKENS,
    InferenceError,
    InferenceResult,
    LoadedMixture,
    infer,
    load_trained,
)

_PAIR = re.compile(r"^\s*([^=:\s][^=:]*?)\s*[=:]\s*(\S+)\s*$")


@dataclass(frozen=True)
class MixtureInfo:
    """What the tab needs to know about a mixture before running it."""

    name: str
    router: str
    tasks: list[str]
    task_use: str | None  # "required" (task routing), "optional" (task-adaptive scaling), None (not used)
    expert_names: list[str]


# --- finding mixtures ------------------------------------------------------------------------------------------


def list_trained_mixtures(*, ctx: StudioContext, owner: str = LOCAL_OWNER) -> list[str]:
    """Names of the owner's trained mixtures, oldest first."""
    with ctx.session() as s:
        return list(
            s.scalars(
                sa.select(Mixture.name)
                .where(Mixture.owner_id == owner, Mixture.trained.is_(True))
                .order_by(Mixture.created_at)
            )
        )


def _find(ctx: StudioContext, name: str | None, owner: str) -> tuple[uuid.UUID, MixtureSpec]:
    if not name or not str(name).strip():
        raise ServiceError("choose a trained mixture first")
    with ctx.session() as s:
        mixture = s.scalars(sa.select(Mixture).where(Mixture.owner_id == owner, Mixture.name == name)).first()
        if mixture is None:
            raise ServiceError(f"no mixture named '{name}'")
        if not mixture.trained:
            raise ServiceError(f"mixture '{name}' is not trained yet: start its training, then try again")
        return mixture.id, MixtureSpec.model_validate(mixture.spec_json)


def _load(ctx: StudioContext, name: str | None, owner: str) -> LoadedMixture:
    mixture_id, _ = _find(ctx, name, owner)
    try:
        return load_trained(ctx.settings, mixture_id)
    except InferenceError as error:
        raise ServiceError(str(error)) from error


def describe_mixture(*, ctx: StudioContext, mixture: str | None, owner: str = LOCAL_OWNER) -> MixtureInfo:
    """Router, tasks and experts of a trained mixture, read from its spec (nothing is loaded)."""
    _, spec = _find(ctx, mixture, owner)
    scaling = spec.router.kind == "semantic" and getattr(spec.router_options, "task_scaling", False)
    task_use = "required" if spec.router.kind == "task" else "optional" if scaling else None
    names = universal_names(spec) + [e.name for e in spec.experts]
    return MixtureInfo(str(mixture), spec.router.kind, list(spec.tasks), task_use, names)


# --- running ---------------------------------------------------------------------------------------------------


def _checked_prompt(prompt: str | None) -> str:
    if prompt is None or not str(prompt).strip():
        raise ServiceError("the prompt is empty: type an instruction first")
    return str(prompt)


def _new_tokens(value: float | int | None) -> int:
    if value is None:
        return DEFAULT_NEW_TOKENS
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or not 1 <= value <= MAX_NEW_TOKENS:
        raise ServiceError(f"max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS}, got {value}")
    return value


def _infer(loaded: LoadedMixture, prompt: str, **options: object) -> InferenceResult:
    try:
        return infer(loaded, prompt, **options)  # type: ignore[arg-type]
    except InferenceError as error:
        raise ServiceError(str(error)) from error


def run_prompt(
    *,
    ctx: StudioContext,
    mixture: str | None,
    prompt: str | None,
    input_text: str = "",
    task: str | None = None,
    max_new_tokens: float | int | None = DEFAULT_NEW_TOKENS,
    disabled: Sequence[str] = (),
    forced: Mapping[str, float] | str | None = None,
    trace: bool = True,
    owner: str = LOCAL_OWNER,
) -> InferenceResult:
    """Greedy output of a trained mixture for a prompt, with its routing weights when ``trace``."""
    prompt = _checked_prompt(prompt)
    tokens = _new_tokens(max_new_tokens)
    loaded = _load(ctx, mixture, owner)
    return _infer(
        loaded,
        prompt,
        input_text=input_text or "",
        task=task or None,
        max_new_tokens=tokens,
        disabled=list(disabled or ()),
        forced=parse_forced(forced) if isinstance(forced, str) else forced,
        trace=trace,
    )


def compare(
    *,
    ctx: StudioContext,
    mixture: str | None,
    prompt: str | None,
    input_text: str = "",
    task: str | None = None,
    max_new_tokens: float | int | None = DEFAULT_NEW_TOKENS,
    other_mixture: str | None = None,
    expert: str | None = None,
    with_universal: bool = True,
    owner: str = LOCAL_OWNER,
) -> tuple[InferenceResult, InferenceResult]:
    """The mixture and, on the same prompt, either a second mixture or one of its experts alone (route forced).

    One expert is routed as ``export_route`` does, so the right side computes what its PEFT export would
    (with the universal experts unless ``with_universal`` is off).
    """
    if bool(other_mixture) == bool(expert):
        raise ServiceError("choose either a second mixture or one expert to compare with")
    left = run_prompt(
        ctx=ctx,
        mixture=mixture,
        prompt=prompt,
        input_text=input_text,
        task=task,
        max_new_tokens=max_new_tokens,
        owner=owner,
    )
    tokens = _new_tokens(max_new_tokens)
    if other_mixture:
        other = _load(ctx, other_mixture, owner)
        other_task = task if task in other.spec.tasks else None
        try:
            right = infer(other, str(prompt), input_text=input_text or "", task=other_task, max_new_tokens=tokens)
        except InferenceError as error:
            raise ServiceError(f"{other_mixture}: {error}") from error
        return left, right
    loaded = _load(ctx, mixture, owner)
    try:
        route = export_route(loaded.model, str(expert), with_universal=with_universal)
    except MixtureError as error:
        raise ServiceError(str(error)) from error
    right = _infer(loaded, str(prompt), input_text=input_text or "", task=task or None, max_new_tokens=tokens, **route)
    return left, right


def run_override(
    *,
    ctx: StudioContext,
    mixture: str | None,
    prompt: str | None,
    input_text: str = "",
    task: str | None = None,
    max_new_tokens: float | int | None = DEFAULT_NEW_TOKENS,
    disabled: Sequence[str] = (),
    forced: Mapping[str, float] | str | None = None,
    owner: str = LOCAL_OWNER,
) -> tuple[InferenceResult, InferenceResult]:
    """The output as routed, then with experts disabled and/or weights forced: (as routed, overridden)."""
    forced_map = parse_forced(forced) if isinstance(forced, str) else forced
    if not disabled and not forced_map:
        raise ServiceError("disable at least one expert or force some weights to see what changes")
    common = {"ctx": ctx, "mixture": mixture, "prompt": prompt, "input_text": input_text, "task": task}
    routed = run_prompt(**common, max_new_tokens=max_new_tokens, owner=owner)
    overridden = run_prompt(**common, max_new_tokens=max_new_tokens, disabled=disabled, forced=forced_map, owner=owner)
    return routed, overridden


def parse_forced(text: str | None) -> dict[str, float] | None:
    """``"dates-expert=1, questions-expert=0.5"`` (commas or new lines; ``=`` or ``:``) -> weights; blank -> None."""
    if text is None or not text.strip():
        return None
    weights: dict[str, float] = {}
    for part in re.split(r"[,\n;]", text):
        if not part.strip():
            continue
        match = _PAIR.match(part)
        value = _number(match.group(2)) if match else None
        if match is None or value is None:
            raise ServiceError(f"forced weights: write name=weight pairs such as dates-expert=1, got '{part.strip()}'")
        weights[match.group(1)] = value
    return weights


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


# --- figures and text ------------------------------------------------------------------------------------------


def short_layer_name(name: str) -> str:
    """``model.layers.12.self_attn.q_proj`` -> ``L12 q_proj``; a name without a block number keeps its leaf."""
    parts = name.split(".")
    number = next((p for p in parts if p.isdigit()), None)
    return f"L{number} {parts[-1]}" if number is not None else parts[-1]


def layer_labels(names: Sequence[str]) -> list[str]:
    """Short names, or the full ones when shortening would make two layers look alike."""
    short = [short_layer_name(n) for n in names]
    return short if len(set(short)) == len(short) else list(names)


def layer_choices(result: InferenceResult) -> list[tuple[str, str]]:
    """(label, full layer name) for the layer picker."""
    return list(zip(layer_labels(result.layer_names), result.layer_names, strict=True))


def _heatmap(data: np.ndarray, rows: Sequence[str], columns: Sequence[str], title: str, width: float) -> Figure:
    height = min(max(2.2, 0.22 * len(rows) + 1.4), 16.0)
    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1.0, float(np.nanmax(data))))
    axes.set_xticks(range(len(columns)), labels=list(columns), rotation=45 if len(columns) > 3 else 0, ha="right")
    axes.set_yticks(range(len(rows)), labels=list(rows), fontsize=7 if len(rows) > 24 else 9)
    axes.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axes, label="router weight")
    if data.size <= 64:
        for (i, j), value in np.ndenumerate(data):
            axes.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    return figure


def _message(text: str) -> Figure:
    figure = Figure(figsize=(6, 1.2))
    figure.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return figure


def layer_heatmap(result: InferenceResult, title: str = "Mean router weight per layer") -> Figure:
    """Layers × experts, the mean over every traced token."""
    if result.layer_weights is None:
        return _message("No routing: this mixture has no router (its experts are always on).")
    return _heatmap(
        result.layer_weights,
        layer_labels(result.layer_names),
        result.routed_names,
        title,
        2.4 + 0.9 * len(result.routed_names),
    )


def token_heatmap(result: InferenceResult | None, layer: str | None) -> Figure:
    """Tokens × experts in one layer: a row per token the model read (the prompt, then its own output)."""
    if result is None:
        raise ServiceError("run a prompt first")
    if result.token_weights is None:
        return _message("No routing: this mixture has no router (its experts are always on).")
    names = result.layer_names
    if layer not in names:
        raise ServiceError(f"unknown layer '{layer}'; choose one of the mixture's layers")
    data = result.token_weights[names.index(layer)]  # (T, E)
    tokens = [f"{i}: {t}" for i, t in enumerate(result.traced_tokens)]
    title = f"Router weight per token, {short_layer_name(layer)} (below the line: generated)"
    figure = _heatmap(data, tokens, result.routed_names, title, 2.4 + 0.9 * len(result.routed_names))
    figure.axes[0].axhline(len(result.prompt_tokens) - 0.5, color="white", linestyle="--", linewidth=1.2)
    return figure


def group_figure(result: InferenceResult) -> Figure | None:
    """Group weights (layers × groups, mean over tokens) and the task-adaptive scale per layer, when present."""
    panels = [p for p in (result.group_weights, result.scale) if p is not None]
    if not panels:
        return None
    labels = layer_labels(result.layer_names)
    figure = Figure(figsize=(4.5 * len(panels), min(max(2.2, 0.22 * len(labels) + 1.4), 16.0)), layout="constrained")
    column = 1
    if result.group_weights is not None:
        axes = figure.add_subplot(1, len(panels), column)
        image = axes.imshow(result.group_weights.mean(axis=1), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        axes.set_xticks(range(len(result.group_names)), labels=result.group_names, rotation=45, ha="right")
        axes.set_yticks(range(len(labels)), labels=labels, fontsize=7 if len(labels) > 24 else 9)
        axes.set_title("Group weights (mean over tokens)", fontsize=10)
        figure.colorbar(image, ax=axes)
        column += 1
    if result.scale is not None:
        axes = figure.add_subplot(1, len(panels), column)
        axes.barh(range(len(labels)), result.scale, color="tab:orange")
        axes.set_yticks(range(len(labels)), labels=labels, fontsize=7 if len(labels) > 24 else 9)
        axes.invert_yaxis()
        axes.set_xlim(0.0, 1.0)
        axes.set_title(f"Task-adaptive scale c(t){f', task {result.task}' if result.task else ''}", fontsize=10)
    return figure


def describe_result(result: InferenceResult) -> str:
    """One Markdown line: timing, the generated tokens with their probabilities."""
    shown = " ".join(f"`{t}` {p:.0%}" for t, p in zip(result.generated_tokens, result.token_probs, strict=True))
    task = f", task {result.task}" if result.task else ""
    return f"{len(result.generated_tokens)} tokens in {result.seconds * 1000:.0f} ms{task}. Tokens: {shown}"


def describe_change(routed: InferenceResult, changed: InferenceResult) -> str:
    """What the override did to the output: a changed answer, or how far the chosen tokens' probabilities moved."""
    if routed.text != changed.text:
        return f"The output changed: **{routed.text!r}** → **{changed.text!r}**."
    pairs = zip(routed.token_probs, changed.token_probs, strict=False)
    moved = max((abs(a - b) for a, b in pairs), default=0.0)
    return f"Same output; the probabilities of its tokens moved by up to {moved:.1%}."
