"""Losses against hand computations; statistics and metrics on constructed routings; adaptation."""

from __future__ import annotations

import math

import pytest
import torch

from pimoe_export.model import AdaptivePiMoE, EnhancedPiMoEIntegration, ExpertType, PiMoEConfig, build_model
from pimoe_export.model.router import RouterDecision


def identity_router_model(e: int = 4, k: int = 1, **kw) -> torch.nn.Module:
    """H = Hr = E, router logits = relu(x): a one-hot x * 10 sends the token to that expert."""
    cfg = PiMoEConfig(hidden_size=e, num_experts=e, router_hidden_size=e, top_k=k, use_gating=False,
                      expert_types=(ExpertType.LANGUAGE,), dropout=0.0, router_dropout=0.0, **kw)
    model = build_model(cfg)
    with torch.no_grad():
        net = model.router.router_network
        net[0].weight.copy_(torch.eye(e))
        net[0].bias.zero_()
        net[3].weight.copy_(torch.eye(e))
        net[3].bias.zero_()
    return model


def tokens_for(experts: list[int], e: int, scale: float = 10.0) -> torch.Tensor:
    x = torch.zeros(1, len(experts), e)
    for t, ex in enumerate(experts):
        x[0, t, ex] = scale
    return x


def test_losses_match_hand_computation() -> None:
    cfg = PiMoEConfig(hidden_size=2, num_experts=3, top_k=2, expert_types=(ExpertType.LANGUAGE, ExpertType.LOGICAL),
                      load_balance_weight=0.5, z_loss_weight=0.25, type_consistency_weight=2.0)
    model = build_model(cfg)
    router = model.router
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    probs = torch.softmax(logits, -1)
    ids = torch.tensor([[1, 0], [2, 0]], dtype=torch.int32)
    type_logits = torch.tensor([[0.3, -0.2], [1.0, 0.0]])
    losses = router.losses(RouterDecision(logits, probs, probs.gather(1, ids.long()), ids, type_logits))

    p = probs.tolist()
    mean_p = [(p[0][e] + p[1][e]) / 2 for e in range(3)]
    mse = 0.5 * sum((m - 1 / 3) ** 2 for m in mean_p) / 3
    f = [2 / 4, 1 / 4, 1 / 4]  # assignments: e1, e0, e2, e0 -> counts [2, 1, 1] / 4
    switch = 0.5 * 3 * sum(fe * pe for fe, pe in zip(f, mean_p, strict=True))
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()]
    z = 0.25 * sum(v * v for v in lse) / 2
    pt = torch.softmax(type_logits, -1).tolist()
    # expert type index = e % 2: top-1 of token 0 is expert 1 (type 1), of token 1 is expert 2 (type 0)
    tc = 2.0 * ((1 - pt[0][1]) * p[0][1] + (1 - pt[1][0]) * p[1][2]) / 2
    assert float(losses["load_balance_loss"]) == pytest.approx(mse, rel=1e-5)
    assert float(losses["switch_loss"]) == pytest.approx(switch, rel=1e-5)
    assert float(losses["z_loss"]) == pytest.approx(z, rel=1e-5)
    assert float(losses["type_consistency_loss"]) == pytest.approx(tc, rel=1e-5)
    assert float(losses["aux_loss"]) == pytest.approx(mse + z + tc, rel=1e-5)


def test_switch_form_and_auxiliary_off() -> None:
    model = build_model(PiMoEConfig(hidden_size=4, num_experts=2, load_balance_loss="switch",
                                    expert_types=(ExpertType.LANGUAGE,)))
    _, info = model(torch.randn(1, 5, 4), return_routing_info=True)
    losses = {k: float(v.detach()) for k, v in info.losses.items()}
    assert losses["aux_loss"] == pytest.approx(
        losses["switch_loss"] + losses["z_loss"] + losses["type_consistency_loss"], rel=1e-6)
    off = build_model(PiMoEConfig(hidden_size=4, num_experts=2, use_auxiliary_loss=False,
                                  expert_types=(ExpertType.LANGUAGE,)))
    _, info = off(torch.randn(1, 5, 4), return_routing_info=True)
    assert float(info.losses["aux_loss"]) == 0.0


def test_empty_batch_losses_are_zero_not_nan() -> None:
    model = build_model(PiMoEConfig(hidden_size=4, num_experts=3, expert_types=(ExpertType.LANGUAGE,)))
    y, info = model(torch.randn(0, 4, 4), return_routing_info=True)
    assert y.shape == (0, 4, 4)
    assert all(float(v) == 0.0 for v in info.losses.values())


def test_statistics_on_constructed_routing() -> None:
    model = identity_router_model(e=4)
    model(tokens_for([0, 0, 0, 1, 2, 2], 4))
    mask = torch.tensor([[1, 1, 0]])
    model(tokens_for([3, 3, 3], 4), attention_mask=mask)  # the masked token counts nowhere
    stats = model.get_system_stats()
    counts = [3, 1, 2, 2]
    assert stats["expert_usage_counts"] == counts
    assert stats["total_tokens"] == 8 and stats["total_usage"] == 8
    assert stats["expert_loads"] == pytest.approx([c / 8 for c in counts])
    mean, std = 2.0, math.sqrt(sum((c - 2.0) ** 2 for c in counts) / 4)
    ratio = 1 / (1 + std / mean)
    assert stats["load_balance_ratio"] == pytest.approx(ratio)
    assert stats["system_efficiency"] == pytest.approx(0.7 * ratio + 0.3 * min(1, 8 / 400))
    assert stats["usage_distribution"] == {"language": pytest.approx(1.0)}
    model.reset_stats()
    assert model.get_system_stats()["total_usage"] == 0


def test_enhanced_metrics_on_constructed_routing() -> None:
    inner = identity_router_model(e=4)
    enhanced = EnhancedPiMoEIntegration(4, pimoe=inner, optimization_level="basic")
    x = tokens_for([0, 0, 1, 1, 1, 1], 4, scale=10.0)
    x[0, 5] = torch.tensor([1.0, 1.0, 1.0, 1.01])  # a low-confidence token (goes to expert 3)
    out, m = enhanced(x, return_metrics=True)
    assert out.shape == x.shape
    assert m["expert_counts"] == [2, 3, 0, 1]
    assert m["expert_utilization"] == 0.75
    counts = torch.tensor([2.0, 3.0, 0.0, 1.0])
    assert m["load_balance_score"] == pytest.approx(float(1 / (1 + counts.std(unbiased=False) / counts.mean())))
    assert m["routing_accuracy"] == pytest.approx(5 / 6)  # softmax(10 one-hot) > 0.7; the last token is not
    assert m["total_tokens"] == 6 and m["batch_size"] == 1 and m["sequence_length"] == 6
    assert m["latency_ms"] > 0 and m["throughput_tokens_per_sec"] > 0
    assert m["memory_usage_mb"] > 0 and m["memory_source"] == "process_rss"


def test_optimization_levels_are_real_settings() -> None:
    fast = EnhancedPiMoEIntegration(8, 2, expert_types=["language"], optimization_level="advanced").eval()
    assert fast.settings.inference_mode
    out = fast(torch.randn(1, 3, 8))
    assert out.is_inference()  # ran under torch.inference_mode
    assert not fast.train()(torch.randn(1, 3, 8)).is_inference()  # training never runs under inference_mode
    none = EnhancedPiMoEIntegration(8, 2, expert_types=["language"], optimization_level="none").eval()
    assert not none(torch.randn(1, 3, 8)).is_inference()
    q = EnhancedPiMoEIntegration(8, 2, expert_types=["language"], enable_quantization=True)
    assert q.settings.export_precision == "int8"
    assert q.config.metadata["deployment"]["export_precision"] == "int8"


def skewed_adaptive(rate: float = 0.01) -> AdaptivePiMoE:
    cfg = PiMoEConfig(hidden_size=8, num_experts=4, top_k=1, expert_types=(ExpertType.LANGUAGE,), use_gating=False)
    torch.manual_seed(0)
    model = AdaptivePiMoE(config=cfg, adaptation_rate=rate, performance_threshold=0.95).eval()
    with torch.no_grad():  # a router with real per-token variation, and expert 0 favoured by a wide margin
        model.router.router_network[0].weight.mul_(3.0)
        model.router.router_network[3].weight.mul_(3.0)
        model.router.router_network[3].bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    return model


def test_adaptive_bias_moves_skewed_load_toward_uniform() -> None:
    model = skewed_adaptive()
    x = torch.randn(4, 64, 8, generator=torch.Generator().manual_seed(1))
    ratios = []
    for _ in range(60):
        model(x)
        record = model.adapt()
        assert record is not None
        ratios.append(record["load_balance_ratio"])
    assert ratios[0] < 0.5 and sum(ratios[-10:]) / 10 > 0.7, ratios
    bias = model.router.selection_bias
    assert bias[0] < 0 and bool((bias[1:] > bias[0]).all())
    assert len(model.history) == 60 and model.history[0]["adapted"]


def test_adaptation_is_deterministic_and_explicit() -> None:
    x = torch.randn(2, 32, 8, generator=torch.Generator().manual_seed(2))
    a, b = skewed_adaptive(), skewed_adaptive()
    for model in (a, b):
        for _ in range(5):
            model(x)
            model.adapt()
    assert torch.equal(a.router.selection_bias, b.router.selection_bias)
    assert torch.equal(a(x), b(x))
    before = a(x)
    for _ in range(3):  # eval forwards without adapt(): nothing moves
        assert torch.equal(a(x), before)
    assert a.adapt() is not None  # window had tokens
    assert a.adapt() is None  # empty window: no change, no record
