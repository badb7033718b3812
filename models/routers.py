"""Router kinds: one small class each, one registry table at the bottom (ALGORITHMS.md §2).

A router maps a layer's input to weights ``g`` over the *routed* experts of that layer. Shapes:
``x`` is ``(B, T, d_in)``; weights come back as ``(B, T, E)`` for token routing or ``(B, 1, E)`` for
sequence routing (broadcast over tokens). Sources: MoLoRA / MixLoRA / Switch (softmax, top-k, load balance),
C-LoRAE (task-id routing), MoDULA (Flan / Res), AT-MoE (grouped), SAMoRA (semantic keys, task scaling).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

Granularity = Literal["token", "sequence"]
CENTER_MOMENTUM = 0.05  # EMA of the sequence-query centre


class RouterOptions(BaseModel):
    """Options every learned router shares; a kind extends this with its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    granularity: Granularity = Field("token", description="route each token, or each sequence by its prompt")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="softmax temperature τ")


@dataclass
class RoutingInputs:
    """Per-forward facts a router may need besides ``x``: set once per batch by the attached model."""

    task_ids: Tensor | None = None  # (B,) long; -1 = unknown task
    prompt_mask: Tensor | None = None  # (B, T) bool: tokens that are prompt (sequence routing averages them)
    token_mask: Tensor | None = None  # (B, T) bool: real (non-pad) tokens, for the load-balance statistics
    sentence_embedding: Tensor | None = None  # (B, d_s) frozen sentence embedding (semantic, encoder="sentence")


@dataclass
class RouterOutput:
    weights: Tensor  # (B, T|1, E) over routed experts, rows sum to 1 (or 0: universal only)
    scale: Tensor | None = None  # (B, 1, 1) task-adaptive scale c (semantic)
    group_weights: Tensor | None = None  # (B, T|1, K) (grouped)
    aux_loss: Tensor | None = None  # scalar, already multiplied by its λ
    extras: dict[str, Tensor] = field(default_factory=dict)


def sequence_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``x`` (B, T, d) over the masked tokens -> (B, 1, d); the whole sequence without a mask."""
    if mask is None:
        return x.mean(dim=1, keepdim=True)
    m = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    return (x * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, 1, d)


class Router(nn.Module):
    """Base class. ``kind`` names it in specs; ``Options`` validates its options; ``check`` its fit to a mixture."""

    kind: ClassVar[str]
    Options: ClassVar[type[RouterOptions]] = RouterOptions
    granularities: ClassVar[frozenset[str]] = frozenset({"token", "sequence"})
    routes_universal: ClassVar[bool] = False  # MoDULA-Flan: universal experts are routed, not always on
    shared_down: ClassVar[bool] = False  # SAMoRA: specific experts share one down-projection A
    learned: ClassVar[bool] = True

    def __init__(
        self,
        options: RouterOptions,
        *,
        d_in: int,
        n_experts: int,
        n_tasks: int,
        rank: int = 0,
        task_experts: list[list[int]] | None = None,
        groups: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.options = options
        self.n_experts = n_experts
        # Sequence gates look at the prompt's mean hidden state, which is mostly what every prompt shares (the
        # template, a system prompt); a linear gate on it learns a global preference before a per-task one. The
        # studio's choice: centre it on a running mean of the training prompts (set by the first router-training
        # batch, then an EMA), so the gate sees what tells prompts apart. Saved with the router; frozen when set.
        self.register_buffer("center", torch.zeros(d_in))  # (d_in,)
        self.register_buffer("centered", torch.zeros(()))  # 0 until the first training batch
        self.center_frozen = False  # add_task: the old routing must not move

    @classmethod
    def check(
        cls, options: RouterOptions, *, n_experts: int, n_universal: int, groups: list[str | None], ranks: list[int]
    ) -> None:
        """Raise ``ValueError`` with a readable message if these options do not fit the mixture."""
        if options.granularity not in cls.granularities:
            allowed = ", ".join(sorted(cls.granularities))
            raise ValueError(f"router '{cls.kind}' supports granularity {allowed}, got '{options.granularity}'")
        if n_experts < 1:
            raise ValueError(f"router '{cls.kind}' needs at least one routed expert; the mixture has none")

    def router_input(self, x: Tensor, inputs: RoutingInputs) -> Tensor:
        """What the router looks at: each token, or the mean over the prompt's tokens minus the running centre."""
        if self.options.granularity == "sequence":
            q = sequence_mean(x, inputs.prompt_mask)  # (B, 1, d_in)
            return q - self._center(q)
        return x  # (B, T, d_in)

    def _center(self, q: Tensor) -> Tensor:
        """The centre of sequence queries, updated (without a host sync) on router-training batches."""
        if self.training and torch.is_grad_enabled() and not self.center_frozen:
            with torch.no_grad():
                batch = q.detach().mean(dim=(0, 1)).to(self.center.dtype)  # (d_in,)
                moved = torch.lerp(self.center, batch, CENTER_MOMENTUM)
                self.center.copy_(torch.where(self.centered > 0, moved, batch))
                self.centered.fill_(1.0)
        return self.center.to(q.dtype)  # (d_in,)

    def forward(self, x: Tensor, inputs: RoutingInputs, low_rank: Tensor | None = None) -> RouterOutput:
        raise NotImplementedError

    def add_expert(self, *, task_id: int | None = None, group: int | None = None) -> None:
        """Grow by one routed expert (the ``add_task`` schedule); old rows stay as they are."""
        raise NotImplementedError(f"router '{self.kind}' cannot add experts")


def _grow_linear(linear: nn.Linear) -> nn.Linear:
    """A copy of ``linear`` with one more output row, zero-initialised so the new expert starts neutral."""
    grown = nn.Linear(linear.in_features, linear.out_features + 1, bias=linear.bias is not None)
    grown = grown.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        grown.weight.zero_()
        grown.weight[: linear.out_features] = linear.weight
        if linear.bias is not None:
            grown.bias.zero_()
            grown.bias[: linear.out_features] = linear.bias
    return grown


def _init_gate(linear: nn.Linear) -> None:
    """Small random logits: routing starts near uniform but not exactly tied."""
    nn.init.normal_(linear.weight, std=0.02)


# --- task-id routing (C-LoRAE) ------------------------------------------------------------------------------


class TaskOptions(RouterOptions):
    granularity: Literal["sequence"] = "sequence"


class TaskRouter(Router):
    """One-hot on the experts owning the sample's task (split evenly if several); unknown task -> all zero."""

    kind = "task"
    Options = TaskOptions
    granularities = frozenset({"sequence"})
    learned = False

    def __init__(
        self,
        options: RouterOptions,
        *,
        n_experts: int,
        n_tasks: int,
        task_experts: list[list[int]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(options, n_experts=n_experts, n_tasks=n_tasks, **kwargs)
        table = torch.zeros(n_tasks + 1, n_experts)  # last row: unknown task
        for task, experts in enumerate(task_experts or []):
            for e in experts:
                table[task, e] = 1.0 / len(experts)
        self.register_buffer("table", table, persistent=True)  # (n_tasks + 1, E)

    def forward(self, x: Tensor, inputs: RoutingInputs, low_rank: Tensor | None = None) -> RouterOutput:
        if inputs.task_ids is None:
            ids = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        else:
            ids = inputs.task_ids
        ids = torch.where(ids < 0, self.table.shape[0] - 1, ids)  # (B,)
        return RouterOutput(weights=self.table[ids].unsqueeze(1).to(x.dtype))  # (B, 1, E)

    def add_expert(self, *, task_id: int | None = None, group: int | None = None) -> None:
        if task_id is None:
            raise ValueError("task routing needs the new expert's task")
        n_tasks, n_experts = self.table.shape[0] - 1, self.table.shape[1]
        table = torch.zeros(max(n_tasks, task_id + 1) + 1, n_experts + 1, device=self.table.device)
        table[:n_tasks, :n_experts] = self.table[:n_tasks]
        table[-1, :n_experts] = self.table[-1]
        table[task_id] = 0.0
        table[task_id, n_experts] = 1.0
        self.table = table
        self.n_experts += 1


# --- dense softmax (MoLoRA) -----------------------------------------------------------------------------------


class SoftmaxRouter(Router):
    """Dense ``softmax(W_g x / τ)`` over the routed experts."""

    kind = "softmax"

    def __init__(self, options: RouterOptions, *, d_in: int, n_experts: int, **kwargs: Any) -> None:
        super().__init__(options, d_in=d_in, n_experts=n_experts, **kwargs)
        self.gate = nn.Linear(d_in, n_experts, bias=False)
        _init_gate(self.gate)

    def logits(self, x: Tensor, inputs: RoutingInputs) -> Tensor:
        q = self.router_input(x, inputs)  # (B, T|1, d_in)
        logits = self.gate(q.to(self.gate.weight.dtype)).float()  # (B, T|1, E) in fp32
        return logits if self.options.temperature == 1.0 else logits / self.options.temperature

    def forward(self, x: Tensor, inputs: RoutingInputs, low_rank: Tensor | None = None) -> RouterOutput:
        return RouterOutput(weights=self.logits(x, inputs).softmax(dim=-1).to(x.dtype))

    def add_expert(self, *, task_id: int | None = None, group: int | None = None) -> None:
        self.gate = _grow_linear(self.gate)
        self.n_experts += 1


# --- sparse top-k with load balance (MixLoRA, Switch) ---------------------------------------------------------


class TopKOptions(RouterOptions):
    top_k: int = Field(2, ge=1, le=64, description="experts kept per token")
    load_balance: float = Field(0.01, ge=0.0, le=10.0, description="λ of the Switch load-balance loss")
    z_loss: float = Field(0.0, ge=0.0, le=10.0, description="λ of the router z-loss")


def load_balance_loss(probs: Tensor, kept: Tensor, mask: Tensor | None) -> Tensor:
    """Switch form ``E · Σ_e f_e · P_e``: ``f_e`` share of tokens whose top-k holds e (no grad), ``P_e`` mean prob."""
    n_experts = probs.shape[-1]
    probs, kept = probs.reshape(-1, n_experts), kept.reshape(-1, n_experts).to(probs.dtype)  # (N, E)
    if mask is not None and mask.numel() == probs.shape[0]:
        weight = mask.reshape(-1, 1).to(probs.dtype)  # (N, 1)
        count = weight.sum().clamp(min=1.0)
        f, p = (kept * weight).sum(0) / count, (probs * weight).sum(0) / count  # (E,)
    else:
        f, p = kept.mean(0), probs.mean(0)  # (E,)
    return n_experts * (f.detach() * p).sum()


class TopKRouter(SoftmaxRouter):
    """Keep the k largest logits, softmax over them, others 0; adds the load-balance (and z-) loss."""

    kind = "topk"
    Options = TopKOptions

    @classmethod
    def check(cls, options: RouterOptions, *, n_experts: int, **kwargs: Any) -> None:
        super().check(options, n_experts=n_experts, **kwargs)
        assert isinstance(options, TopKOptions)
        if options.top_k > n_experts:
            raise ValueError(f"top_k {options.top_k} exceeds the {n_experts} routed experts")

    def forward(self, x: Tensor, inputs: RoutingInputs, low_rank: Tensor | None = None) -> RouterOutput:
        options = self.options
        assert isinstance(options, TopKOptions)
        logits = self.logits(x, inputs)  # (B, T|1, E) fp32
        k = min(options.top_k, logits.shape[-1])
        top_values, top_index = logits.topk(k, dim=-1)  # (B, T|1, k)
        kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top_index, True)  # (B, T|1, E)
        weights = torch.zeros_like(logits).scatter_(-1, top_index, top_values.softmax(dim=-1))  # (B, T|1, E)
        aux = None
        if self.training and (options.load_balance > 0 or options.z_loss > 0):
            mask = inputs.token_mask if options.granularity == "token" else None
            aux = options.load_balance * load_balance_loss(logits.softmax(dim=-1), kept, mask)
            if options.z_loss > 0:
                aux = aux + options.z_loss * logits.logsumexp(dim=-1).pow(2).mean()
        return RouterOutput(weights=weights.to(x.dtype), aux_loss=aux)


# --- MoDULA ---------------------------------------------------------------------------------------------------


class ModulaOptions(RouterOptions):
    variant: Literal["res", "flan"] = Field("res", description="res: universal always on; flan: universal routed")


class ModulaRouter(SoftmaxRouter):
    """MoDULA. Res: ``softmax(W_g x)`` over domain experts, universal as an always-on residual.
    Flan: the same softmax over universal *and* domain experts (the layer routes the universal ones too)."""

    kind = "modula"
    Options = ModulaOptions

    @classmethod
    def check(cls, options: RouterOptions, *, n_experts: int, n_universal: int, **kwargs: Any) -> None:
        super().check(options, n_experts=n_experts, n_universal=n_universal, **kwargs)
        if n_universal < 1:
            raise ValueError("router 'modula' needs at least one universal expert")

    @classmethod
    def routes_universal_for(cls, options: RouterOptions) -> bool:
        return getattr(options, "variant", "res") == "flan"


# --- AT-MoE grouped -------------------------------------------------------------------------------------------


class GroupedOptions(RouterOptions):
    granularity: Granularity = "sequence"


class GroupedRouter(Router):
    """AT-MoE: ``g_e = π_k(e) · ρ_e`` — group weights ``softmax(W_G q)``, then softmax within each group."""

    kind = "grouped"
    Options = GroupedOptions

    def __init__(
        self, options: RouterOptions, *, d_in: int, n_experts: int, groups: list[int] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(options, d_in=d_in, n_experts=n_experts, **kwargs)
        groups = groups if groups is not None else list(range(n_experts))
        n_groups = max(groups) + 1
        self.group_gate = nn.Linear(d_in, n_groups, bias=False)
        self.expert_gate = nn.Linear(d_in, n_experts, bias=False)
        _init_gate(self.group_gate)
        _init_gate(self.expert_gate)
        self.register_buffer("membership", F.one_hot(torch.tensor(groups), n_groups).float())  # (E, K)

    def forward(self, x: Tensor, inputs: RoutingInputs, low_rank: Tensor | None = None) -> RouterOutput:
        q = self.router_input(x, inputs).to(self.expert_gate.weight.dtype)  # (B, T|1, d_in)
        tau = self.options.temperature
        group_weights = (self.group_gate(q).float() / tau).softmax(dim=-1)  # (B, T|1, K)
        logits = self.expert_gate(q).float() / tau  # (B, T|1, E)
        member = self.membership.bool()  # (E, K)
        masked = logits.unsqueeze(-1).masked_fill(~member, -math.inf)  # (B, T|1, E, K)
        group_max = masked.amax(dim=-2)  # (B, T|1, K)
        shifted = (logits - group_max @ self.membership.T).exp()  # (B, T|1, E), stable per group
        within = shifted / ((shifted @ self.membership) @ self.membership.T)  # (B, T|1, E), sums to 1 per group
        weights = within * (group_weights @ self.membership.T)  # (B, T|1, E) = ρ_e · π_k(e)
        return RouterOutput(
            weights=weights.to(x.dtype),
            group_weights=group_weights.to(x.dtype),
            extras={"within_group": within.to(x.dtype)},
        )

    def add_expert(self, *, task_id: int | None = None, group: int | None = None) -> None:
        n_groups = self.membership.shape[1]
        group = n_groups if group is None else group
        if group >= n_groups:
            self.group_gate = _grow_linear(self.group_gate)
            membership = F.pad(self.membership, (0, 1))
        else:
            membership = self.membership
        row = F.one_hot(torch.tensor([group]), membership.shape[1]).to(membership)
        self.membership = torch.cat([membership, row])  # (E + 1, K')
        self.expert_gate = _grow_linear(self.expert_gate)
        self.n_experts += 1


# --- SAMoRA semantic ------------------------------------------------------------------------------------------


class SemanticOptions(RouterOptions):
    temperature: float = Field(0.5, gt=0.0, le=100.0)
    encoder: Literal["lowrank", "sentence"] = Field(
        "lowrank", description="lowrank: SAMoRA's A·x; sentence: a frozen sentence embedding of the prompt"
    )
    sentence_dim: int = Field(384, ge=8, le=8192)
    task_scaling: bool = Field(True, description="task-adaptive scale c(t) = sigmoid(w · emb(t))")
    orth: float = Field(1e-3, ge=0.0, le=10.0, description="λ_orth of the regulariser")
    kl: float = Field(1e-2, ge=0.0, le=10.0, description="λ_kl of the regulariser")


class SemanticRouter(Router):
    """SAMoRA: ``g = softmax(cos(A x, k_e) / τ)`` against learnable expert keys, with task-adaptive scaling."""

    kind = "semantic"
    Options = SemanticOptions
    shared_down = True
    TASK_DIM: ClassVar[int] = 8

    def __init__(
        self, options: RouterOptions, *, d_in: int, n_experts: int, n_tasks: int, rank: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(options, d_in=d_in, n_experts=n_experts, n_tasks=n_tasks, rank=rank, **kwargs)
        assert isinstance(options, SemanticOptions)
        self.keys = nn.Parameter(torch.randn(n_experts, rank) / math.sqrt(rank))  # (E, r)
        self.project = nn.Linear(options.sentence_dim, rank, bias=False) if options.encoder == "sentence" else None
        self.task_embedding = nn.Embedding(max(n_tasks, 1), self.TASK_DIM) if options.task_scaling else None
        self.task_gate = nn.Linear(self.TASK_DIM, 1) if options.task_scaling else None
        if self.task_gate is not None:
            nn.init.zeros_(self.task_gate.weight)
            nn.init.constant_(self.task_gate.bias, 4.0)  # c ≈ 0.98 at start: experts contribute fully

    @classmethod
    def check(cls, options: RouterOptions, *, ranks: list[int], **kwargs: Any) -> None:
        super().check(options, ranks=ranks, **kwargs)
        if len(set(ranks)) > 1:
            raise ValueError(
                f"router 'semantic' shares one down-projection: all task experts need one rank, got "
                f"{sorted(set(ranks))}"
            )

    def task_scale(self, task_ids: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
        """``c(t)`` per sample (B, 1, 1); an unknown task gets the mean of the known tasks' gates."""
        if self.task_embedding is None or self.task_gate is None:
            return None
        all_gates = torch.sigmoid(self.task_gate(self.task_embedding.weight)).squeeze(-1)  # (n_tasks,)
        if task_ids is None:
            return all_gates.mean().expand(batch).reshape(batch, 1, 1)
        known = task_ids.clamp(min=0)
        c = torch.where(task_ids >= 0, all_gates[known], all_gates.mean())  # (B,)
        return c.reshape(batch, 1, 1)

    def forward(self, x: Tensor, inputs: RoutingInputs, low_rank: Tensor | None = None) -> RouterOutput:
        options = self.options
        assert isinstance(options, SemanticOptions)
        if options.encoder == "sentence":
            if inputs.sentence_embedding is None:
                raise ValueError("router 'semantic' with encoder 'sentence' needs the prompt's sentence embedding")
            assert self.project is not None
            query = self.project(inputs.sentence_embedding.to(self.keys.dtype)).unsqueeze(1)  # (B, 1, r)
        else:
            if low_rank is None:
                raise ValueError("router 'semantic' needs the shared low-rank projection A·x")
            query = low_rank if options.granularity == "token" else sequence_mean(low_rank, inputs.prompt_mask)
        cos = F.normalize(query.float(), dim=-1) @ F.normalize(self.keys.float(), dim=-1).T  # (B, T|1, E)
        weights = (cos / options.temperature).softmax(dim=-1)  # (B, T|1, E)
        scale = self.task_scale(inputs.task_ids, x.shape[0], x.device)
        return RouterOutput(weights=weights.to(x.dtype), scale=None if scale is None else scale.to(x.dtype))

    def regulariser(self, down: Tensor, ups: list[Tensor]) -> Tensor:
        """``λ_orth (mse(A Aᵀ, I) + mean_e mse(B_eᵀ B_e, I)) + λ_kl KL(Q ‖ P)`` (SAMoRA's public code)."""
        options = self.options
        assert isinstance(options, SemanticOptions)
        rank = down.shape[0]
        eye = torch.eye(rank, device=down.device, dtype=torch.float32)
        orth = F.mse_loss(down.float() @ down.float().T, eye)
        orth = orth + torch.stack([F.mse_loss(b.float().T @ b.float(), eye) for b in ups]).mean()
        p = F.normalize(self.keys.float(), dim=-1).softmax(dim=-1)  # (E, r)
        q = F.normalize(torch.stack([b.float().mean(dim=0) for b in ups]), dim=-1).softmax(dim=-1)  # (E, r)
        kl = (q * (q.clamp_min(1e-12).log() - p.clamp_min(1e-12).log())).sum(-1).mean()
        return options.orth * orth + options.kl * kl

    def add_expert(self, *, task_id: int | None = None, group: int | None = None) -> None:
        with torch.no_grad():
            key = torch.randn(1, self.keys.shape[1], device=self.keys.device) / math.sqrt(self.keys.shape[1])
            self.keys = nn.Parameter(torch.cat([self.keys.detach(), key.to(self.keys.dtype)]))
            if (
                self.task_embedding is not None
                and task_id is not None
                and task_id >= self.task_embedding.num_embeddings
            ):
                grown = nn.Embedding(task_id + 1, self.TASK_DIM).to(self.keys.device)
                grown.weight[: self.task_embedding.num_embeddings] = self.task_embedding.weight
                self.task_embedding = grown
        self.n_experts += 1


# --- single plain LoRA (baseline): no specific experts, no router ---------------------------------------------


class SingleRouter(Router):
    """The plain-LoRA baseline: one universal expert and nothing routed. Never instantiated in a layer."""

    kind = "single"
    granularities = frozenset({"token"})
    learned = False

    @classmethod
    def check(cls, options: RouterOptions, *, n_experts: int, n_universal: int, **kwargs: Any) -> None:
        if n_experts != 0:
            raise ValueError(f"router 'single' is one plain LoRA: remove the {n_experts} task experts")
        if n_universal != 1:
            raise ValueError(f"router 'single' needs exactly one universal expert, got {n_universal}")


# --- the registry table ---------------------------------------------------------------------------------------

_KIND = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def register_routers(*classes: type[Router]) -> dict[str, type[Router]]:
    """Build the table, checking each kind is lowercase and unique and its default options validate."""
    table: dict[str, type[Router]] = {}
    for cls in classes:
        if not _KIND.match(cls.kind):
            raise ValueError(f"router kind {cls.kind!r} must be lowercase letters, digits and '_'")
        if cls.kind in table:
            raise ValueError(f"router kind {cls.kind!r} is registered twice")
        cls.Options()  # defaults must validate
        table[cls.kind] = cls
    return table


ROUTER_KINDS: dict[str, type[Router]] = register_routers(
    SingleRouter, TaskRouter, SoftmaxRouter, TopKRouter, ModulaRouter, GroupedRouter, SemanticRouter
)
