"""A slow, obviously-correct PiMoE: one token at a time, plain loops, float64.

Written from the semantics in docs/op_contract.md and the expert stacks documented in
pimoe_export.model.config.expert_widths, not from pimoe_export.model.functional:
it reads the model's parameters but re-implements every computation (Linear, LayerNorm, activations,
softmax, top-k with ties to the lower index and NaN lowest, renormalisation, weighted sum).
"""

from __future__ import annotations

import math

import torch


def _linear(w: torch.Tensor, b: torch.Tensor, v: list[float]) -> list[float]:
    out = []
    for row in range(w.shape[0]):
        acc = float(b[row])
        for col in range(w.shape[1]):
            acc += float(w[row, col]) * v[col]
        out.append(acc)
    return out


def _act(name: str, v: float) -> float:
    if name == "gelu":
        return 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * v * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))
    if name == "relu":
        return max(v, 0.0)
    if name == "silu":
        return v / (1.0 + math.exp(-v))
    if name == "tanh":
        return math.tanh(v)
    raise ValueError(name)


def _layer_norm(v: list[float], gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> list[float]:
    mean = sum(v) / len(v)
    var = sum((a - mean) ** 2 for a in v) / len(v)
    inv = 1.0 / math.sqrt(var + eps)
    return [(a - mean) * inv * float(g) + float(b) for a, g, b in zip(v, gamma, beta, strict=True)]


def expert_forward(expert, v: list[float]) -> list[float]:
    h = v
    n_layers = len(expert.layers)
    for i, layer in enumerate(expert.layers):
        h = _linear(layer.weight.detach().double(), layer.bias.detach().double(), h)
        if i < n_layers - 1:
            if expert.norms is not None:
                norm = expert.norms[i]
                h = _layer_norm(h, norm.weight.detach(), norm.bias.detach(), expert.layer_norm_eps)
            h = [_act(expert.activation, a) for a in h]
    return h


def router_logits(router, v: list[float]) -> list[float]:
    net = router.router_network
    hidden = [max(a, 0.0) for a in _linear(net[0].weight.detach().double(), net[0].bias.detach().double(), v)]
    logits = _linear(net[3].weight.detach().double(), net[3].bias.detach().double(), hidden)
    t = float(router.temperature)
    logits = [a / t for a in logits]
    if router.gate_network is not None:
        g = router.gate_network
        gh = [math.tanh(a) for a in _linear(g[0].weight.detach().double(), g[0].bias.detach().double(), v)]
        gate_logit = _linear(g[2].weight.detach().double(), g[2].bias.detach().double(), gh)[0]
        gate = 1.0 / (1.0 + math.exp(-gate_logit))
        logits = [a * gate for a in logits]
    return logits


def softmax(logits: list[float]) -> list[float]:
    m = max(logits)
    exps = [math.exp(a - m) for a in logits]
    s = sum(exps)
    return [a / s for a in exps]


def select_topk(scores: list[float], k: int) -> list[int]:
    """k times: the best remaining index; ties to the lower index; NaN never beats a number."""
    chosen: list[int] = []
    for _ in range(k):
        best = -1
        for e, sc in enumerate(scores):
            if e in chosen:
                continue
            if best < 0:
                best = e
                continue
            cur = scores[best]
            if (math.isnan(cur) and not math.isnan(sc)) or (not math.isnan(sc) and sc > cur):
                best = e
        chosen.append(best)
    return chosen


def route_token(logits: list[float], bias: list[float], k: int, normalize: bool) -> tuple[list[int], list[float]]:
    probs = softmax(logits)
    ids = select_topk([p + b for p, b in zip(probs, bias, strict=True)], k)
    weights = [probs[e] for e in ids]
    if normalize:
        s = sum(weights)
        weights = [w / s for w in weights]
    return ids, weights


def oracle_forward(model, x: torch.Tensor, mask: torch.Tensor | None = None):
    """Returns (y [B,S,H] float64, ids [B,S,k] with -1 for masked tokens)."""
    cfg = model.config
    b, s, h = x.shape
    y = torch.zeros(b, s, h, dtype=torch.float64)
    all_ids = torch.full((b, s, cfg.top_k), -1, dtype=torch.int64)
    bias = [float(v) for v in model.router.selection_bias]
    for bi in range(b):
        for si in range(s):
            if mask is not None and mask[bi, si] == 0:
                continue
            v = [float(a) for a in x[bi, si].double()]
            ids, weights = route_token(router_logits(model.router, v), bias, cfg.top_k, bool(cfg.normalize))
            acc = [0.0] * h
            for e, w in zip(ids, weights, strict=True):
                out = expert_forward(model.experts[e], v)
                acc = [a + w * o for a, o in zip(acc, out, strict=True)]
            y[bi, si] = torch.tensor(acc, dtype=torch.float64)
            all_ids[bi, si] = torch.tensor(ids)
    return y, all_ids


# ------------------------------------------------------------------------------------------ op contract v2
def sigmoid(v: float) -> float:
    if math.isnan(v):
        return v
    return 1.0 / (1.0 + math.exp(-v)) if v >= -700 else 0.0


def _better(a: float, b: float) -> bool:
    """a ranks before b (same index order assumed): a number beats NaN; larger beats smaller."""
    return (math.isnan(b) and not math.isnan(a)) or (not math.isnan(a) and not math.isnan(b) and a > b)


def route_token_v2(logits: list[float], bias: list[float] | None, k: int, normalize: bool, scoring: str = "softmax",
                   num_groups: int = 1, groups_kept: int = 1, group_score: str = "max", scaling: float = 1.0,
                   eps: float = 0.0) -> tuple[list[int], list[float]]:
    """One token through PiMoERoute, written from docs/op_contract.md with loops (float64)."""
    e = len(logits)
    b = bias if bias is not None else [0.0] * e
    if scoring == "softmax":
        source = softmax(logits) if not any(math.isnan(v) or v == math.inf for v in logits) else [math.nan] * e
        keys = [p + bb for p, bb in zip(source, b, strict=True)]
    elif scoring == "sigmoid":
        source = [sigmoid(v) for v in logits]
        # without a bias (and groups) the logits are ranked: sigmoid's order without its saturation ties
        keys = list(logits) if bias is None and num_groups == 1 else [s + bb for s, bb in zip(source, b, strict=True)]
    else:  # softmax_topk
        source = []
        keys = [v + bb for v, bb in zip(logits, b, strict=True)]
    if num_groups > 1:
        size = e // num_groups
        scores = []
        for g in range(num_groups):
            members = keys[g * size:(g + 1) * size]
            best = select_topk(members, 2 if group_score == "sum_top2" else 1)
            scores.append(sum(members[i] for i in best))
        kept = select_topk(scores, groups_kept)
        for j in range(e):
            if j // size not in kept:
                keys[j] = 0.0
                if scoring == "softmax":
                    source[j] = 0.0
    ids = select_topk(keys, k)
    if scoring == "softmax_topk":
        chosen = [logits[i] for i in ids]
        weights = softmax(chosen) if not any(math.isnan(v) for v in chosen) else [math.nan] * k
    else:
        weights = [source[i] for i in ids]
    if normalize:
        total = sum(weights) + eps
        weights = [w / total for w in weights]
    return ids, [w * scaling for w in weights]


def swiglu_oai(gate: float, up: float, alpha: float, limit: float) -> float:
    g = gate if math.isnan(gate) else min(gate, limit)
    u = up if math.isnan(up) else max(-limit, min(up, limit))
    return (u + 1.0) * g * sigmoid(alpha * g)


def glu_expert(w0, b0, w1, b1, v: list[float], activation: str, alpha: float = 1.702, limit: float = 7.0):
    """A two-layer gated expert: w0 [2I, H] rows [gate; up], h = act(gate) * up, then w1 [H, I] (b: None or bias)."""
    inter = w0.shape[0] // 2
    z = _linear(w0, b0 if b0 is not None else torch.zeros(w0.shape[0], dtype=torch.float64), v)
    if activation == "swiglu_oai":
        h = [swiglu_oai(z[i], z[inter + i], alpha, limit) for i in range(inter)]
    else:
        h = [_act(activation, z[i]) * z[inter + i] for i in range(inter)]
    return _linear(w1, b1 if b1 is not None else torch.zeros(w1.shape[0], dtype=torch.float64), h)
