"""Op contract v2 in the PyTorch reference (pimoe_export.model.functional) against known answers and the slow loop
oracle of tests/oracle.py: routing modes, groups, ties, NaN, the clamp of swiglu_oai, the combine orders, and the
weight-layout conversions of pimoe_export.model.layouts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import glu_expert, route_token_v2, sigmoid, swiglu_oai

import pimoe_export.ops.torch_ops  # noqa: F401
from pimoe_export.errors import PiMoEInputError
from pimoe_export.model import functional, layouts


def route(logits, bias=None, k=2, normalize=False, **kw):
    t_bias = None if bias is None else torch.tensor(bias, dtype=torch.float32)
    w, ids = functional.route(torch.tensor([logits], dtype=torch.float32), t_bias, k, normalize, **kw)
    return ids[0].tolist(), w[0].tolist()


# ------------------------------------------------------------------------------------------ route: known answers
def test_softmax_topk_ranks_logits_plus_bias_and_softmaxes_the_k_unbiased_logits() -> None:
    ids, w = route([1.0, 3.0, 3.0, 2.0], k=2, scoring="softmax_topk")
    assert ids == [1, 2]  # a tie: the lower index first
    assert w == pytest.approx([0.5, 0.5])
    ids, w = route([1.0, 3.0, 2.5, 2.0], bias=[0.0, 0.0, 0.0, 1.5], k=2, scoring="softmax_topk")
    assert ids == [3, 1]  # 2 + 1.5 beats 3; the weights use the unbiased logits 2 and 3
    assert w == pytest.approx([1 / (1 + math.e), math.e / (1 + math.e)])


def test_sigmoid_without_bias_ranks_the_logits_where_fp32_sigmoid_saturates() -> None:
    logits = [20.0, 30.0, 17.5, 25.0]
    assert all(torch.sigmoid(torch.tensor(logits)) == 1.0)  # every sigma is exactly 1 in fp32: four-way tie
    ids, w = route(logits, k=2, scoring="sigmoid")
    assert ids == [1, 3] and w == [1.0, 1.0]  # ranked by logit
    ids, _ = route(logits, bias=[0.0] * 4, k=2, scoring="sigmoid")
    assert ids == [0, 1]  # with a bias the keys are sigma + b: tied, lower index first (DeepSeek-V3's ranking)


def test_group_score_max_and_sum_of_top2_keep_different_groups() -> None:
    keys = [0.9, 0.0, 0.6, 0.55, 0.7, 0.1, 0.5, 0.45]  # sigma(0) = 0.5 plus a bias sets every key
    bias = [k - 0.5 for k in keys]
    ids, w = route([0.0] * 8, bias, k=2, scoring="sigmoid", num_groups=4, groups_kept=2, group_score="max")
    assert ids == [0, 4] and w == [0.5, 0.5]  # groups 0 (max 0.9) and 2 (0.7)
    ids, _ = route([0.0] * 8, bias, k=3, scoring="sigmoid", num_groups=4, groups_kept=2, group_score="max")
    assert ids == [0, 4, 5]  # 0.1 in a kept group beats every expert of the other groups (masked to 0)
    ids, _ = route([0.0] * 8, bias, k=2, scoring="sigmoid", num_groups=4, groups_kept=2, group_score="sum_top2")
    assert ids == [2, 3]  # groups 1 (0.6 + 0.55) and 3 (0.95): not group 0 (0.9 + 0.0)


def test_experts_of_dropped_groups_score_zero_not_minus_infinity() -> None:
    """DeepSeek's masked_fill(..., 0.0): a kept expert whose biased key is negative loses to a dropped one."""
    bias = [-0.7, -0.8, -1.0, -1.1]  # keys 0.5 + b: -0.2, -0.3 (group 0, kept), -0.5, -0.6 (group 1)
    ids, w = route([0.0] * 4, bias, k=2, scoring="sigmoid", num_groups=2, groups_kept=1)
    assert ids == [2, 3]  # both masked to 0.0 (tied: lower index), above -0.2
    assert w == [0.5, 0.5]  # sigmoid weights come from the unmasked scores (DeepSeek-V3's gather)
    ids, w = route([5.0, 4.0, 0.0, 0.0, 1.0, 0.0], None, k=3, scoring="softmax", num_groups=3, groups_kept=2)
    assert ids == [0, 1, 4] and w[2] > 0  # groups 0 and 2 kept (max 5 and 1)
    ids, w = route([0.0, 0.0, 100.0, -100.0], None, k=2, scoring="softmax", num_groups=2, groups_kept=1)
    # group 1 kept; its second expert's probability underflows to 0, which ties with the dropped experts' 0: the
    # lower index wins, a dropped expert, whose softmax weight comes from the masked scores (DeepSeek-V2's
    # tmp_scores): 0, not its probability exp(-100) ~ 4e-44
    assert ids == [2, 0] and w[1] == 0.0
    assert torch.softmax(torch.tensor([0.0, 0.0, 100.0, -100.0]), -1)[0] > 0
    with pytest.raises(PiMoEInputError, match="kept groups"):  # k beyond the kept groups' experts: refused
        route([5.0, 4.0, 3.0, 0.0, 1.0, 0.0], None, k=3, scoring="softmax", num_groups=3, groups_kept=1)


def test_normalize_eps_and_routed_scaling_factor() -> None:
    ids, w = route([-60.0, -61.0, -90.0], k=2, normalize=True, scoring="sigmoid", normalize_eps=1e-20,
                   routed_scaling_factor=2.5)
    s0, s1 = sigmoid(-60.0), sigmoid(-61.0)  # ~1e-26: the 1e-20 dominates the denominator (DeepSeek-V3)
    assert ids == [0, 1]
    assert w == pytest.approx([s0 / (s0 + s1 + 1e-20) * 2.5, s1 / (s0 + s1 + 1e-20) * 2.5], rel=1e-5)
    _, w = route([-60.0, -61.0, -90.0], k=2, normalize=True, scoring="sigmoid")
    assert w == pytest.approx([s0 / (s0 + s1), s1 / (s0 + s1)], rel=1e-5)


def test_nan_ranks_lowest_in_every_mode() -> None:
    nan = float("nan")
    ids, w = route([nan, 1.0, 2.0, 0.0], k=2, scoring="sigmoid")
    assert ids == [2, 1] and w == pytest.approx([sigmoid(2.0), sigmoid(1.0)])
    ids, w = route([nan, 1.0, 2.0, 0.0], k=2, scoring="softmax_topk")
    assert ids == [2, 1] and not any(math.isnan(v) for v in w)
    ids, w = route([nan, nan, nan, 0.0], k=2, scoring="softmax_topk")
    assert ids == [3, 0] and all(math.isnan(v) for v in w)  # a NaN among the k: the softmax is NaN
    ids, w = route([nan, 1.0, 2.0, 0.0], k=2, scoring="softmax")
    assert ids == [0, 1] and all(math.isnan(v) for v in w)  # v1: a NaN makes the whole softmax row NaN
    ids, _ = route([nan, 1.0, 2.0, 0.0, -1.0, 3.0], [0.0] * 6, k=2, scoring="sigmoid", num_groups=3,
                   groups_kept=1)
    assert ids == [5, 4]  # group 0's NaN key ranks lowest inside it; group 2 (max 3) is kept


def test_route_refuses_inconsistent_groups() -> None:
    with pytest.raises(PiMoEInputError, match="divide"):
        route([0.0] * 6, k=1, num_groups=4)
    with pytest.raises(PiMoEInputError, match="groups_kept"):
        route([0.0] * 4, k=1, num_groups=2, groups_kept=3)
    with pytest.raises(PiMoEInputError, match="at least 2"):
        route([0.0] * 4, k=1, num_groups=4, group_score="sum_top2")
    with pytest.raises(PiMoEInputError, match="softmax_topk"):
        route([0.0] * 4, k=1, num_groups=2, scoring="softmax_topk")


# ------------------------------------------------------------------------------------------ route: the oracle
@st.composite
def route_cases(draw):
    scoring = draw(st.sampled_from(["softmax", "softmax_topk", "sigmoid"]))
    groups = 1 if scoring == "softmax_topk" else draw(st.sampled_from([1, 2, 4]))
    size = draw(st.integers(2 if groups > 1 else 1, 6))
    e = groups * size
    kept = draw(st.integers(1, groups))
    k = draw(st.integers(1, min(e, kept * size, 8)))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    logits = (rng.normal(0, 2, size=e)).tolist()
    bias = rng.normal(0, 0.3, size=e).tolist() if draw(st.booleans()) else None
    return dict(logits=logits, bias=bias, k=k, normalize=draw(st.booleans()), scoring=scoring, num_groups=groups,
                groups_kept=kept, group_score=draw(st.sampled_from(["max", "sum_top2"])) if size > 1 else "max",
                routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
                normalize_eps=draw(st.sampled_from([0.0, 1e-20])))


@settings(max_examples=300, deadline=None)
@given(case=route_cases())
def test_route_matches_the_loop_oracle(case) -> None:
    want_ids, want_w = route_token_v2(case["logits"], case["bias"], case["k"], case["normalize"], case["scoring"],
                                      case["num_groups"], case["groups_kept"], case["group_score"],
                                      case["routed_scaling_factor"], case["normalize_eps"])
    ids, w = route(**case)
    assert ids == want_ids  # normal(0, 2) logits in fp32: no ties, no near ties at this size
    assert w == pytest.approx(want_w, rel=2e-6, abs=1e-7)


# ------------------------------------------------------------------------------------------ gated experts
def _identity_glu(x: list[list[float]], activation: str, alpha: float = 1.702, limit: float = 7.0) -> list[float]:
    """A [2 -> 1 -> 1] gated expert whose gate is x[0] and up x[1] (identity rows), output = h."""
    w0 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    w1 = torch.tensor([[[1.0]]])
    xs = torch.tensor(x, dtype=torch.float32)
    y = torch.ops.pimoe.expert_mlp(xs, torch.tensor([0, len(x)], dtype=torch.int32), [w0, w1], [0], [2, 1, 1],
                                   activation, False, 1e-5, "none", [], gated=True, bias=False, alpha=alpha,
                                   limit=limit)
    return y[:, 0].tolist()


def test_swiglu_oai_clamps_gate_above_and_up_both_sides() -> None:
    a = 1.702
    rows = [[10.0, -9.0], [-3.0, 2.0], [7.0, 7.0], [-20.0, 20.0], [3.0, -0.5]]
    got = _identity_glu(rows, "swiglu_oai")
    want = [-6.0 * 7.0 * sigmoid(a * 7.0),  # gate 10 -> 7, up -9 -> -7
            3.0 * -3.0 * sigmoid(-3.0 * a),  # gate below the limit stays; up in range
            8.0 * 7.0 * sigmoid(a * 7.0),  # exactly at the limits
            8.0 * -20.0 * sigmoid(-20.0 * a),  # the gate has no lower clamp; up 20 -> 7
            0.5 * 3.0 * sigmoid(3.0 * a)]
    assert got == pytest.approx(want, rel=1e-6)
    assert _identity_glu([[10.0, -9.0]], "swiglu_oai", alpha=1.0, limit=2.0) == pytest.approx(
        [-1.0 * 2.0 * sigmoid(2.0)], rel=1e-6)
    assert math.isnan(_identity_glu([[float("nan"), 1.0]], "swiglu_oai")[0])  # clamp keeps NaN (torch.clamp)
    assert math.isnan(_identity_glu([[1.0, float("nan")]], "swiglu_oai")[0])


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu", "tanh", "swiglu_oai"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gated_expert_matches_the_loop_oracle(activation, with_bias) -> None:
    rng = np.random.default_rng(3)
    h, inter, e = 6, 5, 3
    w0 = torch.tensor(rng.normal(0, 1.5, size=(e, 2 * inter, h)), dtype=torch.float32)
    w1 = torch.tensor(rng.normal(0, 0.5, size=(e, h, inter)), dtype=torch.float32)
    b0 = torch.tensor(rng.normal(0, 1, size=(e, 2 * inter)), dtype=torch.float32)
    b1 = torch.tensor(rng.normal(0, 1, size=(e, h)), dtype=torch.float32)
    offsets = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    x = torch.tensor(rng.normal(0, 2, size=(7, h)), dtype=torch.float32)
    params = [w0, b0, w1, b1] if with_bias else [w0, w1]
    y = torch.ops.pimoe.expert_mlp(x, offsets, params, [0, 1, 2], [h, inter, h], activation, False, 1e-5, "none", [],
                                   gated=True, bias=with_bias)
    for row in range(7):
        g = 0 if row < 3 else 2
        want = glu_expert(w0[g].double(), b0[g].double() if with_bias else None, w1[g].double(),
                          b1[g].double() if with_bias else None, x[row].double().tolist(), activation)
        assert y[row].tolist() == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_gated_expert_refuses_what_the_contract_refuses() -> None:
    with pytest.raises(PiMoEInputError, match="gated layers only"):
        functional.activation_fn("swiglu_oai", torch.zeros(2))


# ------------------------------------------------------------------------------------------ combine orders
def test_combine_orders_known_answers() -> None:
    rows = torch.tensor([[1.0], [1e8], [-1e8]])  # sorted rows (ascending expert id)
    f2s = torch.tensor([1, 2, 0], dtype=torch.int32)  # slots 0, 1, 2 read rows 1, 2, 0
    w = torch.ones((1, 3))
    assert functional.combine(rows, f2s, w, "slot").item() == 1.0  # (1e8 + -1e8) + 1
    assert functional.combine(rows, f2s, w, "expert").item() == 0.0  # ((0 + 1) + 1e8) + -1e8: 1 is absorbed
    zeros = torch.tensor([[-0.0], [-0.0]])
    f2s = torch.tensor([0, 1], dtype=torch.int32)
    slot = functional.combine(zeros, f2s, torch.ones((1, 2)), "slot")
    expert = functional.combine(zeros, f2s, torch.ones((1, 2)), "expert")
    assert math.copysign(1.0, slot.item()) == -1.0  # -0 + -0
    assert math.copysign(1.0, expert.item()) == 1.0  # index_add_ into zeros: 0 + -0 = +0


def test_expert_order_is_hugging_faces_index_add_loop_bit_for_bit() -> None:
    """The Mixtral/Qwen/OLMoE/DeepSeek-V3/GPT-OSS combine: zeros, then per expert e ascending
    ``final.index_add_(0, tokens_of_e, expert_out * weight)``."""
    gen = torch.Generator().manual_seed(5)
    n, k, e, h = 40, 6, 12, 33
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)]).to(torch.int32)
    weights = torch.rand((n, k), generator=gen)
    x = torch.randn((n, h), generator=gen)
    f2s = functional.dispatch(x, ids, e)[2]
    y_sorted = torch.randn((n * k, h), generator=gen) * 100
    want = torch.zeros((n, h))
    for expert in range(e):
        token, slot = torch.where(ids == expert)
        out = y_sorted[f2s.long().reshape(n, k)[token, slot]]
        want.index_add_(0, token, out * weights[token, slot, None])
    got = functional.combine(y_sorted, f2s, weights, "expert")
    assert torch.equal(got, want)
    assert not torch.equal(functional.combine(y_sorted, f2s, weights, "slot"), want)  # the order matters here


# ------------------------------------------------------------------------------------------ layouts
def test_layout_conversions_are_exact_rearrangements() -> None:
    gate = torch.arange(6.0).reshape(3, 2)
    up = torch.arange(6.0, 12.0).reshape(3, 2)
    fused = layouts.glu_rows_from_separate(gate, up)
    assert torch.equal(fused, torch.cat([gate, up]))
    assert torch.equal(layouts.glu_rows_from_halves(fused), fused)
    interleaved = torch.stack([gate, up], dim=1).reshape(6, 2)  # rows g0, u0, g1, u1, g2, u2
    assert torch.equal(layouts.glu_rows_from_interleaved(interleaved), fused)
    assert torch.equal(layouts.glu_bias_from_interleaved(torch.tensor([0.0, 10, 1, 11, 2, 12])),
                       torch.tensor([0.0, 1, 2, 10, 11, 12]))
    assert torch.equal(layouts.glu_bias_from_separate(torch.tensor([1.0]), torch.tensor([2.0])), torch.tensor([1.0, 2]))
    stacked = layouts.stack_experts([fused, fused + 100])
    assert stacked.shape == (2, 6, 2) and torch.equal(stacked[1], fused + 100)
    flat = torch.arange(24.0).reshape(12, 2)  # DBRX: [E * rows, cols]
    assert torch.equal(layouts.unflatten_experts(flat, 3)[2], flat[8:12])
    x_at_w = torch.arange(12.0).reshape(2, 3, 2)  # [E, in, out], applied as x @ W
    linear = layouts.transpose_experts(x_at_w)
    v = torch.tensor([1.0, -2.0, 0.5])
    assert torch.equal(torch.nn.functional.linear(v, linear[1]), v @ x_at_w[1]) and linear.is_contiguous()
    # GPT-OSS's gate_up_proj [E, H, 2I]: transposed, then de-interleaved, gives act(x @ W[:, ::2]) * (x @ W[:, 1::2])
    w = torch.randint(-9, 10, (2, 4, 6)).float()  # small integers: every product and sum is exact
    rows = layouts.glu_rows_from_interleaved(layouts.transpose_experts(w))
    xv = torch.randint(-9, 10, (5, 4)).float()
    z = torch.nn.functional.linear(xv, rows[0])
    assert torch.equal(z[:, :3], xv @ w[0][:, ::2]) and torch.equal(z[:, 3:], xv @ w[0][:, 1::2])


def test_layout_conversions_refuse_malformed_tensors() -> None:
    with pytest.raises(PiMoEInputError, match="even"):
        layouts.glu_rows_from_interleaved(torch.zeros(5, 2))
    with pytest.raises(PiMoEInputError, match="even"):
        layouts.glu_rows_from_halves(torch.zeros(3, 2))
    with pytest.raises(PiMoEInputError, match="shape"):
        layouts.glu_rows_from_separate(torch.zeros(3, 2), torch.zeros(2, 2))
    with pytest.raises(PiMoEInputError, match="E=5"):
        layouts.unflatten_experts(torch.zeros(12, 2), 5)
    with pytest.raises(PiMoEInputError, match="differ"):
        layouts.stack_experts([torch.zeros(2, 2), torch.zeros(3, 2)])


def test_swiglu_oai_oracle_itself() -> None:
    assert swiglu_oai(10.0, -9.0, 1.702, 7.0) == pytest.approx(-6.0 * 7.0 / (1 + math.exp(-1.702 * 7.0)))
