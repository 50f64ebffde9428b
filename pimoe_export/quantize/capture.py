"""The inputs of every PiMoE layer of a model, captured while the model runs on calibration feeds.

Calibration runs the PyTorch model on the feeds with a pre-hook on every PiMoE layer that keeps its input hidden
states (valid positions only when the layer is called with an attention mask), in the order the layers run: the
order of their nodes in the exported graph. A bare layer is the model whose root is the layer: its input is the
feed itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pimoe_export.errors import PiMoEInputError
from pimoe_export.interface import LAYER_INPUT, MODEL_MASK_INPUT
from pimoe_export.model.source import moe_layers


def capture_layer_inputs(model: nn.Module, feeds: Sequence[Mapping[str, Any]]) -> dict[str, list[torch.Tensor]]:
    """{layer path: [1, tokens, H] fp32 batches} of every PiMoE layer's input, in the order the layers ran."""
    layers = moe_layers(model)
    captured: dict[str, list[torch.Tensor]] = {}
    handles = []

    def hook_for(path: str):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs[LAYER_INPUT]  # PiMoESystem.forward(hidden_states, ...)
            mask = args[1] if len(args) > 1 else kwargs.get(MODEL_MASK_INPUT)  # forward(hidden_states, attention_mask)
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
    for path, batches in captured.items():
        if not all(torch.isfinite(b).all() for b in batches):
            where = f"PiMoE layer {path!r}" if path else "the PiMoE layer"
            raise PiMoEInputError(f"the calibration data drives {where} to NaN or Inf (values beyond the float32 "
                                  "range, or an overflow upstream); scale or clean the calibration data")
    return captured
