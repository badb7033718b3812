"""Every router kind (PEFT-style matrix over ROUTER_KINDS) and the properties ALGORITHMS.md §2 promises."""

from __future__ import annotations

import pytest
import torch

from models.routers import (
    CENTER_MOMENTUM,
    ROUTER_KINDS,
    GroupedRouter,
    Router,
    RoutingInputs,
    SemanticRouter,
    TaskRouter,
    TopKRouter,
    load_balance_loss,
    register_routers,
)

D, B, T, E = 16, 4, 6, 4
LEARNED = [kind for kind, cls in ROUTER_KINDS.items() if kind != "single"]


def _router(kind: str, **options: object) -> Router:
    cls = ROUTER_KINDS[kind]
    torch.manual_seed(0)
    return cls(
        cls.Options.model_validate(options),
        d_in=D,
        n_experts=E,
        n_tasks=3,
        rank=4,
        task_experts=[[0], [1, 2], [3]],
        groups=[0, 0, 1, 1],
    )


def _inputs() -> RoutingInputs:
    return RoutingInputs(
        task_ids=torch.tensor([0, 1, 2, -1]),
        prompt_mask=torch.ones(B, T, dtype=torch.bool),
        token_mask=torch.ones(B, T, dtype=torch.bool),
    )


@pytest.mark.parametrize("kind", LEARNED)
def test_weights_have_the_right_shape_and_each_row_sums_to_one_or_zero(kind: str) -> None:
    router = _router(kind)
    x = torch.randn(B, T, D)
    low_rank = torch.randn(B, T, 4)
    weights = router(x, _inputs(), low_rank).weights
    tokens = T if router.options.granularity == "token" else 1
    assert weights.shape == (B, tokens, E)
    sums = weights.sum(-1)
    assert torch.all(((sums - 1).abs() < 1e-5) | (sums.abs() < 1e-6))
    assert torch.all(weights >= 0)


@pytest.mark.parametrize("kind", [k for k in LEARNED if ROUTER_KINDS[k].learned])
def test_learned_routers_pass_gradients_to_their_parameters(kind: str) -> None:
    router = _router(kind)
    x = torch.randn(B, T, D, requires_grad=True)
    out = router(x, _inputs(), torch.randn(B, T, 4, requires_grad=True))
    target = torch.randn_like(out.weights)
    ((out.weights - target) ** 2).sum().backward()
    grads = [p.grad for p in router.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


def test_task_routing_is_one_hot_on_the_samples_task_and_zero_when_unknown() -> None:
    weights = _router("task")(torch.randn(B, T, D), _inputs()).weights[:, 0]  # (B, E)
    expected = torch.tensor([[1, 0, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(weights, expected)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_keeps_exactly_k_experts_per_token(k: int) -> None:
    router = _router("topk", top_k=k)
    router.train()
    out = router(torch.randn(B, T, D), _inputs())
    assert torch.all((out.weights > 0).sum(-1) == k)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(B, T))
    assert out.aux_loss is not None and out.aux_loss > 0


def test_load_balance_is_smallest_when_balanced() -> None:
    balanced_probs = torch.full((8, 4), 0.25)
    balanced_kept = torch.eye(4).repeat(2, 1).bool()
    skewed_probs = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(8, 1)
    skewed_kept = torch.zeros(8, 4, dtype=torch.bool)
    skewed_kept[:, 0] = True
    balanced = load_balance_loss(balanced_probs, balanced_kept, None)
    skewed = load_balance_loss(skewed_probs, skewed_kept, None)
    torch.testing.assert_close(balanced, torch.tensor(1.0))
    assert skewed > 3.5


def test_grouped_weights_factor_as_group_weight_times_within_group_weight() -> None:
    router = _router("grouped", granularity="token")
    out = router(torch.randn(B, T, D), _inputs())
    assert isinstance(router, GroupedRouter)
    group_of = [0, 0, 1, 1]
    within = out.extras["within_group"]
    for e, g in enumerate(group_of):
        torch.testing.assert_close(out.weights[..., e], out.group_weights[..., g] * within[..., e])
    torch.testing.assert_close(within[..., :2].sum(-1), torch.ones(B, T))  # normalised inside each group
    torch.testing.assert_close(within[..., 2:].sum(-1), torch.ones(B, T))
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(B, T))


def test_semantic_routing_follows_cosine_similarity_to_the_keys() -> None:
    router = _router("semantic", granularity="token", temperature=0.05)
    assert isinstance(router, SemanticRouter)
    with torch.no_grad():
        router.keys.copy_(torch.eye(4))
    low_rank = torch.eye(4)[torch.tensor([2, 0, 3, 1])].view(B, 1, 4).expand(B, T, 4)
    weights = router(torch.randn(B, T, D), _inputs(), low_rank).weights
    assert weights.argmax(-1)[:, 0].tolist() == [2, 0, 3, 1]


def test_semantic_task_scale_is_the_mean_gate_for_an_unknown_task() -> None:
    router = _router("semantic")
    with torch.no_grad():
        router.task_embedding.weight.copy_(torch.randn_like(router.task_embedding.weight))
        router.task_gate.weight.normal_()
    scale = router.task_scale(torch.tensor([0, 1, 2, -1]), B, torch.device("cpu")).flatten()
    torch.testing.assert_close(scale[3], scale[:3].mean())
    assert 0 < scale.min() and scale.max() < 1


def test_semantic_regulariser_is_zero_for_orthonormal_factors_and_positive_otherwise() -> None:
    router = _router("semantic", kl=0.0)
    eye = torch.eye(4)
    assert router.regulariser(eye, [eye.clone() for _ in range(E)]).abs() < 1e-8
    assert router.regulariser(eye * 3, [eye * 2 for _ in range(E)]) > 0


def test_topk_check_names_the_problem() -> None:
    options = TopKRouter.Options(top_k=3)
    with pytest.raises(ValueError, match="top_k 3 exceeds the 2 routed experts"):
        TopKRouter.check(options, n_experts=2, n_universal=1, groups=[None, None], ranks=[8, 8])


@pytest.mark.parametrize("kind", ["task", "softmax", "topk", "grouped", "semantic"])
def test_add_expert_grows_by_one_and_keeps_old_routing_parameters(kind: str) -> None:
    router = _router(kind)
    before = {k: v.clone() for k, v in router.state_dict().items()}
    router.add_expert(task_id=3, group=None)
    assert router.n_experts == E + 1
    for key, value in before.items():
        new = router.state_dict()[key]
        assert torch.equal(new[tuple(slice(0, n) for n in value.shape)], value), key
    weights = router(
        torch.randn(B, T, D),
        RoutingInputs(task_ids=torch.tensor([3, 0, 1, 2]), prompt_mask=torch.ones(B, T, dtype=torch.bool)),
        torch.randn(B, T, 4),
    ).weights
    assert weights.shape[-1] == E + 1
    if isinstance(router, TaskRouter):
        assert weights[0, 0, E] == 1.0


def test_registry_refuses_bad_or_duplicate_kinds() -> None:
    class Bad(TaskRouter):
        kind = "Bad Kind"

    with pytest.raises(ValueError, match="lowercase"):
        register_routers(Bad)
    with pytest.raises(ValueError, match="twice"):
        register_routers(TaskRouter, TaskRouter)


def test_a_new_router_is_one_class_and_one_line() -> None:
    class Uniform(Router):
        kind = "uniform"

        def forward(self, x, inputs, low_rank=None):  # noqa: ANN001, ANN201
            from models.routers import RouterOutput

            return RouterOutput(weights=x.new_full((x.shape[0], 1, self.n_experts), 1.0 / self.n_experts))

    table = register_routers(*ROUTER_KINDS.values(), Uniform)
    assert table["uniform"] is Uniform


def test_sequence_queries_are_centred_on_a_running_mean_of_training_prompts() -> None:
    router = _router("softmax", granularity="sequence")
    shared = 5.0 * torch.randn(1, 1, D)  # what every prompt has in common (template, system prompt)
    first = shared + torch.randn(B, T, D)
    router.train()
    q = router.router_input(first, _inputs())  # the first training batch sets the centre to its mean
    torch.testing.assert_close(router.center, first.mean(dim=(0, 1)))
    assert q.mean(dim=(0, 1)).abs().max() < 1e-5 and q.norm() < first.mean(dim=1).norm()
    second = shared + torch.randn(B, T, D)
    router.router_input(second, _inputs())  # then an exponential moving average
    expected = torch.lerp(first.mean(dim=(0, 1)), second.mean(dim=(0, 1)), CENTER_MOMENTUM)
    torch.testing.assert_close(router.center, expected)
    kept = router.center.clone()
    router.eval()
    router.router_input(shared + torch.randn(B, T, D), _inputs())  # evaluation reads it, never moves it
    router.train()
    router.center_frozen = True  # add_task: old routing must not move
    router.router_input(shared + torch.randn(B, T, D), _inputs())
    assert torch.equal(router.center, kept)
