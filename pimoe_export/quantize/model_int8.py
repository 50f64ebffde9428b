"""INT8 for a whole model: each PiMoE layer's experts W8A8 (router fp32), calibrated on the activations that
reach that layer when the model runs on real inputs; everything outside the PiMoE layers stays as exported.

Calibration runs the PyTorch model on the calibration feeds with a pre-hook on every PiMoE layer that keeps its
input hidden states (valid positions only when the layer is called with an attention mask); each layer is then
quantised exactly as a bare layer is (:func:`compute_quant_params`), and the whole-model graph's
PiMoEExpertMLP nodes are rewritten layer by layer in the order the layers run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pimoe_export.errors import PiMoEExportError, PiMoEInputError
from pimoe_export.interface import LAYER_INPUT
from pimoe_export.quantize import QuantizeResult, check_settings


def capture_layer_inputs(model: nn.Module, feeds: Sequence[Mapping[str, Any]]) -> dict[str, list[torch.Tensor]]:
    """{layer path: [1, tokens, H] fp32 batches} of every PiMoE layer's input, in the order the layers ran."""
    from pimoe_export.export.model_export import moe_layers

    layers = moe_layers(model)
    captured: dict[str, list[torch.Tensor]] = {}
    handles = []

    def hook_for(path: str):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs[LAYER_INPUT]  # PiMoESystem.forward(hidden_states, ...)
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            h = hidden.detach().float().reshape(-1, hidden.shape[-1])
            if mask is not None:
                h = h[mask.reshape(-1) != 0]
            captured.setdefault(path, []).append(h.unsqueeze(0))
        return hook

    for path, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(hook_for(path), with_kwargs=True))
    tracking = {path: layer.track_stats for path, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.track_stats = False
        with torch.no_grad():
            for feed in feeds:
                model(**{k: torch.as_tensor(np.asarray(v)) for k, v in feed.items()})
    finally:
        for handle in handles:
            handle.remove()
        for path, layer in layers.items():
            layer.track_stats = tracking[path]
    missing = sorted(set(layers) - set(captured))
    if missing:
        raise PiMoEInputError(f"the calibration inputs never reached the PiMoE layers {missing}")
    return captured


def quantize_whole_model(
    model: nn.Module,
    output: str | Path,
    calibration: Sequence[Mapping[str, Any]],
    *,
    fp32_onnx: str | Path,
    method: str = "entropy",
    mode: str = "w8a8",
    percentile: float = 99.99,
    smooth_alpha: float | None = 0.5,
) -> QuantizeResult:
    """Write the INT8 form of ``fp32_onnx`` (an :func:`~pimoe_export.export.model_export.export_model` graph of
    ``model``) to ``output``, calibrated on ``calibration`` (feeds of the model's named inputs)."""
    from pimoe_export.export.model_export import moe_layers
    from pimoe_export.interface import read_metadata
    from pimoe_export.quantize.calibrate import collect_stats
    from pimoe_export.quantize.int8 import compute_quant_params, write_int8_onnx

    check_settings(method=method, mode=mode, percentile=percentile, smooth_alpha=smooth_alpha, max_tokens=None)
    meta = read_metadata(fp32_onnx)
    layers = moe_layers(model)
    if not meta.is_model or set(meta.layer_configs) != set(layers):
        raise PiMoEExportError(f"{fp32_onnx} is not the whole-model export of this model (its PiMoE layers "
                               f"{sorted(meta.layer_configs)}, the model's {sorted(layers)}); export it with "
                               "export_model")
    if not calibration:
        raise PiMoEInputError("whole-model INT8 needs calibration inputs (a list of feeds of the model's inputs)")
    captured = capture_layer_inputs(model, calibration)
    params, info = [], {"mode": mode, "router": "fp32", "layers": {}}
    for path in captured:  # the order the layers ran = the order of their nodes in the graph
        layer = layers[path].eval()
        stats = collect_stats(layer, captured[path], smooth_alpha=smooth_alpha) if mode == "w8a8" or smooth_alpha \
            else None
        layer_params = compute_quant_params(layer, stats, method, mode, percentile)
        params.append(layer_params)
        info["layers"][path] = layer_params.info
    info["method"] = params[0].method
    path = write_int8_onnx(fp32_onnx, params, output, info=info)
    return QuantizeResult(Path(path), params, Path(fp32_onnx))
