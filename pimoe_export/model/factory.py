"""Factories (seed API) and named presets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pimoe_export.errors import PiMoEConfigError
from pimoe_export.model.adaptive import AdaptivePiMoE
from pimoe_export.model.config import DEFAULT_EXPERT_TYPES, ExpertType, PiMoEConfig
from pimoe_export.model.enhanced import EnhancedPiMoEIntegration
from pimoe_export.model.moe_block import ExpertsConfig, MoEBlock, MoEBlockConfig, build_block
from pimoe_export.model.system import PiMoESystem, config_from_seed_args

#: Named configurations. ``seed-512`` and ``seed-types`` are the benchmark/CI models, ``tiny`` is for
#: tests (three types, two of them interleaved so one expert group is non-contiguous). ``mixtral-ffn`` and
#: ``qwen3-moe`` are MoE blocks shaped like one layer of the real models (gated SiLU experts without biases or
#: LayerNorm, softmax routing renormalised over the k, Hugging Face's expert-order combine): Mixtral-8x7B (H 4096,
#: I 14336, E 8, k 2; 5.6 GB in fp32) and Qwen3-30B-A3B (H 2048, I 768, E 128, k 8; 2.4 GB in fp32), calibrated
#: with the mse method (gated experts: see pimoe_export.hf.decoder.CALIBRATION_METHOD).
PRESETS: dict[str, PiMoEConfig | MoEBlockConfig] = {
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
    "mixtral-ffn": MoEBlockConfig(
        hidden_size=4096, num_experts=8, top_k=2, experts=ExpertsConfig(intermediate_size=14336), normalize=True,
        family="mixtral", metadata={"deployment": {"calibration_method": "mse"}},
    ),
    "qwen3-moe": MoEBlockConfig(
        hidden_size=2048, num_experts=128, top_k=8, experts=ExpertsConfig(intermediate_size=768), normalize=True,
        family="qwen3_moe", metadata={"deployment": {"calibration_method": "mse"}},
    ),
}


def preset_config(name: str) -> PiMoEConfig | MoEBlockConfig:
    if name not in PRESETS:
        raise PiMoEConfigError("preset", f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name]


def build_model(config: PiMoEConfig | MoEBlockConfig, seed: int = 0,
                adaptive: bool = False) -> PiMoESystem | MoEBlock:
    """A freshly initialised model in eval mode (a MoE block for a MoEBlockConfig); the same seed gives the same
    weights on every machine."""
    if isinstance(config, MoEBlockConfig):
        if adaptive:
            raise PiMoEConfigError("adaptive", "adaptive routing applies to PiMoE layers, not to MoE blocks")
        return build_block(config, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AdaptivePiMoE(config=config) if adaptive else PiMoESystem(config=config)
    return model.eval()


def create_from_preset(name: str, seed: int = 0, **overrides: Any) -> PiMoESystem | MoEBlock:
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
