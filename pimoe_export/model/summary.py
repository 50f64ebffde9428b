"""Parameter and FLOP accounting from the config alone (used by `pimoe-export info`)."""

from __future__ import annotations

from typing import Any

from pimoe_export.model.config import PiMoEConfig


def router_params(config: PiMoEConfig) -> int:
    h, hr, e = config.hidden_size, config.router_hidden_size, config.num_experts
    assert hr is not None
    n = h * hr + hr + hr * e + e  # router_network
    if config.use_gating:
        n += h * hr + hr + hr + 1  # gate_network
    n += h * len(config.expert_types) + len(config.expert_types)  # expert_type_classifier (training only)
    return n


def router_flops_per_token(config: PiMoEConfig) -> int:
    """GEMM FLOPs of the router path that inference runs (classifier excluded: it feeds a loss only)."""
    h, hr, e = config.hidden_size, config.router_hidden_size, config.num_experts
    assert hr is not None
    flops = 2 * h * hr + 2 * hr * e
    if config.use_gating:
        flops += 2 * h * hr + 2 * hr
    return flops


def summarize(config: PiMoEConfig) -> dict[str, Any]:
    specs = config.expert_specs()
    per_expert = [
        {
            "expert": i,
            "type": config.expert_type_of(i).value,
            "widths": list(spec.widths),
            "activation": spec.activation,
            "params": spec.num_params(),
            "flops_per_token": spec.flops_per_token(),
        }
        for i, spec in enumerate(specs)
    ]
    per_type: dict[str, dict[str, int]] = {}
    for row in per_expert:
        entry = per_type.setdefault(row["type"], {"experts": 0, "params": 0})
        entry["experts"] += 1
        entry["params"] += row["params"]
    expert_flops = sorted((row["flops_per_token"] for row in per_expert), reverse=True)
    k = config.top_k
    router_flops = router_flops_per_token(config)
    return {
        "params_total": router_params(config) + sum(row["params"] for row in per_expert),
        "params_router": router_params(config),
        "params_per_expert": per_expert,
        "params_per_type": per_type,
        "flops_per_token": {
            "router": router_flops,
            # uniform routing: each token runs k experts drawn evenly from all E
            "active_expected": router_flops + k * sum(expert_flops) / len(expert_flops),
            "active_worst_case": router_flops + sum(expert_flops[:k]),
            "dense_all_experts": router_flops + sum(expert_flops),
        },
        "expert_groups": [
            {"experts": ids, "widths": list(spec.widths), "activation": spec.activation}
            for spec, ids in config.expert_groups()
        ],
    }


def summarize_block(config: Any) -> dict[str, Any]:
    """What :func:`summarize` says of a PiMoE layer, for a MoE block (:class:`MoEBlockConfig`): parameters, GEMM
    FLOPs per token and the PiMoEExpertMLP groups (the routed groups, then the shared expert)."""
    h, e, k = config.hidden_size, config.num_experts, config.top_k
    routed = config.experts
    expert_flops = sum(2 * rows * cols for rows, cols in routed.layer_shapes(h))
    shared_flops = 0 if config.shared is None else sum(2 * r * c for r, c in config.shared.layer_shapes(h))
    router_flops = 2 * h * e
    groups = [{"experts": ids, "widths": list(config.widths), "activation": routed.activation, "gated": routed.gated}
              for ids in config.routed_groups()]
    if config.shared is not None:
        groups.append({"experts": "shared", "widths": list(config.shared.widths(h)),
                       "activation": config.shared.activation, "gated": config.shared.gated})
    active = router_flops + k * expert_flops + shared_flops
    return {
        "params_total": config.num_parameters(),
        "params_router": h * e,
        "params_per_expert": routed.params_per_expert(h),
        "flops_per_token": {"router": router_flops, "active_expected": active, "active_worst_case": active,
                            "dense_all_experts": router_flops + e * expert_flops + shared_flops},
        "expert_groups": groups,
    }
