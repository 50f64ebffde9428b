"""MoEBlockConfig (the gated/sigmoid/grouped block every Hugging Face family imports into) at the exact edges of
every range it checks: the last value accepted, the first refused, and the field each refusal names. Expected values
come from the op contract (docs/op_contract.md: E <= 1024, k <= min(E, 16), groups dividing E) and the docstrings
(routed_scaling_factor > 0, normalize_eps >= 0, limit > 0, alpha any finite number); the error must name the field
a user has to change, spelled as in the config."""

from __future__ import annotations

import math

import pytest

from pimoe_export.errors import PiMoEConfigError
from pimoe_export.model.moe_block import ExpertsConfig, MoEBlockConfig

BASE = {"hidden_size": 8, "num_experts": 4, "top_k": 2, "experts": ExpertsConfig(intermediate_size=4)}


def block(**fields) -> MoEBlockConfig:
    return MoEBlockConfig(**{**BASE, **fields})


def refused(field: str, fragment: str, **fields) -> str:
    with pytest.raises(PiMoEConfigError) as info:
        block(**fields)
    assert info.value.field == field, (info.value.field, str(info.value))
    assert str(info.value).startswith(f"PiMoEConfig.{field}: "), str(info.value)
    assert fragment in str(info.value), str(info.value)
    return str(info.value)


@pytest.mark.parametrize(("field", "accepted", "refused_values", "fragment"), [
    ("hidden_size", [1], [0, -1], "must be an int in >= 1"),
    ("num_experts", [1, 1024], [0, 1025], "must be an int in [1, 1024]"),
    ("num_groups", [1, 2, 4], [0], "must be an int in [1, 1024]"),
    ("max_group_weights", [257, 2**31], [0, 2**31 + 1], "must be an int in [1, 2147483648]"),
])
def test_each_integer_at_the_edges_of_its_range(field, accepted, refused_values, fragment) -> None:
    for value in accepted:
        extra = {"top_k": 1} if field in ("num_experts", "num_groups") else {}
        assert getattr(block(**{field: value, **extra}), field) == value
    for value in refused_values:
        extra = {"top_k": 1} if field in ("num_experts", "num_groups") else {}
        refused(field, fragment, **{field: value, **extra})


@pytest.mark.parametrize(("experts", "k_max"), [(1, 1), (4, 4), (16, 16), (17, 16)])
def test_top_k_goes_up_to_the_smaller_of_e_and_16(experts, k_max) -> None:
    assert block(num_experts=experts, top_k=k_max).top_k == k_max
    refused("top_k", f"must be an int in [1, {k_max}], got {k_max + 1}", num_experts=experts, top_k=k_max + 1)
    refused("top_k", f"must be an int in [1, {k_max}], got 0", num_experts=experts, top_k=0)


@pytest.mark.parametrize("field", ["hidden_size", "num_experts", "top_k", "num_groups", "groups_kept",
                                   "max_group_weights"])
@pytest.mark.parametrize("value", [True, 2.0, "2"])
def test_integers_of_another_type_are_refused_naming_the_field(field, value) -> None:
    # True is an int to Python (True == 1, in range everywhere): a config field set to true is still refused
    refused(field, f"got {value!r}", **{field: value})


def test_scaling_factor_must_be_positive_and_finite() -> None:
    assert block(routed_scaling_factor=1e-9).routed_scaling_factor == 1e-9
    assert block(routed_scaling_factor=2.5).routed_scaling_factor == 2.5
    for value in (0.0, -1.0, math.inf, math.nan, True, "1"):
        refused("routed_scaling_factor", f"must be a finite number > 0.0, got {value!r}", routed_scaling_factor=value)


def test_normalize_eps_may_be_zero_but_not_negative() -> None:
    assert block(normalize_eps=0.0).normalize_eps == 0.0
    assert block(normalize_eps=1e-20).normalize_eps == 1e-20
    for value in (-1e-12, math.nan, math.inf):
        refused("normalize_eps", f"must be a finite number >= 0.0, got {value!r}", normalize_eps=value)


def test_swiglu_limit_must_be_positive_and_alpha_any_finite_number() -> None:
    def experts(**fields) -> ExpertsConfig:
        return ExpertsConfig(**{"intermediate_size": 4, "activation": "swiglu_oai", **fields})

    assert block(experts=experts(limit=1e-6)).experts.limit == 1e-6
    assert block(experts=experts(alpha=-3.0)).experts.alpha == -3.0
    refused("experts.limit", "must be a finite number > 0.0, got 0.0", experts=experts(limit=0.0))
    refused("experts.alpha", "must be a finite number >= -inf, got nan", experts=experts(alpha=math.nan))
    refused("experts.alpha", "must be a finite number >= -inf, got inf", experts=experts(alpha=math.inf))
    refused("shared.limit", "got -1.0", shared=experts(limit=-1.0))
    refused("experts.intermediate_size", "must be an int in >= 1, got 0", experts=ExpertsConfig(intermediate_size=0))
    refused("experts.activation", "swiglu_oai is the activation of gated experts only",
            experts=experts(gated=False))


@pytest.mark.parametrize("field", ["normalize", "router_bias", "correction_bias", "input_scaling", "shared_gate",
                                   "output_bias"])
def test_each_switch_must_be_a_bool(field) -> None:
    refused(field, "must be true or false, got 1", **{field: 1})
    shared = {"shared": ExpertsConfig(intermediate_size=2)} if field == "shared_gate" else {}
    assert getattr(block(**{field: True, **shared}), field) is True


def test_grouped_selection_limits() -> None:
    refused("num_groups", "must divide num_experts=4, got 3", num_groups=3)
    refused("groups_kept", "must be an int in [1, 2], got 3", num_groups=2, groups_kept=3)
    refused("num_groups", "grouped selection needs scoring softmax or sigmoid", num_groups=2,
            scoring="softmax_topk")
    # sum_top2 takes the two best of each group: a group of one expert cannot give two
    refused("group_score", "sum_top2 needs groups of at least 2 experts, got 1", num_groups=4, groups_kept=4,
            group_score="sum_top2")
    assert block(num_groups=2, groups_kept=2, group_score="sum_top2").group_score == "sum_top2"
    # k may use every expert of the kept groups, not one more
    assert block(num_groups=2, groups_kept=1, top_k=2).top_k == 2
    refused("top_k", "k=3 exceeds the experts of the kept groups (1 x 2)", num_groups=2, groups_kept=1, top_k=3)


def test_a_shared_gate_needs_a_shared_expert() -> None:
    refused("shared_gate", "a shared gate needs a shared expert", shared_gate=True)


@pytest.mark.parametrize("gated", [False, True])
def test_expert_groups_stay_below_the_weight_limit_at_its_exact_edges(gated) -> None:
    """Each PiMoEExpertMLP group's weight tensor [G, rows, in] holds fewer than max_group_weights elements, and the
    groups are as few as that allows: checked at limits one below, at and one above each multiple of the largest
    expert tensor, against the largest G found by counting."""
    experts = ExpertsConfig(intermediate_size=4, activation="silu" if gated else "gelu", gated=gated)
    largest = max(rows * cols for rows, cols in experts.layer_shapes(8))
    for multiple in range(1, 6):
        for limit in (multiple * largest - 1, multiple * largest, multiple * largest + 1):
            if limit <= largest:  # one expert's tensor must fit below the limit (refused otherwise: not this test)
                continue
            config = block(num_experts=8, experts=experts, max_group_weights=limit)
            groups = config.routed_groups()
            assert [e for g in groups for e in g] == list(range(8))
            most = max([g for g in range(1, 9) if g * largest < limit], default=1)
            assert all(len(g) * largest < limit or len(g) == 1 for g in groups), (limit, groups)
            assert len(groups) == -(-8 // most), (limit, groups)


def test_one_experts_tensor_must_stay_below_the_group_limit_that_was_given() -> None:
    """An expert whose largest weight tensor (gated: the fused [gate; up] weight [2 x 4, 8], 64 elements) is not
    below max_group_weights is refused naming the limit it met: the given max_group_weights, or by default the op
    contract's int32 indexing (2^31 elements: [2 x 2^14, 2^16])."""
    assert BASE["experts"].layer_shapes(8) == [(8, 8), (8, 4)]
    assert block(max_group_weights=65).max_group_weights == 65
    refused("experts.intermediate_size", "one expert's weight holds 64 elements, not below max_group_weights (64)",
            max_group_weights=64)
    refused("experts.intermediate_size", "one expert's weight holds 2,147,483,648 elements, not below the op "
            "contract's int32 indexing (2,147,483,648)", hidden_size=2**16,
            experts=ExpertsConfig(intermediate_size=2**14))
