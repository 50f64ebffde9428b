"""Reference semantics of the four PiMoE ops, in plain PyTorch.

These functions are THE definition of op contract v1 (docs/op_contract.md): the PyTorch model calls
them, the torch custom ops in :mod:`pimoe_export.ops` wrap them, and every kernel (ORT C++, CUDA) is
tested against them. They are vectorised (no per-token Python loops) and deterministic.

Shapes: N tokens, E experts, k slots per token, H hidden size, R = N * k dispatched rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pimoe_export.errors import PiMoEInputError


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 storage (fp32 accumulation); fp64 stays fp64 (for gradcheck/oracles)."""
    return torch.promote_types(dtype, torch.float32)


def topk_lower_index_wins(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries per row; ties go to the lower index; NaN ranks lowest.

    A stable descending sort keeps equal values in index order. NaN is first mapped to -inf and then
    moved behind every non-NaN entry with a second stable sort, so a NaN row still yields k distinct
    in-range ids (0..k-1) instead of garbage.
    """
    if scores.shape[-1] == 0 or k == 0:
        return torch.empty((*scores.shape[:-1], k), dtype=torch.int64, device=scores.device)
    is_nan = torch.isnan(scores)
    key = scores.masked_fill(is_nan, float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    if bool(is_nan.any()):
        nan_last = torch.sort(is_nan.gather(-1, order).to(torch.uint8), dim=-1, stable=True).indices
        order = order.gather(-1, nan_last)
    return order[..., :k]


def route(
    logits: torch.Tensor,
    selection_bias: torch.Tensor | None,
    k: int,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`PiMoERoute`: softmax (fp32) -> top-k of (probs + bias) -> weights = probs[ids] (renormalised).

    Args:
        logits: [N, E] float32/float16/bfloat16 router logits (temperature and gate already applied).
        selection_bias: [E] float32 or None. Steers which experts are selected; never enters the weights.
        k: experts per token, 1 <= k <= E.
        normalize: divide the k weights by their sum.

    Returns:
        weights [N, k] float32 and ids [N, k] int32 (always in [0, E), even for NaN/Inf rows, whose
        weights are NaN so the fault stays visible).
    """
    probs = torch.softmax(logits.to(compute_dtype(logits.dtype)), dim=-1)
    scores = probs if selection_bias is None else probs + selection_bias.to(probs.dtype)
    ids = topk_lower_index_wins(scores, k)
    weights = probs.gather(-1, ids)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def dispatch(
    x: torch.Tensor, ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`PiMoEDispatch`: stable counting sort of the N*k (token, slot) pairs by expert id.

    Returns:
        x_sorted [N*k, H] with x_sorted[flat_to_sorted[t*k + j]] = x[t]; pairs of one expert stay in
        flat order t*k + j. offsets [E+1] int32: expert e owns rows offsets[e]:offsets[e+1].
        flat_to_sorted [N*k] int32.
    """
    n, k = ids.shape
    flat = ids.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise PiMoEInputError(
            f"dispatch: expert ids must lie in [0, {num_experts}), found [{int(flat.min())}, "
            f"{int(flat.max())}]; ids come from PiMoERoute with the same num_experts"
        )
    sorted_to_flat = torch.sort(flat, stable=True).indices
    flat_to_sorted = torch.empty_like(sorted_to_flat)
    flat_to_sorted[sorted_to_flat] = torch.arange(flat.numel(), device=flat.device)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    x_sorted = x.index_select(0, torch.div(sorted_to_flat, k, rounding_mode="floor")) if n else x.new_empty(
        (0, x.shape[-1])
    )
    return x_sorted, offsets.to(torch.int32), flat_to_sorted.to(torch.int32)


def combine(y_sorted: torch.Tensor, flat_to_sorted: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`PiMoECombine`: y[t] = sum_j weights[t, j] * y_sorted[flat_to_sorted[t*k + j]].

    A gather, no scatter-add: every output row is written once, the k terms are summed in slot order in
    fp32, so the result is bit-reproducible. Output dtype = y_sorted's dtype.
    """
    n, k = weights.shape
    hidden = y_sorted.shape[-1]
    if n == 0:
        return y_sorted.new_zeros((0, hidden))
    dtype = compute_dtype(y_sorted.dtype)
    gathered = y_sorted.index_select(0, flat_to_sorted.long()).to(dtype).reshape(n, k, hidden)
    w = weights.to(dtype)
    acc = gathered[:, 0] * w[:, 0:1]
    for j in range(1, k):
        acc = acc + gathered[:, j] * w[:, j : j + 1]
    return acc.to(y_sorted.dtype)


def activation_fn(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name == "silu":
        return F.silu(x)
    if name == "tanh":
        return torch.tanh(x)
    raise PiMoEInputError(f"unknown activation {name!r}; expected gelu, gelu_tanh, relu, silu or tanh")


def mlp_rows(
    h: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    ln_gammas: Sequence[torch.Tensor] | None,
    ln_betas: Sequence[torch.Tensor] | None,
    activation: str,
    eps: float,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """One expert on a block of rows: hidden layers Linear -> [LayerNorm] -> activation -> Dropout,
    then the last Linear.

    Math in fp32 whatever the storage dtype (fp16 I/O, fp32 accumulation), result in fp32. Dropout
    acts only when ``training`` (the ops never pass it).
    """
    dtype = compute_dtype(h.dtype)
    h = h.to(dtype)
    last = len(weights) - 1
    for layer, (w, b) in enumerate(zip(weights, biases, strict=True)):
        h = F.linear(h, w.to(dtype), b.to(dtype))
        if layer < last:
            if ln_gammas is not None and ln_betas is not None:
                h = F.layer_norm(h, (h.shape[-1],), ln_gammas[layer].to(dtype), ln_betas[layer].to(dtype), eps)
            h = activation_fn(activation, h)
            if training and dropout > 0.0:
                h = F.dropout(h, dropout, training=True)
    return h


def expert_mlp(
    x_sorted: torch.Tensor,
    offsets: torch.Tensor,
    expert_ids: Sequence[int],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    ln_gammas: Sequence[torch.Tensor] | None,
    ln_betas: Sequence[torch.Tensor] | None,
    activation: str,
    eps: float,
) -> torch.Tensor:
    """`PiMoEExpertMLP` for one group of structurally identical experts.

    Args:
        x_sorted: [R, Hin] rows sorted by expert (output of dispatch).
        offsets: [E+1] segment bounds.
        expert_ids: the G experts of this group; weights[l][g] belongs to expert expert_ids[g].
        weights: per layer [G, out_l, in_l]; biases per layer [G, out_l];
        ln_gammas/ln_betas: per hidden layer [G, out_l] or None (no LayerNorm).

    Returns:
        y_sorted [R, Hout] in x_sorted's dtype; rows of experts outside the group are 0.
    """
    rows = x_sorted.shape[0]
    out_features = weights[-1].shape[1]
    y = torch.zeros((rows, out_features), dtype=compute_dtype(x_sorted.dtype), device=x_sorted.device)
    bounds = offsets.tolist()
    for g, e in enumerate(expert_ids):
        lo, hi = bounds[e], bounds[e + 1]
        if hi <= lo:
            continue
        y[lo:hi] = mlp_rows(
            x_sorted[lo:hi],
            [w[g] for w in weights],
            [b[g] for b in biases],
            None if ln_gammas is None else [p[g] for p in ln_gammas],
            None if ln_betas is None else [p[g] for p in ln_betas],
            activation,
            eps,
        )
    return y.to(x_sorted.dtype)
