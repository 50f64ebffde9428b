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
