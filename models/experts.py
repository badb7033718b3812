"""The mixture layer (ALGORITHMS.md §1): a frozen linear plus universal and router-weighted specific LoRA experts.

    h = W x + Σ_u s_u B_u A_u x + c(x, t) · Σ_e g_e(x, t) · s_e B_e A_e x,   s_j = α_j / r_j

Computed in rank space: all down-projections concatenated (R = Σ r_j rows), one matmul ``z = x A_catᵀ``, each
expert's r-block of ``z`` multiplied by its coefficient (s_j, or s_j·g_j·c), one matmul ``Δh = z B_catᵀ`` —
the FLOPs of one LoRA of rank R plus the router, never a Python loop over experts' matmuls. Each expert keeps
its own parameters so it can be frozen, added or saved alone. SAMoRA's experts share one down-projection A and
a diagonal σ (``SharedDownExperts``). ``B = 0`` at init, so the mixture starts equal to the base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.routers import Router, RouterOutput, RoutingInputs


@dataclass
class RoutingTrace:
    """Router weights recorded per layer during one generation: ``[token, expert]`` per layer (batch row 0)."""

    weights: dict[str, list[Tensor]] = field(default_factory=dict)  # layer -> [(T_i, E)]
    group_weights: dict[str, list[Tensor]] = field(default_factory=dict)  # layer -> [(T_i, K)]
    scale: dict[str, list[Tensor]] = field(default_factory=dict)  # layer -> [(1,)]
    expert_names: dict[str, list[str]] = field(default_factory=dict)

    def record(self, layer: str, names: list[str], out: RouterOutput, n_tokens: int) -> None:
        self.expert_names.setdefault(layer, names)
        w = out.weights[0].detach().float().cpu()  # (T|1, E)
        self.weights.setdefault(layer, []).append(w.expand(n_tokens, -1) if w.shape[0] == 1 else w)
        if out.group_weights is not None:
            g = out.group_weights[0].detach().float().cpu()  # (T|1, K)
            self.group_weights.setdefault(layer, []).append(g.expand(n_tokens, -1) if g.shape[0] == 1 else g)
        if out.scale is not None:
            self.scale.setdefault(layer, []).append(out.scale[0].detach().float().cpu().reshape(1))

    def repeat(self, layer: str, n_tokens: int) -> None:
        """Record the layer's last rows again for ``n_tokens`` more tokens: gates fixed for the sequence, converted
        once rather than per token."""
        for recorded in (self.weights, self.group_weights):
            if recorded.get(layer):
                recorded[layer].append(recorded[layer][-1][:1].expand(n_tokens, -1))
        if self.scale.get(layer):
            self.scale[layer].append(self.scale[layer][-1])

    def layer_weights(self) -> dict[str, Tensor]:
        """Layer name -> (tokens, experts)."""
        return {layer: torch.cat(parts) for layer, parts in self.weights.items()}

    def stacked(self) -> Tensor:
        """All layers as one ``[layer, token, expert]`` tensor (layers in model order)."""
        return torch.stack(list(self.layer_weights().values()))


@dataclass
class FixedGates:
    """A layer's coefficients while decoding with gates fixed for the sequence: computed on the prompt, reused."""

    per_rank: Tensor  # (B, 1, R)
    routed: RouterOutput | None  # what the router gave on the prompt (already traced there)
    merged: bool = False  # the layer's merged weight holds W + B diag(per_rank) A for this generation
    steps: int = 0  # tokens decoded since the prompt: their routing rows are the prompt's, recorded once at the end


@dataclass
class RoutingState:
    """Shared by every mixture layer of one model: the batch's routing inputs, losses, trace and overrides."""

    inputs: RoutingInputs = field(default_factory=RoutingInputs)
    generating: bool = False  # sequence-level gates computed on the prompt are reused while decoding
    sequence_gates: dict[str, RouterOutput] = field(default_factory=dict)
    decode_cache: dict[str, FixedGates] = field(default_factory=dict)  # per layer, while decoding
    aux_losses: list[Tensor] = field(default_factory=list)
    trace: RoutingTrace | None = None
    forced: dict[str, float] | None = None  # expert name -> weight, replaces the router (playground, export check)
    disabled: frozenset[str] = frozenset()  # expert names switched off (their weight set to 0, others renormalised)
    task_table: Tensor | None = None  # (n_tasks + 1, E_routed): each sample routed to its own task's experts
    # decoding one sequence, fold gates fixed by the prompt into the base weights (``MixtureLinear._fold``): an
    # inference setting (the playground turns it on), since it keeps a folded copy of each adapted weight
    fold_fixed_gates: bool = False

    def reset(self, inputs: RoutingInputs, *, generating: bool = False) -> None:
        self.inputs, self.generating = inputs, generating
        self.sequence_gates.clear()
        self.decode_cache.clear()
        self.aux_losses.clear()


class LoRAExperts(nn.Module):
    """Independent LoRA experts on one linear: ``A_j`` (r_j × d_in) Kaiming-uniform, ``B_j`` (d_out × r_j) zero."""

    def __init__(self, d_in: int, d_out: int, ranks: list[int], alphas: list[float]) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        self.register_buffer("scale", torch.empty(0), persistent=False)  # (E,) α/r
        self.register_buffer("owner", torch.empty(0, dtype=torch.long), persistent=False)  # (R,) expert of a rank row
        self.register_buffer("expand", torch.empty(0, 0), persistent=False)  # (E, R): s_e on expert e's rank rows
        for rank, alpha in zip(ranks, alphas, strict=True):
            self.add(rank, alpha)

    def add(self, rank: int, alpha: float) -> None:
        like = self.down[0] if len(self.down) else None
        a = torch.empty(rank, self.d_in)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(self.d_out, rank)
        if like is not None:
            a, b = a.to(like), b.to(like)
        index = len(self.down)
        self.down.append(nn.Parameter(a))
        self.up.append(nn.Parameter(b))
        device = a.device
        self.scale = torch.cat([self.scale.to(device), torch.tensor([alpha / rank], device=device)])
        self.owner = torch.cat([self.owner.to(device), torch.full((rank,), index, dtype=torch.long, device=device)])
        self.expand = F.one_hot(self.owner, len(self.down)).T.to(self.scale.dtype) * self.scale[:, None]  # (E, R)

    def __len__(self) -> int:
        return len(self.down)

    def stacked(self) -> tuple[Tensor, Tensor]:
        """``A_cat`` (R, d_in) and ``B_cat`` (d_out, R). Without autograd (generation, evaluation) they are kept
        and rebuilt only when a parameter changes (storage or in-place version), so decoding concatenates nothing."""
        if torch.is_grad_enabled():
            return self._concat()
        params = (*self.down._parameters.values(), *self.up._parameters.values())  # no ParameterList indexing cost
        key = tuple((p.data_ptr(), p._version) for p in params if p is not None)
        if self.__dict__.get("_stacked_key") != key:
            self.__dict__["_stacked"], self.__dict__["_stacked_key"] = self._concat(), key
        return self.__dict__["_stacked"]

    def _concat(self) -> tuple[Tensor, Tensor]:
        a_cat = torch.cat(list(self.down)) if len(self.down) > 1 else self.down[0]  # (R, d_in)
        b_cat = torch.cat(list(self.up), dim=1) if len(self.up) > 1 else self.up[0]  # (d_out, R)
        return a_cat, b_cat

    def per_rank(self, coef: Tensor) -> Tensor:
        """``coef`` (B, T|1, E) -> (B, T|1, R): g_e·s_e on expert e's rank rows (a matmul, not a gather)."""
        return coef @ self.expand.to(coef.dtype)

    def apply(self, x: Tensor, per_rank: Tensor) -> Tensor:
        """``x`` (B, T, d_in), ``per_rank`` (B, T|1, R) -> Δh (B, T, d_out)."""
        a_cat, b_cat = self.stacked()  # (R, d_in), (d_out, R)
        return ((x @ a_cat.T) * per_rank) @ b_cat.T  # (B, T, R) -> (B, T, d_out)

    def forward(self, x: Tensor, coef: Tensor) -> Tensor:
        """``x`` (B, T, d_in), ``coef`` (B, T|1, E) without the α/r scaling -> Δh (B, T, d_out)."""
        return self.apply(x, self.per_rank(coef))


class SharedDownExperts(nn.Module):
    """SAMoRA: one down-projection ``A`` (r × d_in) and scaling ``diag(σ)`` shared; each expert its own ``B_e``."""

    def __init__(self, d_in: int, d_out: int, rank: int, alphas: list[float]) -> None:
        super().__init__()
        self.d_in, self.d_out, self.rank = d_in, d_out, rank
        a = torch.empty(rank, d_in)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.shared_down = nn.Parameter(a)  # (r, d_in)
        self.sigma = nn.Parameter(torch.ones(rank))  # (r,)
        self.up = nn.ParameterList()
        self.register_buffer("scale", torch.empty(0), persistent=False)  # (E,)
        for alpha in alphas:
            self.add(rank, alpha)

    def add(self, rank: int, alpha: float) -> None:
        if rank != self.rank:
            raise ValueError(f"experts sharing a down-projection need rank {self.rank}, got {rank}")
        self.up.append(nn.Parameter(torch.zeros(self.d_out, rank).to(self.shared_down)))
        device = self.shared_down.device
        self.scale = torch.cat([self.scale.to(device), torch.tensor([alpha / rank], device=device)])

    def __len__(self) -> int:
        return len(self.up)

    def low_rank(self, x: Tensor) -> Tensor:
        return x @ self.shared_down.T  # (B, T, r): the input's low-rank semantics, also the router's query

    def forward(self, z: Tensor, coef: Tensor) -> Tensor:
        """``z`` = low_rank(x) (B, T, r), ``coef`` (B, T|1, E) -> Δh (B, T, d_out)."""
        n_experts = len(self.up)
        z = z * self.sigma  # (B, T, r)
        weighted = z.unsqueeze(-2) * (coef * self.scale.to(coef.dtype)).unsqueeze(-1)  # (B, T, E, r)
        b_cat = torch.cat(list(self.up), dim=1)  # (d_out, E·r)
        return weighted.flatten(-2) @ b_cat.T if n_experts else torch.zeros_like(z[..., :0])  # (B, T, d_out)


class MixtureLinear(nn.Module):
    """A frozen ``nn.Linear`` with universal experts always on and specific experts weighted by a router."""

    def __init__(
        self,
        base: nn.Linear,
        *,
        name: str,
        state: RoutingState,
        universal: list[tuple[int, float]],
        specific: list[tuple[int, float]],
        expert_names: list[str],
        router: Router | None,
        routes_universal: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.base, self.name, self.n_universal = base, name, len(universal)
        self.expert_names = list(expert_names)  # universal first, then specific
        self.routes_universal = routes_universal
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        shared = router is not None and router.shared_down
        independent = universal + ([] if shared else specific)
        self.experts = (
            LoRAExperts(base.in_features, base.out_features, *map(list, zip(*independent, strict=True)))
            if independent
            else None
        )
        self.shared = (
            SharedDownExperts(base.in_features, base.out_features, specific[0][0], [a for _, a in specific])
            if shared
            else None
        )
        self.router = router
        self.__dict__["state"] = state  # shared, not a submodule
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.to(device=base.weight.device)

    @property
    def state(self) -> RoutingState:
        return self.__dict__["state"]

    def route(self, x: Tensor, low_rank: Tensor | None) -> RouterOutput | None:
        """Router weights over the routed experts, reusing the prompt's gates while generating."""
        state = self.state
        if self.router is None:
            return None
        if state.forced is not None:
            return self._forced(x)
        if state.task_table is not None:
            return self._own_task(x)
        sequence = self.router.options.granularity == "sequence"
        if sequence and state.generating and self.name in state.sequence_gates:
            out = state.sequence_gates[self.name]
        else:
            out = self.router(x, state.inputs, low_rank)
            if sequence and state.generating:
                state.sequence_gates[self.name] = out
            if out.aux_loss is not None and self.training:
                state.aux_losses.append(out.aux_loss)
        if state.disabled:
            out = self._without_disabled(out)
        return out

    def _routed_names(self) -> list[str]:
        return self.expert_names if self.routes_universal else self.expert_names[self.n_universal :]

    def _forced(self, x: Tensor) -> RouterOutput:
        forced = self.state.forced or {}
        weights = torch.tensor([forced.get(n, 0.0) for n in self._routed_names()], device=x.device, dtype=x.dtype)
        return RouterOutput(weights=weights.expand(x.shape[0], 1, -1))  # (B, 1, E)

    def _own_task(self, x: Tensor) -> RouterOutput:
        """Stage-wise training (MoDULA, AT-MoE): each sample goes to its own task's expert, unknown -> none."""
        table = self.state.task_table
        assert table is not None
        ids = self.state.inputs.task_ids
        if ids is None:
            ids = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        ids = torch.where(ids < 0, table.shape[0] - 1, ids)  # (B,)
        return RouterOutput(weights=table.to(x.device, x.dtype)[ids].unsqueeze(1))  # (B, 1, E)

    def _without_disabled(self, out: RouterOutput) -> RouterOutput:
        keep = torch.tensor([n not in self.state.disabled for n in self._routed_names()], device=out.weights.device)
        weights = out.weights * keep  # (B, T|1, E)
        total = weights.sum(-1, keepdim=True)
        weights = torch.where(total > 0, weights / total.clamp_min(1e-9), weights)
        return RouterOutput(weights=weights, scale=out.scale, group_weights=out.group_weights, extras=out.extras)

    def forward(self, x: Tensor) -> Tensor:
        state = self.state
        if state.generating:
            fixed = state.decode_cache.get(self.name)
            if fixed is not None:
                return self._decode_with_fixed_gates(x, fixed)
        dtype = (self.experts.down[0] if self.experts is not None else self.shared.shared_down).dtype
        xd = self.dropout(x).to(dtype)  # (B, T, d_in)
        low_rank = self.shared.low_rank(xd) if self.shared is not None else None  # (B, T, r)
        out = self.route(xd, low_rank)
        if state.trace is not None and out is not None:
            state.trace.record(self.name, self._routed_names(), out, x.shape[1])
        gates = out.weights if out is not None else xd.new_zeros(x.shape[0], 1, 0)  # (B, T|1, E_routed)
        if out is not None and out.scale is not None:
            gates = gates * out.scale  # c(x, t)
        if self.routes_universal:
            universal_coef, specific_coef = gates[..., : self.n_universal], gates[..., self.n_universal :]
        else:
            universal_coef, specific_coef = self._universal_on(xd), gates
        delta = None
        if self.experts is not None:
            if self.shared is not None:
                coef = universal_coef
            elif self.routes_universal:
                coef = gates  # MoDULA-Flan: the router already weighs universal and domain experts together
            elif self.n_universal == 0:
                coef = specific_coef
            else:
                coef = _cat_coef(universal_coef, specific_coef)
            per_rank = self.experts.per_rank(coef)  # (B, T|1, R)
            if state.generating and self._gates_fixed_for_the_sequence():
                fixed = state.decode_cache[self.name] = FixedGates(per_rank, out)
                if self._fold(fixed):
                    return F.linear(x, self.__dict__["_merged"], self.base.bias)
            delta = self.experts.apply(xd, per_rank)  # (B, T, d_out)
        if self.shared is not None and low_rank is not None:
            shared_delta = self.shared(low_rank, specific_coef)
            delta = shared_delta if delta is None else delta + shared_delta
        result = self.base(x)  # (B, T, d_out)
        return result if delta is None else result + delta.to(result.dtype)

    def _decode_with_fixed_gates(self, x: Tensor, fixed: FixedGates) -> Tensor:
        """A decoding step whose coefficients the prompt fixed: the folded weight, or for a batch the experts."""
        fixed.steps += x.shape[1]
        if fixed.merged:
            return F.linear(x, self.__dict__["_merged"], self.base.bias)
        assert self.experts is not None
        xd = self.dropout(x).to(fixed.per_rank.dtype)
        return self.base(x) + self.experts.apply(xd, fixed.per_rank).to(x.dtype)

    def trace_decoded_steps(self) -> None:
        """Give the tokens decoded with fixed gates their routing rows (the prompt's), in one go at the end."""
        fixed, trace = self.state.decode_cache.get(self.name), self.state.trace
        if fixed is not None and fixed.steps and fixed.routed is not None and trace is not None:
            trace.repeat(self.name, fixed.steps)

    def _fold(self, fixed: FixedGates) -> bool:
        """Fold the experts into one weight, ``W + B diag(c) A``, for the rest of this generation of one sequence:
        the prompt and every new token then cost one matmul, as the base alone does. Folding costs about what two
        tokens' separate adapter ops cost (SmolLM2, seven projections) and is exact up to rounding in the base's
        dtype. A batch (per-sample coefficients) or a module in training keeps the experts apart."""
        if not self.state.fold_fixed_gates or fixed.per_rank.shape[0] != 1 or self.training or self.experts is None:
            return False
        weight = self.base.weight
        a_cat, b_cat = self.experts.stacked()  # (R, d_in), (d_out, R)
        scaled_b = (b_cat * fixed.per_rank.reshape(1, -1)).to(weight.dtype)  # B diag(c)
        torch.addmm(weight, scaled_b, a_cat.to(weight.dtype), out=self._merged_buffer())
        fixed.merged = True
        return True

    def _merged_buffer(self) -> Tensor:
        """Where the folded weight goes: kept between generations, so it is allocated once, not per request."""
        weight, merged = self.base.weight, self.__dict__.get("_merged")
        kind = (weight.shape, weight.dtype, weight.device)
        if merged is None or (merged.shape, merged.dtype, merged.device) != kind:
            merged = self.__dict__["_merged"] = torch.empty_like(weight)
        return merged

    def _gates_fixed_for_the_sequence(self) -> bool:
        """True when no token changes the coefficients: no router, sequence gates, forced or own-task weights."""
        state = self.state
        if self.shared is not None:
            return False
        fixed = state.forced is not None or state.task_table is not None
        return fixed or self.router is None or self.router.options.granularity == "sequence"

    def _universal_on(self, xd: Tensor) -> Tensor:
        """(1, 1, U): 1 for each always-on universal expert, 0 where the playground switched it off."""
        key = (self.state.disabled, xd.device, xd.dtype, self.n_universal)
        made = self.__dict__.setdefault("_universal_on_made", {})  # built once per setting, not per forward
        if key not in made:
            on = [0.0 if n in self.state.disabled else 1.0 for n in self.expert_names[: self.n_universal]]
            with torch.inference_mode(False):  # a plain tensor, so a later training step may use it too
                made[key] = torch.tensor(on, device=xd.device, dtype=xd.dtype).view(1, 1, -1)
        return made[key]

    # --- growing and introspection ---

    def add_expert(self, name: str, rank: int, alpha: float, *, task_id: int | None, group: int | None) -> None:
        """Plug one more specific expert in (the ``add_task`` schedule); every existing tensor stays as it is."""
        if self.shared is not None:
            self.shared.add(rank, alpha)
        elif self.experts is not None:
            self.experts.add(rank, alpha)
        else:
            self.experts = LoRAExperts(self.base.in_features, self.base.out_features, [rank], [alpha])
            self.experts.to(self.base.weight.device)
        if self.router is not None:
            self.router.add_expert(task_id=task_id, group=group)
        self.expert_names.append(name)

    def expert_tensors(self, index: int) -> dict[str, Tensor]:
        """The parameters of expert ``index`` (universal first, then specific), keyed lora_A / lora_B (+ shared)."""
        if self.shared is not None and index >= self.n_universal:
            return {"lora_B": self.shared.up[index - self.n_universal]}
        assert self.experts is not None
        return {"lora_A": self.experts.down[index], "lora_B": self.experts.up[index]}

    def effective_lora(self, index: int) -> tuple[Tensor, Tensor, float]:
        """``(A, B, s)`` such that the expert adds ``s · B A x``; SAMoRA's shared A and σ folded into A."""
        if self.shared is not None and index >= self.n_universal:
            j = index - self.n_universal
            a = self.shared.sigma.unsqueeze(1) * self.shared.shared_down  # diag(σ) A
            return a, self.shared.up[j], float(self.shared.scale[j])
        assert self.experts is not None
        return self.experts.down[index], self.experts.up[index], float(self.experts.scale[index])


def _cat_coef(universal: Tensor, specific: Tensor) -> Tensor:
    """Join (1|B, 1|T, U) and (B, 1|T, S) into (B, T', U + S), broadcasting the batch and token axes."""
    b, t = max(universal.shape[0], specific.shape[0]), max(universal.shape[1], specific.shape[1])
    return torch.cat([universal.expand(b, t, -1), specific.expand(b, t, -1)], dim=-1)
