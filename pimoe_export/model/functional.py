"""Reference semantics of the four PiMoE ops, in plain PyTorch.

These functions are THE definition of op contract v2 (docs/op_contract.md): the PyTorch model calls
them, the torch custom ops in :mod:`pimoe_export.ops` wrap them, and every kernel (ORT C++, CUDA) is
tested against them. They are vectorised (no per-token Python loops) and deterministic. Every argument that v2
added defaults to the v1 behaviour, computed by the v1 code path (bit for bit what v1 computed).

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
    scoring: str = "softmax",
    num_groups: int = 1,
    groups_kept: int = 1,
    group_score: str = "max",
    routed_scaling_factor: float = 1.0,
    normalize_eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`PiMoERoute`: fp32 selection scores -> [grouped selection] -> top-k -> weights.

    Selection scores (keys) and weight sources per ``scoring`` (b = selection_bias, 0 when None):

    - ``softmax`` (v1): p = softmax(logits); keys = p + b; weights = p[ids].
    - ``softmax_topk``: keys = logits + b; weights = softmax(logits[ids]) over the k (in rank order).
    - ``sigmoid``: s = sigmoid(logits); keys = s + b; weights = s[ids]. Without a bias (and without groups) the keys
      are the logits themselves: the same order as s, but fp32 sigmoid saturates (s = 1 from logit ~16.6 on), which
      would tie distinct logits.

    Grouped selection (``num_groups`` > 1, softmax or sigmoid scoring): the E experts form num_groups groups of
    consecutive ids; a group scores the max of its keys (``group_score="max"``) or the sum of its best two
    (``"sum_top2"``); the ``groups_kept`` best groups keep their keys, every other expert's key becomes 0 (DeepSeek's
    ``masked_fill(..., 0.0)``), and with softmax scoring its weight source too (DeepSeek-V2 gathers the weights from
    the masked scores; V3 gathers sigmoid from the unmasked ones).

    Top-k (of the keys, and of the group scores): larger first, ties to the lower index, NaN ranked below every
    number. Then weights /= (sum + normalize_eps) when ``normalize``, and weights *= routed_scaling_factor.

    Args:
        logits: [N, E] float32/float16/bfloat16 router logits (temperature and gate already applied).
        selection_bias: [E] float32 or None. Steers which experts are selected; never enters the weights.
        k: experts per token, 1 <= k <= E (and k <= groups_kept * E / num_groups).

    Returns:
        weights [N, k] float32 and ids [N, k] int32 (always in [0, E), even for NaN/Inf rows, whose
        weights are NaN so the fault stays visible).
    """
    values = logits.to(compute_dtype(logits.dtype))
    bias = None if selection_bias is None else selection_bias.to(values.dtype)
    source: torch.Tensor | None
    if scoring == "softmax":
        source = torch.softmax(values, dim=-1)
        keys = source if bias is None else source + bias
    elif scoring == "sigmoid":
        source = torch.sigmoid(values)
        keys = source + bias if bias is not None else source if num_groups > 1 else values
    elif scoring == "softmax_topk":
        if num_groups > 1:
            raise PiMoEInputError("route: grouped selection needs scoring softmax or sigmoid, not softmax_topk")
        source, keys = None, values if bias is None else values + bias
    else:
        raise PiMoEInputError(f"route: unknown scoring {scoring!r}; expected one of softmax, softmax_topk, sigmoid")
    if num_groups > 1:
        kept = kept_group_mask(keys, num_groups, groups_kept, group_score)
        if k > groups_kept * (keys.shape[-1] // num_groups):
            raise PiMoEInputError(f"route: k={k} exceeds the experts of the kept groups, groups_kept * E/num_groups = "
                                  f"{groups_kept * (keys.shape[-1] // num_groups)}")
        keys = keys.masked_fill(~kept, 0.0)
        if scoring == "softmax" and source is not None:
            source = source.masked_fill(~kept, 0.0)
    ids = topk_lower_index_wins(keys, k)
    weights = torch.softmax(values.gather(-1, ids), dim=-1) if source is None else source.gather(-1, ids)
    if normalize:
        total = weights.sum(dim=-1, keepdim=True)
        weights = weights / (total + normalize_eps if normalize_eps else total)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights, ids.to(torch.int32)


def kept_group_mask(keys: torch.Tensor, num_groups: int, groups_kept: int, group_score: str) -> torch.Tensor:
    """[N, E] bool: the experts of the ``groups_kept`` best of ``num_groups`` groups of consecutive experts.

    A group's score is its best key (``max``) or the sum of its two best (``sum_top2``), best by the top-k order
    (NaN below every number, so a NaN key counts only in a group with fewer numbers than it needs); the kept groups
    are the top ``groups_kept`` group scores, ties to the lower group, NaN lowest.
    """
    n, e = keys.shape
    if num_groups < 1 or e % num_groups:
        raise PiMoEInputError(f"route: num_groups={num_groups} must divide the number of experts E={e}")
    if not 1 <= groups_kept <= num_groups:
        raise PiMoEInputError(f"route: groups_kept={groups_kept} must be in [1, num_groups={num_groups}]")
    size = e // num_groups
    grouped = keys.reshape(n, num_groups, size)
    best = grouped.gather(-1, topk_lower_index_wins(grouped, min(2, size)))
    if group_score == "max":
        scores = best[..., 0]
    elif group_score == "sum_top2":
        if size < 2:
            raise PiMoEInputError(f"route: group_score sum_top2 needs groups of at least 2 experts, got E/num_groups="
                                  f"{size}")
        scores = best[..., 0] + best[..., 1]
    else:
        raise PiMoEInputError(f"route: unknown group_score {group_score!r}; expected max or sum_top2")
    kept = torch.zeros((n, num_groups), dtype=torch.bool, device=keys.device)
    if n:
        kept.scatter_(1, topk_lower_index_wins(scores, groups_kept), True)
    return kept.repeat_interleave(size, dim=1)


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


def combine(y_sorted: torch.Tensor, flat_to_sorted: torch.Tensor, weights: torch.Tensor,
            order: str = "slot") -> torch.Tensor:
    """`PiMoECombine`: y[t] = sum_j weights[t, j] * y_sorted[flat_to_sorted[t*k + j]].

    A gather, no scatter-add: every output row is written once, the k products (each one fp32 multiply) are summed
    in fp32 in a fixed order, so the result is bit-reproducible. Output dtype = y_sorted's dtype.

    - ``order="slot"`` (v1): acc = w_0 * y_0, then acc = acc + w_j * y_j for j = 1..k-1.
    - ``order="expert"``: acc = 0, then acc = acc + w_j * y_j for the slots by ascending sorted row, which is
      ascending expert id (dispatch sorts rows by expert): exactly Hugging Face's ``zeros.index_add_`` loop over the
      experts, so fp32 results can be bit-identical to it.
    """
    n, k = weights.shape
    hidden = y_sorted.shape[-1]
    if order not in ("slot", "expert"):
        raise PiMoEInputError(f"combine: unknown order {order!r}; expected slot or expert")
    if n == 0:
        return y_sorted.new_zeros((0, hidden))
    dtype = compute_dtype(y_sorted.dtype)
    rows = flat_to_sorted.long().reshape(n, k)
    w = weights.to(dtype)
    if order == "expert":
        rows, slots = torch.sort(rows, dim=-1)
        w = w.gather(-1, slots)
    gathered = y_sorted.index_select(0, rows.reshape(-1)).to(dtype).reshape(n, k, hidden)
    if order == "expert":
        acc = torch.zeros((n, hidden), dtype=dtype, device=y_sorted.device)
        for j in range(k):
            acc = acc + gathered[:, j] * w[:, j : j + 1]
        return acc.to(y_sorted.dtype)
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
    raise PiMoEInputError(f"unknown activation {name!r}; expected gelu, gelu_tanh, relu, silu or tanh"
                          + (" (swiglu_oai: gated layers only)" if name == "swiglu_oai" else ""))


def glu(z: torch.Tensor, activation: str, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """A gated layer's output from its pre-activation rows z = [gate | up] (last dim 2*out): act(gate) * up.

    ``swiglu_oai`` is GPT-OSS's clamped SwiGLU, in its operation order: g = gate.clamp(max=limit),
    u = up.clamp(-limit, limit), h = (u + 1) * (g * sigmoid(g * alpha)).
    """
    gate, up = (half.contiguous() for half in z.chunk(2, dim=-1))  # torch's strided elementwise path rounds apart
    if activation == "swiglu_oai":
        g = gate.clamp(max=limit)
        u = up.clamp(min=-limit, max=limit)
        return (u + 1) * (g * torch.sigmoid(g * alpha))
    return activation_fn(activation, gate) * up


def mlp_rows(
    h: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor] | None,
    ln_gammas: Sequence[torch.Tensor] | None,
    ln_betas: Sequence[torch.Tensor] | None,
    activation: str,
    eps: float,
    dropout: float = 0.0,
    training: bool = False,
    gated: bool = False,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> torch.Tensor:
    """One expert on a block of rows: hidden layers Linear -> [LayerNorm] -> activation -> Dropout,
    then the last Linear. With ``gated`` every hidden layer is a GLU (:func:`glu`) over its rows [gate; up].
    ``biases`` None: bias-free layers.

    Math in fp32 whatever the storage dtype (fp16 I/O, fp32 accumulation), result in fp32. Dropout
    acts only when ``training`` (the ops never pass it).
    """
    dtype = compute_dtype(h.dtype)
    h = h.to(dtype)
    last = len(weights) - 1
    for layer, w in enumerate(weights):
        b = None if biases is None else biases[layer].to(dtype)
        h = F.linear(h, w.to(dtype), b)
        if layer < last:
            if gated:
                h = glu(h, activation, alpha, limit)
                continue
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
    biases: Sequence[torch.Tensor] | None,
    ln_gammas: Sequence[torch.Tensor] | None,
    ln_betas: Sequence[torch.Tensor] | None,
    activation: str,
    eps: float,
    gated: bool = False,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> torch.Tensor:
    """`PiMoEExpertMLP` for one group of structurally identical experts.

    Args:
        x_sorted: [R, Hin] rows sorted by expert (output of dispatch).
        offsets: [E+1] segment bounds.
        expert_ids: the G experts of this group; weights[l][g] belongs to expert expert_ids[g].
        weights: per layer [G, rows_l, in_l] (rows_l = 2*out_l for a gated hidden layer: [gate; up]);
        biases: per layer [G, rows_l], or None (bias-free layers);
        ln_gammas/ln_betas: per hidden layer [G, out_l] or None (no LayerNorm).
        gated, alpha, limit: GLU hidden layers (:func:`glu`).

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
            None if biases is None else [b[g] for b in biases],
            None if ln_gammas is None else [p[g] for p in ln_gammas],
            None if ln_betas is None else [p[g] for p in ln_betas],
            activation,
            eps,
            gated=gated,
            alpha=alpha,
            limit=limit,
        )
    return y.to(x_sorted.dtype)
