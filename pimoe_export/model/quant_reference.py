"""Fake-quant PyTorch reference of the W8A8 `PiMoEExpertMLP`: exactly the integer math of the kernels.

Per layer l of expert g (x first divided per channel by act_smooth[l][g], SmoothQuant; the int8 weights
carry the matching per-column multiplication):
    x      = x / act_smooth[l][g]
    s      = act_scales[l * G + g]                       (w8a8: static, calibrated)
           | max|x_row| / 127, or 1 for an all-zero/NaN row  (w8a8_dynamic: per row)
    q      = round_half_even(clamp(nan_to_zero(x / s), -127, 127))      int8 codes
    acc    = sum_k q[k] * W_q[o, k]                       exact integer (int32 in the kernels)
    y      = float32(acc) * (s * w_scale[o]) + b[o]       one multiply, one add (no add without bias)
    hidden layers: LayerNorm (fp32) then activation; gated hidden layers: the GLU of the 2*out rows [gate; up]
    (functional.glu); the result is the next layer's x (one activation scale per layer input).

The kernels compute every step the same way, so the only differences left are fp32 rounding in LayerNorm and
the activation (~1e-7 relative), which can move an activation code by one step at a rounding boundary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pimoe_export.model import functional

QMAX = 127.0


def activation_scale_rowwise(x: torch.Tensor) -> torch.Tensor:
    """w8a8_dynamic scale per row: max|x| / 127, 1 where the max is 0 or NaN. Shape [rows, 1], fp32."""
    m = x.abs().amax(dim=-1, keepdim=True) if x.shape[-1] else x.new_zeros((x.shape[0], 1))
    return torch.where(m > 0, m / QMAX, torch.ones_like(m))


def quantize_activations(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """int8 codes (as float32 values) of x with a symmetric scale; NaN -> 0, saturating at ±127."""
    t = x / scale
    t = torch.where(torch.isnan(t), torch.zeros_like(t), t)
    return torch.round(torch.clamp(t, -QMAX, QMAX))


def int_matmul(codes: torch.Tensor, weight_q: torch.Tensor) -> torch.Tensor:
    """Exact sum_k codes[r, k] * W_q[o, k] as float32 (computed in float64, exact below 2^53)."""
    return (codes.double() @ weight_q.double().t()).float()


def expert_mlp_w8a8(
    x_sorted: torch.Tensor,
    offsets: torch.Tensor,
    roles: dict[str, list[torch.Tensor]],
    expert_ids: Sequence[int],
    activation: str,
    layer_norm: bool,
    eps: float,
    quant_mode: str,
    act_scales: Sequence[float],
    gated: bool = False,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> torch.Tensor:
    weights, w_scales, biases = roles["weight"], roles["w_scale"], roles.get("bias") or None
    n_layers, groups = len(weights), len(expert_ids)
    if quant_mode == "w8a8" and len(act_scales) != n_layers * groups:
        raise ValueError(f"w8a8 needs {n_layers * groups} act_scales (layers x experts), got {len(act_scales)}")
    y = torch.zeros((x_sorted.shape[0], weights[-1].shape[1]), dtype=torch.float32, device=x_sorted.device)
    bounds = offsets.tolist()
    for g, e in enumerate(expert_ids):
        lo, hi = bounds[e], bounds[e + 1]
        if hi <= lo:
            continue
        h = x_sorted[lo:hi].float()
        for layer in range(n_layers):
            h = h / roles["act_smooth"][layer][g].float()
            if quant_mode == "w8a8":
                scale = torch.tensor(float(act_scales[layer * groups + g]), dtype=torch.float32)
            else:
                scale = activation_scale_rowwise(h)
            acc = int_matmul(quantize_activations(h, scale), weights[layer][g])
            h = acc * (scale * w_scales[layer][g].float())
            if biases is not None:
                h = h + biases[layer][g].float()
            if layer < n_layers - 1:
                if gated:
                    h = functional.glu(h, activation, alpha, limit)
                    continue
                if layer_norm:
                    h = F.layer_norm(h, (h.shape[-1],), roles["ln_gamma"][layer][g].float(),
                                     roles["ln_beta"][layer][g].float(), eps)
                h = functional.activation_fn(activation, h)
        y[lo:hi] = h
    return y.to(x_sorted.dtype)
