"""The four ops as torch custom ops (``torch.ops.pimoe.*``) with fake implementations.

Eager execution runs the reference math of :mod:`pimoe_export.model.functional`; tracing
(``torch.export`` / ``torch.onnx.export(dynamo=True)``) sees one opaque node per op, which
:mod:`pimoe_export.ops.onnx_translation` turns into a ``pimoe``-domain ONNX node.
Shapes are static given N (no data-dependent output shapes), so fake implementations are exact.
Arguments that contract v2 added come last, with the v1 behaviour as their defaults.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pimoe_export.model import functional
from pimoe_export.ops import schema

__all__ = ["combine", "dispatch", "expert_mlp", "route", "split_expert_params"]


@torch.library.custom_op("pimoe::route", mutates_args=())
def route(logits: Tensor, selection_bias: Tensor | None, k: int, normalize: bool, scoring: str = "softmax",
          num_groups: int = 1, groups_kept: int = 1, group_score: str = "max", routed_scaling_factor: float = 1.0,
          normalize_eps: float = 0.0) -> tuple[Tensor, Tensor]:
    weights, ids = functional.route(logits, selection_bias, k, normalize, scoring, num_groups, groups_kept,
                                    group_score, routed_scaling_factor, normalize_eps)
    return weights.float(), ids


@route.register_fake
def _route_fake(logits: Tensor, selection_bias: Tensor | None, k: int, normalize: bool, scoring: str = "softmax",
                num_groups: int = 1, groups_kept: int = 1, group_score: str = "max",
                routed_scaling_factor: float = 1.0, normalize_eps: float = 0.0) -> tuple[Tensor, Tensor]:
    n = logits.shape[0]
    return logits.new_empty((n, k), dtype=torch.float32), logits.new_empty((n, k), dtype=torch.int32)


@torch.library.custom_op("pimoe::dispatch", mutates_args=())
def dispatch(x: Tensor, ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    return functional.dispatch(x, ids, num_experts)


@dispatch.register_fake
def _dispatch_fake(x: Tensor, ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    rows = ids.shape[0] * ids.shape[1]
    return (
        x.new_empty((rows, x.shape[1])),
        x.new_empty((num_experts + 1,), dtype=torch.int32),
        x.new_empty((rows,), dtype=torch.int32),
    )


def split_expert_params(
    params: list[Tensor], num_layers: int, layer_norm: bool, quant_mode: str, bias: bool = True
) -> dict[str, list[Tensor]]:
    """Group the flat ``params`` list of `PiMoEExpertMLP` by role (contract order, schema layout)."""
    roles: dict[str, list[Tensor]] = {"weight": [], "w_scale": [], "act_smooth": [], "bias": [], "ln_gamma": [],
                                      "ln_beta": []}
    layout = schema.expert_mlp_param_layout(num_layers, layer_norm, quant_mode, bias=bias)
    if len(layout) != len(params):
        raise ValueError(f"PiMoEExpertMLP expects {len(layout)} parameter tensors, got {len(params)}")
    for (_, role), tensor in zip(layout, params, strict=True):
        roles[role].append(tensor)
    return roles


@torch.library.custom_op("pimoe::expert_mlp", mutates_args=())
def expert_mlp(
    x_sorted: Tensor,
    offsets: Tensor,
    params: list[Tensor],
    expert_ids: list[int],
    widths: list[int],
    activation: str,
    layer_norm: bool,
    eps: float,
    quant_mode: str,
    act_scales: list[float],
    gated: bool = False,
    bias: bool = True,
    alpha: float = schema.SWIGLU_OAI_ALPHA,
    limit: float = schema.SWIGLU_OAI_LIMIT,
) -> Tensor:
    roles = split_expert_params(params, len(widths) - 1, layer_norm, quant_mode, bias)
    if quant_mode != "none":
        from pimoe_export.model.quant_reference import expert_mlp_w8a8

        return expert_mlp_w8a8(x_sorted, offsets, roles, expert_ids, activation, layer_norm, eps, quant_mode,
                               act_scales, gated, alpha, limit)
    return functional.expert_mlp(
        x_sorted,
        offsets,
        expert_ids,
        roles["weight"],
        roles["bias"] if bias else None,
        roles["ln_gamma"] if layer_norm else None,
        roles["ln_beta"] if layer_norm else None,
        activation,
        eps,
        gated=gated,
        alpha=alpha,
        limit=limit,
    )


@expert_mlp.register_fake
def _expert_mlp_fake(
    x_sorted: Tensor,
    offsets: Tensor,
    params: list[Tensor],
    expert_ids: list[int],
    widths: list[int],
    activation: str,
    layer_norm: bool,
    eps: float,
    quant_mode: str,
    act_scales: list[float],
    gated: bool = False,
    bias: bool = True,
    alpha: float = schema.SWIGLU_OAI_ALPHA,
    limit: float = schema.SWIGLU_OAI_LIMIT,
) -> Tensor:
    return x_sorted.new_empty((x_sorted.shape[0], widths[-1]))


@torch.library.custom_op("pimoe::combine", mutates_args=())
def combine(y_sorted: Tensor, flat_to_sorted: Tensor, weights: Tensor, order: str = "slot") -> Tensor:
    return functional.combine(y_sorted, flat_to_sorted, weights, order)


@combine.register_fake
def _combine_fake(y_sorted: Tensor, flat_to_sorted: Tensor, weights: Tensor, order: str = "slot") -> Tensor:
    return y_sorted.new_empty((weights.shape[0], y_sorted.shape[1]))
