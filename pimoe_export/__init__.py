"""pimoe-export: PiMoE (token-routed Mixture-of-Experts FFN) from PyTorch to ONNX custom ops, INT8 and
TensorRT plugins, with parity checks.

Heavy modules load lazily: ``import pimoe_export`` needs neither torch nor TensorRT until a model class
is touched, so the runtime can be used on machines with ONNX Runtime alone.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ExpertType": "pimoe_export.model.config",
    "PiMoEConfig": "pimoe_export.model.config",
    "TokenLevelRouter": "pimoe_export.model.router",
    "PiMoEExpert": "pimoe_export.model.experts",
    "PiMoESystem": "pimoe_export.model.system",
    "AdaptivePiMoE": "pimoe_export.model.adaptive",
    "EnhancedPiMoEIntegration": "pimoe_export.model.enhanced",
    "create_pimoe_system": "pimoe_export.model.factory",
    "create_enhanced_pimoe_integration": "pimoe_export.model.factory",
    "create_from_preset": "pimoe_export.model.factory",
    "PRESETS": "pimoe_export.model.factory",
    "load_pretrained": "pimoe_export.model.io",
    "export_model": "pimoe_export.export.exporter",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pimoe_export' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
