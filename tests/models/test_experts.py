"""The mixture layer: the rank-space fast path equals a plain per-expert loop, for every router kind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.experts import MixtureLinear, RoutingState
from models.routers import ROUTER_KINDS, RoutingInputs
from models.spec import MixtureSpec
from tests.models.conftest import TASKS, make_spec

D_IN, D_OUT, B, T = 24, 20, 3, 5


def _layer(spec: MixtureSpec) -> MixtureLinear:
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    router = None
    if spec.router.kind != "single":
        routed = len(spec.experts) + (spec.universal.count if spec.routes_universal else 0)
        router = ROUTER_KINDS[spec.router.kind](
            spec.router_options,
            d_in=D_IN,
            n_experts=routed,
            n_tasks=len(spec.tasks),
            rank=spec.experts[0].rank if spec.experts else 0,
            task_experts=spec.task_experts(),
            groups=spec.group_ids(),
        )
    names = [f"universal-{i}" for i in range(spec.universal.count)] + [e.name for e in spec.experts]
    layer = MixtureLinear(
        base,
        name="layer",
        state=RoutingState(),
        router=router,
        expert_names=names,
        universal=[(spec.universal.rank, spec.universal.alpha)] * spec.universal.count,
        specific=[(e.rank, e.alpha) for e in spec.experts],
        routes_universal=spec.routes_universal,
    )
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if not name.startswith("base"):
                p.copy_(torch.randn_like(p) * 0.3)
    return layer


def _reference(layer: MixtureLinear, spec: MixtureSpec, x: torch.Tensor) -> torch.Tensor:
    """h = W x + Σ_u s_u B_u A_u x + c · Σ_e g_e s_e B_e A_e x, one expert at a time, s = α / r from the spec."""
    alphas = [spec.universal.alpha] * spec.universal.count + [e.alpha for e in spec.experts]
    ranks = [spec.universal.rank] * spec.universal.count + [e.rank for e in spec.experts]
    low_rank = layer.shared.low_rank(x) if layer.shared is not None else None
    out = layer.router(x, layer.state.inputs, low_rank) if layer.router is not None else None
    h = layer.base(x)
    n_u = layer.n_universal
    for i in range(len(layer.expert_names)):
        if layer.shared is not None and i >= n_u:
            a, b_up = layer.shared.sigma.unsqueeze(1) * layer.shared.shared_down, layer.shared.up[i - n_u]
        else:
            a, b_up = layer.experts.down[i], layer.experts.up[i]
        delta = (alphas[i] / ranks[i]) * (x @ a.T) @ b_up.T  # (B, T, d_out)
        if i < n_u and not layer.routes_universal:
            h = h + delta
            continue
        gate = out.weights[..., i if layer.routes_universal else i - n_u].unsqueeze(-1)
        if out.scale is not None:
            gate = gate * out.scale
        h = h + gate * delta
    return h


CASES = [(kind, g) for kind, cls in ROUTER_KINDS.items() for g in sorted(cls.granularities)]


@pytest.mark.parametrize(("kind", "granularity"), CASES)
def test_fast_path_equals_the_per_expert_loop(kind: str, granularity: str) -> None:
    options: dict[str, object] = {"granularity": granularity} if kind != "single" else {}
    if kind == "modula":
        options["variant"] = "flan"
    experts = (
        []
        if kind == "single"
        else [
            {"name": "e0", "tasks": ["dates"], "rank": 4, "alpha": 8.0, "group": "g0"},
            {"name": "e1", "tasks": ["emails"], "rank": 4 if kind == "semantic" else 3, "alpha": 5.0, "group": "g0"},
            {
                "name": "e2",
                "tasks": ["questions"],
                "rank": 4 if kind == "semantic" else 6,
                "alpha": 12.0,
                "group": "g1",
            },
        ]
    )
    spec = make_spec(kind, experts=experts, router={"kind": kind, "options": options})
    layer = _layer(spec)
    x = torch.randn(B, T, D_IN)
    layer.state.reset(RoutingInputs(task_ids=torch.tensor([0, 2, -1]), prompt_mask=torch.ones(B, T, dtype=torch.bool)))
    torch.testing.assert_close(layer(x), _reference(layer, spec, x), atol=1e-5, rtol=1e-5)


def test_zero_b_leaves_the_base_output_unchanged() -> None:
    spec = make_spec("softmax")
    layer = _layer(spec)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if ".up." in name:
                p.zero_()
    x = torch.randn(B, T, D_IN)
    assert torch.equal(layer(x), layer.base(x))


def test_forced_weights_and_disabled_experts_change_the_output() -> None:
    layer = _layer(make_spec("softmax"))
    x = torch.randn(B, T, D_IN)
    routed = layer(x)
    layer.state.forced = {"dates-expert": 1.0}
    forced = layer(x)
    layer.state.forced = None
    layer.state.disabled = frozenset(TASKS[:0] + ["dates-expert", "emails-expert", "universal-0"])
    only_questions = layer(x)
    layer.state.disabled = frozenset()
    assert not torch.allclose(routed, forced) and not torch.allclose(routed, only_questions)
    # with every specific expert but one disabled, the renormalised weight of that one is 1
    a, b_up, s = layer.effective_lora(layer.expert_names.index("questions-expert"))
    torch.testing.assert_close(only_questions, layer.base(x) + s * (x @ a.T) @ b_up.T, atol=1e-5, rtol=1e-5)


def test_add_expert_keeps_every_existing_tensor() -> None:
    layer = _layer(make_spec("softmax"))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.add_expert("new", 8, 16.0, task_id=3, group=None)
    after = layer.state_dict()
    for key, value in before.items():
        if key.startswith("router"):  # grown tensors keep their old block
            assert torch.equal(after[key][tuple(slice(0, n) for n in value.shape)], value), key
        else:
            assert torch.equal(after[key], value), key
    assert layer.expert_names[-1] == "new" and layer.router.n_experts == 4
    assert layer(torch.randn(B, T, D_IN)).shape == (B, T, D_OUT)
