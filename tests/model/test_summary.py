"""What `pimoe-export info` says of a PiMoE layer (pimoe_export.model.summary: parameters per expert and per type,
GEMM FLOPs per token), against independent references: the parameters the built PyTorch model actually holds, the
Linear layers it actually runs, and FLOP counts worked out by hand from the preset's widths (README.md: "config,
parameters per expert/type, FLOPs/token")."""

from __future__ import annotations

import pytest
import torch

from pimoe_export.model import create_from_preset
from pimoe_export.model.summary import summarize


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def gemm_flops(module: torch.nn.Module) -> int:
    """2 x in x out for every Linear the module runs (a multiply-add is 2 FLOPs; bias, norms, activations: 0)."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


CASES = [("tiny", {}), ("seed-types", {}), ("tiny", {"use_gating": False, "layer_norm": False})]


@pytest.mark.parametrize(("preset", "overrides"), CASES, ids=["tiny", "seed-types", "tiny-no-gate-no-norm"])
def test_parameter_counts_are_those_the_model_holds(preset, overrides) -> None:
    model = create_from_preset(preset, **overrides)
    summary = summarize(model.config)
    assert summary["params_total"] == numel(model)
    assert summary["params_router"] == numel(model.router)
    rows = summary["params_per_expert"]
    assert [row["expert"] for row in rows] == list(range(len(model.experts)))
    per_type: dict[str, dict[str, int]] = {}
    for row, expert in zip(rows, model.experts, strict=True):
        assert row["params"] == numel(expert), row
        assert row["type"] == expert.expert_type.value
        entry = per_type.setdefault(expert.expert_type.value, {"experts": 0, "params": 0})
        entry["experts"] += 1
        entry["params"] += numel(expert)
    assert summary["params_per_type"] == per_type


def test_the_seed_types_preset_counts_written_out() -> None:
    """seed-types (H 512, I 2048, router hidden 256, 8 experts of 7 types, the first type twice): the numbers `info`
    printed when they were checked by hand."""
    summary = summarize(create_from_preset("seed-types").config)
    assert summary["params_total"] == 29_700_368
    assert summary["params_router"] == 268_560
    assert summary["params_per_type"]["reasoning"] == {"experts": 2, "params": 2 * 3_679_744}
    assert sum(entry["experts"] for entry in summary["params_per_type"].values()) == 8
    assert len(summary["params_per_type"]) == 7


@pytest.mark.parametrize(("preset", "overrides"), CASES, ids=["tiny", "seed-types", "tiny-no-gate-no-norm"])
def test_flops_per_token_are_those_of_the_linear_layers_inference_runs(preset, overrides) -> None:
    model = create_from_preset(preset, **overrides)
    summary = summarize(model.config)
    router = model.router
    router_flops = gemm_flops(router.router_network)
    if model.config.use_gating:
        router_flops += gemm_flops(router.gate_network)
    flops = summary["flops_per_token"]
    assert flops["router"] == router_flops  # the type classifier feeds a training loss only: not counted
    experts = [gemm_flops(expert) for expert in model.experts]
    assert [row["flops_per_token"] for row in summary["params_per_expert"]] == experts
    k = model.config.top_k
    assert flops["active_worst_case"] == router_flops + sum(sorted(experts)[-k:])
    assert flops["dense_all_experts"] == router_flops + sum(experts)
    assert flops["active_expected"] == pytest.approx(router_flops + k * sum(experts) / len(experts))


def test_the_tiny_presets_flops_worked_by_hand() -> None:
    """tiny: H 16, router hidden 8, 4 experts (language 16-32-16, computation 16-64-32-16, reasoning 16-32-16-16,
    language), top-2. Router: 2*16*8 + 2*8*4 (router) + 2*16*8 + 2*8*1 (gate) = 592. Experts: 1024 + 1024 = 2048,
    2048 + 4096 + 1024 = 7168, 1024 + 1024 + 512 = 2560, 2048. The worst case runs the two largest (7168 + 2560),
    not the two smallest; the expected case k x their mean."""
    summary = summarize(create_from_preset("tiny").config)
    assert [row["flops_per_token"] for row in summary["params_per_expert"]] == [2048, 7168, 2560, 2048]
    assert summary["flops_per_token"] == {"router": 592, "active_expected": 7504, "active_worst_case": 10320,
                                          "dense_all_experts": 14416}
    assert summary["params_total"] == 7968 and summary["params_router"] == 368
    assert summary["params_per_type"] == {"language": {"experts": 2, "params": 2 * 1136},
                                          "computation": {"experts": 1, "params": 3888},
                                          "reasoning": {"experts": 1, "params": 1440}}
