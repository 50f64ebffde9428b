"""PiMoEConfig at the exact edges of every range it checks (the last value accepted, the first refused), the
defaults it resolves, and the op contract's size limits it enforces before anything is allocated. Expected values
come from the docstrings and docs/op_contract.md (k <= min(E, 16), E <= 1024, at most 8 layers, every element count
an op indexes below 2^31)."""

from __future__ import annotations

import math

import pytest

from pimoe_export.errors import PiMoEConfigError
from pimoe_export.model.config import ExpertType, PiMoEConfig

L = (ExpertType.LANGUAGE,)


def refused(field: str, fragment: str, **fields) -> str:
    with pytest.raises(PiMoEConfigError) as info:
        PiMoEConfig(**{"hidden_size": 8, "expert_types": L, **fields})
    assert info.value.field == field, (info.value.field, str(info.value))
    assert fragment in str(info.value), str(info.value)
    return str(info.value)


def ok(**fields) -> PiMoEConfig:
    return PiMoEConfig(**{"hidden_size": 8, "expert_types": L, **fields})


@pytest.mark.parametrize(("experts", "k_max"), [(1, 1), (3, 3), (16, 16), (17, 16), (1024, 16)])
def test_top_k_goes_up_to_the_smaller_of_e_and_16(experts, k_max) -> None:
    assert ok(num_experts=experts, top_k=k_max, intermediate_size=2).top_k == k_max
    assert refused("top_k", f"must be in [1, {k_max}], got {k_max + 1}", num_experts=experts, top_k=k_max + 1,
                   intermediate_size=2)
    refused("top_k", f"must be in [1, {k_max}], got 0", num_experts=experts, top_k=0, intermediate_size=2)


def test_num_experts_from_1_to_1024() -> None:
    assert ok(num_experts=1024, intermediate_size=1).num_experts == 1024
    assert ok(num_experts=1).num_experts == 1
    assert refused("num_experts", "must be in [1, 1024], got 1025", num_experts=1025) == \
        "PiMoEConfig.num_experts: must be in [1, 1024], got 1025"
    refused("num_experts", "must be in [1, 1024], got 0", num_experts=0)


@pytest.mark.parametrize(("field", "accepted", "refused_values", "fragment"), [
    ("temperature", [1e-30, 5e-324, 1e30], [0.0, -1.0, math.inf, math.nan], "must be a finite number in (0.0, inf)"),
    ("layer_norm_eps", [1e-30], [0.0, -1e-9], "must be a finite number in (0.0, inf)"),
    ("capacity_factor", [None, 1e-9, 8.0], [0.0, -1.0, math.inf], "must be a finite number in (0.0, inf)"),
    ("dropout", [0.0, 0.999], [1.0, -1e-9, 1.5], "must be a finite number in [0.0, 1.0)"),
    ("router_dropout", [0.0, 0.999], [1.0, -0.1], "must be a finite number in [0.0, 1.0)"),
    ("load_balance_weight", [0.0, 10.0], [-1e-9, math.nan], "must be a finite number in [0.0, inf)"),
    ("z_loss_weight", [0.0], [-1e-9, math.inf], "must be a finite number in [0.0, inf)"),
    ("type_consistency_weight", [0.0], [-1e-9], "must be a finite number in [0.0, inf)"),
    ("hidden_size", [1], [0, -8], "must be in >= 1"),
    ("router_hidden_size", [1, 1000], [0], "must be in >= 1"),
    ("intermediate_size", [1], [0], "must be in >= 1"),
])
def test_each_number_at_the_edges_of_its_range(field, accepted, refused_values, fragment) -> None:
    for value in accepted:
        assert ok(**{field: value}) is not None, (field, value)
    for value in refused_values:
        refused(field, fragment, **{field: value})


@pytest.mark.parametrize(("field", "value", "fragment"), [
    ("hidden_size", True, "must be an int, got bool True"),
    ("num_experts", 4.0, "must be an int, got float 4.0"),
    ("top_k", "2", "must be an int, got str '2'"),
    ("temperature", True, "must be a number, got bool True"),
    ("dropout", "0.1", "must be a number, got str '0.1'"),
    ("use_gating", 1, "must be True or False, got 1"),
    ("layer_norm", None, "must be True or False, got None"),
    ("normalize", 0, "must be True or False, got 0"),
    ("metadata", [("a", 1)], "must be a mapping of JSON-serialisable values"),
])
def test_values_of_the_wrong_type_name_the_field(field, value, fragment) -> None:
    refused(field, fragment, **{field: value})


def test_a_reasoning_expert_needs_an_intermediate_size_of_2() -> None:
    """REASONING: H -> I -> I/2 -> H, so I >= 2; other types take I = 1."""
    assert ok(intermediate_size=1).intermediate_size == 1
    assert PiMoEConfig(hidden_size=8, expert_types=(ExpertType.REASONING,), intermediate_size=2).intermediate_size == 2
    with pytest.raises(PiMoEConfigError, match=r"must be in >= 2, got 1") as info:
        PiMoEConfig(hidden_size=8, expert_types=(ExpertType.LANGUAGE, ExpertType.REASONING), intermediate_size=1)
    assert info.value.field == "intermediate_size"


def test_the_defaults_it_resolves() -> None:
    c = PiMoEConfig(hidden_size=9)
    assert (c.intermediate_size, c.router_hidden_size, c.num_experts, c.top_k, c.normalize) == (36, 4, 8, 1, False)
    assert PiMoEConfig(hidden_size=1).router_hidden_size == 1  # h // 2 = 0: at least 1
    assert PiMoEConfig(hidden_size=3).router_hidden_size == 1
    assert PiMoEConfig(hidden_size=8, num_experts=4, top_k=2).normalize is True  # k > 1: renormalised
    assert PiMoEConfig(hidden_size=8, num_experts=4, top_k=2, normalize=False).normalize is False
    assert PiMoEConfig(hidden_size=8, top_k=1, normalize=True).normalize is True
    assert c.metadata == {} and isinstance(PiMoEConfig(hidden_size=8, metadata={"a": 1}).metadata, dict)


def test_expert_types_are_named_once_each() -> None:
    assert ok(expert_types=["language", ExpertType.REASONING]).expert_types == (ExpertType.LANGUAGE,
                                                                                ExpertType.REASONING)
    refused("expert_types", "must not repeat a type, got ['language', 'language']",
            expert_types=["language", "language"])
    refused("expert_types", "must be a non-empty sequence of ExpertType, got 'language'", expert_types="language")
    refused("expert_types", "must be a non-empty sequence of ExpertType", expert_types=ExpertType.LANGUAGE)
    refused("expert_types", "must be a non-empty sequence of ExpertType, got 3", expert_types=3)
    refused("expert_types", "must name at least one expert type", expert_types=())


def test_expert_i_has_type_i_mod_the_type_count() -> None:
    c = PiMoEConfig(hidden_size=8, num_experts=5, expert_types=("language", "computation"), intermediate_size=4)
    assert [c.expert_type_of(i).value for i in range(5)] == ["language", "computation"] * 2 + ["language"]
    assert [spec.widths for spec in c.expert_specs()] == [(8, 4, 8), (8, 8, 4, 8)] * 2 + [(8, 4, 8)]
    assert [spec.activation for spec in c.expert_specs()][:2] == ["gelu", "relu"]
    assert [ids for _, ids in c.expert_groups()] == [[0, 2, 4], [1, 3]]
    assert PiMoEConfig(hidden_size=8, num_experts=2, expert_types=("computation",), activation="tanh",
                       intermediate_size=4).expert_specs()[0].activation == "tanh"


# ------------------------------------------------------------------------------------------ op contract sizes
def test_element_counts_stay_below_2_to_the_31() -> None:
    """E x the widest layer must stay below 2^31 (the routing and dispatch indexes), and H x 16 too."""
    refused("intermediate_size", "sizes overflow int32 indexing (widest layer 1073741824)", hidden_size=8,
            num_experts=2, intermediate_size=2**30)
    refused("intermediate_size", "sizes overflow int32 indexing", hidden_size=2**27, num_experts=1,
            intermediate_size=1)
    message = refused("intermediate_size", "holds >= 2^31 weights", hidden_size=2**15, num_experts=1,
                      intermediate_size=2**16)  # 32768 x 65536 = 2^31 weights in one layer
    assert "a 32768x65536 layer over 1 expert(s)" in message
    # eight different experts (no layer over 2^31 weights) holding more than 2^33 parameters together
    h = 2**15
    widths = tuple((h, h - j, h) for j in range(8))
    total = sum(2 * h * w + w + h for _, w, _ in widths)
    assert total > 2**33
    message = refused("hidden_size", f"the experts would hold {total:,} parameters, more than the 8,589,934,592 this "
                      "package builds", hidden_size=h, num_experts=8, intermediate_size=h, expert_widths=widths)
    fewer = tuple((h, w // 2, h) for _, w, _ in widths)
    assert sum(2 * h * w + w + h for _, w, _ in fewer) <= 2**33
    assert ok(hidden_size=h, num_experts=8, intermediate_size=h, expert_widths=fewer).expert_widths == fewer


def test_just_inside_the_size_limits_is_accepted_without_allocating() -> None:
    c = PiMoEConfig(hidden_size=2**27 - 1, num_experts=1, intermediate_size=1, expert_types=L)
    assert c.hidden_size * 16 < 2**31


def test_pruned_widths_keep_each_experts_ends_and_layer_count() -> None:
    base = (8, 4, 8)
    assert ok(num_experts=2, intermediate_size=4, expert_widths=(base, (8, 3, 8))).expert_specs()[1].widths == \
        (8, 3, 8)
    refused("expert_widths", "must list the widths of all 2 experts", num_experts=2, intermediate_size=4,
            expert_widths=(base,))
    for bad in ((8, 3, 4, 8), (7, 3, 8), (8, 3, 9), (8, 0, 8), (8, True, 8)):
        refused("expert_widths", "", num_experts=2, intermediate_size=4, expert_widths=(base, bad))
