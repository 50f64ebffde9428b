"""The vectorised PiMoE layer against the per-token loop oracle over many random configurations."""

from __future__ import annotations

import random

import pytest
import torch
from oracle import oracle_forward

from pimoe_export.model import ExpertType, PiMoEConfig, PiMoESystem, build_model

ALL_TYPES = list(ExpertType)


def random_config(seed: int) -> tuple[PiMoEConfig, tuple[int, int], bool]:
    rng = random.Random(seed)
    n_types = rng.randint(1, 7)
    # rotate through the types so every type appears in several configurations
    start = seed % 7
    types = tuple(ALL_TYPES[(start + i) % 7] for i in range(n_types))
    e = rng.randint(1, 10)
    k = rng.choice([k for k in (1, 2, 4) if k <= e])
    cfg = PiMoEConfig(
        hidden_size=rng.randint(1, 12),
        num_experts=e,
        expert_types=types,
        top_k=k,
        normalize=rng.choice([None, True, False]),
        intermediate_size=rng.randint(2, 12),
        router_hidden_size=rng.randint(1, 8),
        temperature=rng.choice([0.5, 1.0, 2.0]),
        use_gating=rng.random() < 0.7,
        layer_norm=rng.random() < 0.8,
        activation=rng.choice([None, None, "gelu_tanh", "silu"]),
    )
    # shapes: include N = 0 and N = 1
    shape = [(0, 3), (1, 1), (2, 0), (1, 0)][seed % 4] if seed % 5 == 0 else (rng.randint(1, 3), rng.randint(1, 5))
    use_mask = rng.random() < 0.5
    return cfg, shape, use_mask


@pytest.mark.parametrize("seed", range(60))
def test_vectorised_matches_loop_oracle(seed: int) -> None:
    cfg, (b, s), use_mask = random_config(seed)
    model = build_model(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a non-zero selection bias exercises the steering path
        model.router.selection_bias.copy_(torch.randn(cfg.num_experts, generator=gen) * 0.05)
    x = torch.randn(b, s, cfg.hidden_size, generator=gen)
    mask = (torch.rand(b, s, generator=gen) > 0.3).long() if use_mask else None
    with torch.no_grad():
        y, info = model(x, mask, return_routing_info=True)
    y_ref, ids_ref = oracle_forward(model, x, mask)
    assert y.shape == (b, s, cfg.hidden_size)
    assert torch.equal(info.ids.long(), ids_ref), f"routing differs for {cfg}"
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    if mask is not None:
        assert torch.all(y[mask == 0] == 0)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("expert_type", ALL_TYPES)
def test_each_type_and_k_matches_loop_oracle(expert_type: ExpertType, k: int) -> None:
    """Every expert type at every k against the oracle, whatever the random sweep above happens to draw (this
    replaces a test that only checked the sweep's config generator)."""
    cfg = PiMoEConfig(hidden_size=8, num_experts=5, expert_types=(expert_type,), top_k=k, intermediate_size=12)
    model = build_model(cfg, seed=k)
    x = torch.randn(2, 6, cfg.hidden_size, generator=torch.Generator().manual_seed(k))
    with torch.no_grad():
        y, info = model(x, return_routing_info=True)
    y_ref, ids_ref = oracle_forward(model, x, None)
    assert all(model.config.expert_type_of(e) == expert_type for e in range(cfg.num_experts))
    assert info.ids.shape[-1] == k
    assert torch.equal(info.ids.long(), ids_ref)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)


def test_ties_go_to_the_lower_index() -> None:
    cfg = PiMoEConfig(hidden_size=4, num_experts=6, top_k=3, expert_types=(ExpertType.LANGUAGE,), use_gating=False)
    model = build_model(cfg)
    with torch.no_grad():
        model.router.router_network[3].weight.zero_()
        model.router.router_network[3].bias.copy_(torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 1.0]))
    _, info = model(torch.randn(1, 5, 4), return_routing_info=True)
    assert info.ids.tolist() == [[[1, 2, 4]] * 5]


def test_nan_logits_give_in_range_ids_and_visible_nan() -> None:
    cfg = PiMoEConfig(hidden_size=4, num_experts=5, top_k=2, expert_types=(ExpertType.LANGUAGE,))
    model = build_model(cfg)
    x = torch.randn(1, 3, 4)
    x[0, 1, 0] = float("nan")
    x[0, 2, 0] = float("inf")
    y, info = model(x, return_routing_info=True)
    assert info.ids.min() >= 0 and info.ids.max() < 5
    assert torch.isnan(y[0, 1]).all()
    assert torch.isfinite(y[0, 0]).all()


def test_gradients_reach_router_and_experts() -> None:
    model = build_model(PiMoEConfig(hidden_size=8, num_experts=4, top_k=2, expert_types=(ExpertType.LANGUAGE,)))
    model.train()
    x = torch.randn(2, 6, 8, requires_grad=True)
    y = model(x)
    assert model.aux_loss is not None
    (y.square().sum() + model.aux_loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert model.router.router_network[3].weight.grad is not None
    assert model.router.router_network[3].weight.grad.abs().sum() > 0
    used = {int(e) for e in range(4) if model.experts[e].layers[0].weight.grad is not None
            and model.experts[e].layers[0].weight.grad.abs().sum() > 0}
    assert used, "no expert received a gradient"


def test_gradcheck_float64() -> None:
    cfg = PiMoEConfig(hidden_size=3, num_experts=3, top_k=2, intermediate_size=4,
                      expert_types=(ExpertType.MATHEMATICAL, ExpertType.LOGICAL), dropout=0.0, router_dropout=0.0)
    model = build_model(cfg).double()
    x = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    # routing is piecewise constant: gradcheck holds away from decision boundaries (random x is)
    assert torch.autograd.gradcheck(lambda t: model(t), (x,), eps=1e-6, atol=1e-5)


def test_eval_forward_is_bit_identical_across_runs() -> None:
    model = build_model(PiMoEConfig(hidden_size=64, num_experts=8, top_k=2, expert_types=list(ExpertType)[:3]))
    x = torch.randn(3, 17, 64)
    first = model(x)
    for _ in range(3):
        assert torch.equal(model(x), first)
    assert torch.equal(build_model(model.config)(x), first)  # same seed, same weights, same output


def test_training_dropout_changes_output_eval_does_not() -> None:
    model = build_model(PiMoEConfig(hidden_size=16, num_experts=4, expert_types=(ExpertType.LANGUAGE,), dropout=0.5))
    x = torch.randn(2, 8, 16)
    model.train()
    a, b = model(x), model(x)
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model(x), model(x))


def test_capacity_factor_drops_in_training_only() -> None:
    cfg = PiMoEConfig(hidden_size=4, num_experts=4, top_k=1, expert_types=(ExpertType.LANGUAGE,), use_gating=False,
                      capacity_factor=1.0, dropout=0.0, router_dropout=0.0)
    model = build_model(cfg)
    with torch.no_grad():  # every token prefers expert 2
        model.router.router_network[3].weight.zero_()
        model.router.router_network[3].bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    x = torch.randn(1, 8, 4)
    model.eval()
    y_eval, info_eval = model(x, return_routing_info=True)
    assert info_eval.dropped_fraction == 0.0
    model.train()
    y_train, info = model(x, return_routing_info=True)
    # capacity = ceil(1.0 * 8 * 1 / 4) = 2: tokens 0 and 1 kept, 6 dropped (output 0)
    assert info.dropped_fraction == pytest.approx(6 / 8)
    assert info.expert_counts.tolist() == [0, 0, 2, 0]
    torch.testing.assert_close(y_train[0, :2], y_eval[0, :2])
    assert torch.all(y_train[0, 2:] == 0)


def test_system_accepts_seed_constructor() -> None:
    model = PiMoESystem(32, 4, [ExpertType.REASONING, "computation"], router_config={"temperature": 2.0, "top_k": 2},
                        expert_config={"intermediate_size": 48, "activation": "silu"})
    assert model.config.temperature == 2.0 and model.config.top_k == 2
    assert model.experts[0].widths == (32, 48, 24, 32)
    assert all(ex.activation == "silu" for ex in model.experts)
