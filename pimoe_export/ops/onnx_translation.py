"""ONNX translations of the torch custom ops, for ``torch.onnx.export(..., dynamo=True)``.

Each translation emits one node of domain ``pimoe`` (op contract v1) with the contract's attribute names;
``custom_translation_table()`` is passed to the exporter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnxscript
from onnxscript import ir
from onnxscript.values import Opset

import pimoe_export.ops.onnx_schema  # noqa: F401  (registers the pimoe schemas before Opset lookups)
from pimoe_export.ops import schema

PIMOE = Opset(schema.DOMAIN, schema.OPSET_VERSION)


def _set_types(*pairs: tuple[Any, Any]) -> None:
    """Give the new node's outputs their element types (the exporter cannot infer them for a custom
    domain; the contract fixes them: see schema.py)."""
    for value, dtype in pairs:
        value.dtype = dtype


def route_onnx(logits: Any, selection_bias: Any, k: int, normalize: bool) -> tuple[Any, Any]:
    weights, ids = PIMOE.PiMoERoute(
        logits, selection_bias, k=k, normalize=int(normalize), scoring="softmax", _outputs=2
    )
    _set_types((weights, ir.DataType.FLOAT), (ids, ir.DataType.INT32))
    return weights, ids


def dispatch_onnx(x: Any, ids: Any, num_experts: int) -> tuple[Any, Any, Any]:
    x_sorted, offsets, flat_to_sorted = PIMOE.PiMoEDispatch(x, ids, num_experts=num_experts, _outputs=3)
    _set_types((x_sorted, x.dtype), (offsets, ir.DataType.INT32), (flat_to_sorted, ir.DataType.INT32))
    return x_sorted, offsets, flat_to_sorted


def expert_mlp_onnx(
    x_sorted: Any,
    offsets: Any,
    params: Sequence[Any],
    expert_ids: Sequence[int],
    widths: Sequence[int],
    activation: str,
    layer_norm: bool,
    eps: float,
    quant_mode: str,
    act_scales: Sequence[float],
) -> Any:
    attrs: dict[str, Any] = {
        "expert_ids": list(expert_ids),
        "widths": list(widths),
        "activation": activation,
        "layer_norm": int(layer_norm),
        "eps": float(eps),
        "quant_mode": quant_mode,
    }
    if act_scales:
        attrs["act_scales"] = [float(s) for s in act_scales]
    y_sorted = PIMOE.PiMoEExpertMLP(x_sorted, offsets, *params, **attrs)
    _set_types((y_sorted, x_sorted.dtype))
    return y_sorted


def combine_onnx(y_sorted: Any, flat_to_sorted: Any, weights: Any) -> Any:
    y = PIMOE.PiMoECombine(y_sorted, flat_to_sorted, weights)
    _set_types((y, y_sorted.dtype))
    return y


def custom_translation_table() -> dict[Any, Any]:
    import torch

    import pimoe_export.ops.torch_ops  # noqa: F401  (registers torch.ops.pimoe.*)

    return {
        torch.ops.pimoe.route.default: route_onnx,
        torch.ops.pimoe.dispatch.default: dispatch_onnx,
        torch.ops.pimoe.expert_mlp.default: expert_mlp_onnx,
        torch.ops.pimoe.combine.default: combine_onnx,
    }


__all__ = ["PIMOE", "custom_translation_table", "onnxscript"]
