"""PyTorch reference of the PiMoE layer (knows nothing of ONNX or TensorRT)."""

from pimoe_export.model.adaptive import AdaptivePiMoE
from pimoe_export.model.config import DEFAULT_EXPERT_TYPES, ExpertSpec, ExpertType, PiMoEConfig
from pimoe_export.model.enhanced import OPTIMIZATION_LEVELS, EnhancedPiMoEIntegration, OptimizationSettings
from pimoe_export.model.experts import PiMoEExpert
from pimoe_export.model.factory import (
    PRESETS,
    build_model,
    create_enhanced_pimoe_integration,
    create_from_preset,
    create_pimoe_system,
    preset_config,
)
from pimoe_export.model.io import load_pretrained, save_pretrained
from pimoe_export.model.pruning import PruningReport, magnitude_prune, structured_prune
from pimoe_export.model.router import TokenLevelRouter
from pimoe_export.model.system import PiMoESystem, RoutingInfo

__all__ = [
    "DEFAULT_EXPERT_TYPES",
    "OPTIMIZATION_LEVELS",
    "PRESETS",
    "AdaptivePiMoE",
    "EnhancedPiMoEIntegration",
    "ExpertSpec",
    "ExpertType",
    "OptimizationSettings",
    "PiMoEConfig",
    "PiMoEExpert",
    "PiMoESystem",
    "PruningReport",
    "RoutingInfo",
    "TokenLevelRouter",
    "build_model",
    "create_enhanced_pimoe_integration",
    "create_from_preset",
    "create_pimoe_system",
    "load_pretrained",
    "magnitude_prune",
    "preset_config",
    "save_pretrained",
    "structured_prune",
]
