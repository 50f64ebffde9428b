"""ONNX translations of the torch custom ops, for ``torch.onnx.export(..., dynamo=True)``.

Each translation emits one node of domain ``pimoe`` (op contract v2) with the contract's attribute names;
attributes that v2 added are written only when they differ from their (v1) defaults, so a graph using v1 features
only carries v1 attributes. ``custom_translation_table()`` is passed to the exporter.
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


def _changed(op: str, attrs: dict[str, Any]) -> dict[str, Any]:
    """The v2 attributes of ``attrs`` whose value differs from the contract default (v1 attributes stay)."""
    spec = schema.SCHEMAS[op]
    return {name: value for name, value in attrs.items()
            if spec.attribute(name).since == 1 or value != spec.attribute(name).default}


def route_onnx(logits: Any, selection_bias: Any, k: int, normalize: bool, scoring: str = "softmax",
               num_groups: int = 1, groups_kept: int = 1, group_score: str = "max",
               routed_scaling_factor: float = 1.0, normalize_eps: float = 0.0) -> tuple[Any, Any]:
    attrs = _changed(schema.ROUTE, {"k": k, "normalize": int(normalize), "scoring": scoring,
                                    "num_groups": num_groups, "groups_kept": groups_kept, "group_score": group_score,
                                    "routed_scaling_factor": float(routed_scaling_factor),
                                    "normalize_eps": float(normalize_eps)})
    inputs = (logits,) if selection_bias is None else (logits, selection_bias)  # absent, not "": see op_contract.md
    weights, ids = PIMOE.PiMoERoute(*inputs, **attrs, _outputs=2)
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
    gated: bool = False,
    bias: bool = True,
    alpha: float = schema.SWIGLU_OAI_ALPHA,
    limit: float = schema.SWIGLU_OAI_LIMIT,
) -> Any:
    attrs: dict[str, Any] = _changed(schema.EXPERT_MLP, {
        "expert_ids": list(expert_ids),
        "widths": list(widths),
        "activation": activation,
        "layer_norm": int(layer_norm),
        "eps": float(eps),
        "quant_mode": quant_mode,
        "gated": int(gated),
        "bias": int(bias),
        "alpha": float(alpha) if activation == "swiglu_oai" else schema.SWIGLU_OAI_ALPHA,
        "limit": float(limit) if activation == "swiglu_oai" else schema.SWIGLU_OAI_LIMIT,
    })
    if act_scales:
        attrs["act_scales"] = [float(s) for s in act_scales]
    y_sorted = PIMOE.PiMoEExpertMLP(x_sorted, offsets, *params, **attrs)
    _set_types((y_sorted, x_sorted.dtype))
    return y_sorted


def combine_onnx(y_sorted: Any, flat_to_sorted: Any, weights: Any, order: str = "slot") -> Any:
    y = PIMOE.PiMoECombine(y_sorted, flat_to_sorted, weights, **_changed(schema.COMBINE, {"order": order}))
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
