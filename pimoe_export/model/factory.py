"""Factories (seed API) and named presets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pimoe_export.errors import PiMoEConfigError
from pimoe_export.model.adaptive import AdaptivePiMoE
from pimoe_export.model.config import DEFAULT_EXPERT_TYPES, ExpertType, PiMoEConfig
from pimoe_export.model.enhanced import EnhancedPiMoEIntegration
from pimoe_export.model.system import PiMoESystem, config_from_seed_args

#: Named configurations. ``seed-512`` and ``seed-types`` are the benchmark/CI models, ``tiny`` is for
#: tests (three types, two of them interleaved so one expert group is non-contiguous), ``mixtral-ffn`` is
#: the GPU benchmark shape (plain GELU FFN experts, no LayerNorm; 3.7 GB in fp32).
PRESETS: dict[str, PiMoEConfig] = {
    "tiny": PiMoEConfig(
        hidden_size=16, num_experts=4, intermediate_size=32, top_k=2,
        expert_types=(ExpertType.LANGUAGE, ExpertType.COMPUTATION, ExpertType.REASONING),
    ),
    "seed-512": PiMoEConfig(
        hidden_size=512, num_experts=8, intermediate_size=2048, top_k=2, expert_types=(ExpertType.LANGUAGE,)
    ),
    "seed-types": PiMoEConfig(
        hidden_size=512, num_experts=8, intermediate_size=2048, top_k=1, expert_types=DEFAULT_EXPERT_TYPES
    ),
    "mixtral-ffn": PiMoEConfig(
        hidden_size=4096, num_experts=8, intermediate_size=14336, top_k=2,
        expert_types=(ExpertType.LANGUAGE,), layer_norm=False,
    ),
}


def preset_config(name: str) -> PiMoEConfig:
    if name not in PRESETS:
        raise PiMoEConfigError("preset", f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name]


def build_model(config: PiMoEConfig, seed: int = 0, adaptive: bool = False) -> PiMoESystem:
    """A freshly initialised model in eval mode; the same seed gives the same weights on every machine."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AdaptivePiMoE(config=config) if adaptive else PiMoESystem(config=config)
    return model.eval()


def create_from_preset(name: str, seed: int = 0, **overrides: Any) -> PiMoESystem:
    config = preset_config(name)
    if overrides:
        config = config.replace(**overrides)
    return build_model(config, seed=seed)


def create_pimoe_system(
    hidden_size: int,
    num_experts: int = 8,
    expert_types: Sequence[ExpertType | str] | None = None,
    router_config: Mapping[str, Any] | None = None,
    expert_config: Mapping[str, Any] | None = None,
) -> PiMoESystem:
    """Seed factory: a :class:`PiMoESystem`; ``expert_types`` defaults to the seed's seven-type order."""
    return PiMoESystem(
        config=config_from_seed_args(
            hidden_size, num_experts, expert_types or DEFAULT_EXPERT_TYPES, router_config, expert_config
        )
    )


def create_enhanced_pimoe_integration(
    hidden_size: int,
    num_experts: int = 8,
    optimization_level: str = "advanced",
    enable_quantization: bool = True,
    expert_types: Sequence[ExpertType | str] | None = None,
    router_config: Mapping[str, Any] | None = None,
    expert_config: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> EnhancedPiMoEIntegration:
    """Seed factory: an :class:`EnhancedPiMoEIntegration` (see its docstring for every setting)."""
    return EnhancedPiMoEIntegration(
        hidden_size,
        num_experts,
        expert_types=expert_types or DEFAULT_EXPERT_TYPES,
        optimization_level=optimization_level,
        enable_quantization=enable_quantization,
        router_config=router_config,
        expert_config=expert_config,
        **kwargs,
    )
