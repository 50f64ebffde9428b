"""The Python side of the op contract at its exact limits: each attribute's range (the last value accepted, the first
refused, on both sides), the expert-MLP rules (distinct experts, 1..MAX_LAYERS layers, one static scale per layer and
expert), graph-level checks (domains, unknown ops, k against num_experts, how many problems a message lists), the
per-token element count that bounds a call, and the parameter layout every backend shares.

Expected values are written from docs/op_contract.md, not read back from the schema."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper

from pimoe_export.errors import ArtifactError
from pimoe_export.ops import schema
from pimoe_export.ops.validation import attribute_problems, check_graph, elements_per_token

ROUTE, DISPATCH, MLP, COMBINE = "PiMoERoute", "PiMoEDispatch", "PiMoEExpertMLP", "PiMoECombine"
MLP_OK = {"expert_ids": [0, 1], "widths": [4, 8, 4], "activation": "gelu", "layer_norm": 1, "eps": 1e-5,
          "quant_mode": "none"}


def problems(op: str, **attrs) -> list[str]:
    base = {ROUTE: {"k": 2}, DISPATCH: {"num_experts": 4}, MLP: dict(MLP_OK), COMBINE: {}}[op]
    return attribute_problems(op, {**base, **attrs})


# ------------------------------------------------------------------------------------------ attribute ranges
@pytest.mark.parametrize(("op", "name", "ok", "bad", "fragment"), [
    (ROUTE, "k", [1, 16], [0, 17, -1], "attribute k must be"),
    (ROUTE, "normalize", [0, 1], [2, -1], "attribute normalize must be"),
    (DISPATCH, "num_experts", [1, 1024], [0, 1025], "attribute num_experts must be"),
    (MLP, "layer_norm", [0, 1], [2, -1], "attribute layer_norm must be"),
    (MLP, "eps", [1e-30, 5e-324, 1.0, 1e30], [0.0, -1e-12, math.nan, math.inf, -math.inf], "attribute eps must be"),
    (MLP, "activation", ["gelu", "gelu_tanh", "relu", "silu", "tanh"], ["GELU", "swish", ""],
     "attribute activation must be one of"),
    (MLP, "quant_mode", ["none", "w8a8_dynamic"], ["w8a8_static", "int8"], "attribute quant_mode must be one of"),
    (ROUTE, "scoring", ["softmax", "softmax_topk", "sigmoid"], ["Softmax", "topk", ""],
     "attribute scoring must be one of"),
    (ROUTE, "group_score", ["max", "sum_top2"], ["sum", "Max"], "attribute group_score must be one of"),
    (ROUTE, "num_groups", [1, 1024], [0, 1025], "attribute num_groups must be"),
    (ROUTE, "routed_scaling_factor", [5e-324, 1.0, 2.5], [0.0, -1.0, math.nan, math.inf],
     "attribute routed_scaling_factor must be"),
    (ROUTE, "normalize_eps", [0.0, 1e-20, 1.0], [-1e-30, math.nan, math.inf], "attribute normalize_eps must be"),
    (COMBINE, "order", ["slot", "expert"], ["Slot", "experts", ""], "attribute order must be one of"),
    (MLP, "bias", [0, 1], [2, -1], "attribute bias must be"),
])
def test_each_attribute_at_the_edges_of_its_range(op, name, ok, bad, fragment) -> None:
    for value in ok:
        assert problems(op, **{name: value}) == [], (name, value)
    for value in bad:
        found = problems(op, **{name: value})
        assert len(found) == 1 and found[0].startswith(fragment), (name, value, found)


@pytest.mark.parametrize(("name", "ok", "bad"), [
    ("expert_ids", [[0], [1023], [0, 1023]], [[-1], [1024], [0, 1024]]),
    ("widths", [[1, 1], [4, 2**31 - 1]], [[0, 4], [4, 0], [4, 2**31], [-4, 4]]),
    ("act_scales", [[5e-324], [1e-30, 5.0, 3e38]],
     [[0.0, 1.0], [1.0, -1.0], [1.0, math.nan], [math.inf], [1.0, -math.inf]]),
])
def test_every_element_of_a_list_attribute_is_checked(name, ok, bad) -> None:
    for value in ok:
        assert problems(MLP, **{name: value}) == [], (name, value)
    for value in bad:
        found = problems(MLP, **{name: value})
        assert found and found[0].startswith(f"attribute {name} must be"), (name, value, found)


@pytest.mark.parametrize(("op", "name", "value", "fragment"), [
    (ROUTE, "k", 2.0, "must be an integer"),
    (ROUTE, "k", True, "must be an integer"),
    (ROUTE, "k", "2", "must be an integer"),
    (ROUTE, "normalize", False, "must be an integer"),
    (DISPATCH, "num_experts", [4], "must be an integer"),
    (MLP, "expert_ids", [0, 1.0], "must be a list of integers"),
    (MLP, "expert_ids", [True], "must be a list of integers"),
    (MLP, "eps", "1e-5", "must be a number"),
    (MLP, "eps", True, "must be a number"),
    (MLP, "act_scales", [0.5, "x"], "must be a list of numbers"),
    (MLP, "activation", 3, "must be a string"),
])
def test_values_of_the_wrong_kind_are_refused(op, name, value, fragment) -> None:
    found = problems(op, **{name: value})
    assert found and f"attribute {name} {fragment}" in found[0], found


def test_an_integer_is_a_number_for_float_attributes() -> None:
    assert problems(MLP, eps=1) == []
    assert problems(MLP, quant_mode="w8a8", act_scales=[1, 2, 3, 4]) == []


def test_unknown_and_missing_attributes() -> None:
    assert attribute_problems(ROUTE, {"k": 2, "top_k": 2}) == ["unknown attribute 'top_k'"]
    assert attribute_problems(ROUTE, {}) == ["missing required attribute 'k'"]
    assert attribute_problems(DISPATCH, {}) == ["missing required attribute 'num_experts'"]
    assert attribute_problems(MLP, {"expert_ids": [0]}) == ["missing required attribute 'widths'"]
    assert attribute_problems(COMBINE, {}) == []
    # attributes with defaults may be left out
    assert attribute_problems(ROUTE, {"k": 1}) == []
    assert attribute_problems(MLP, {"expert_ids": [0], "widths": [2, 3]}) == []


def test_attributes_newer_than_the_graphs_opset_are_named_with_their_version() -> None:
    """A v1 graph (pimoe opset 1) may not use what contract v2 added: a v2 attribute, or a v2 choice of a v1
    attribute; each is one problem naming the attribute (with the value, for a choice) and both versions."""
    assert attribute_problems(ROUTE, {"k": 2, "num_groups": 2}, version=1) == [
        "attribute num_groups needs pimoe opset 2 (op contract v2) but the graph imports opset 1"]
    assert attribute_problems(ROUTE, {"k": 2, "scoring": "sigmoid"}, version=1) == [
        "attribute scoring='sigmoid' needs pimoe opset 2 (op contract v2) but the graph imports opset 1"]
    assert attribute_problems(MLP, {"expert_ids": [0], "widths": [2, 3], "gated": 1, "activation": "swiglu_oai"},
                              version=1) == [
        "attribute activation='swiglu_oai' needs pimoe opset 2 (op contract v2) but the graph imports opset 1",
        "attribute gated needs pimoe opset 2 (op contract v2) but the graph imports opset 1"]
    assert attribute_problems(COMBINE, {"order": "slot"}, version=1) == [
        "attribute order needs pimoe opset 2 (op contract v2) but the graph imports opset 1"]
    # v1's own attributes and choices are fine at opset 1, and the v2 ones at opset 2
    assert attribute_problems(ROUTE, {"k": 2, "scoring": "softmax", "normalize": 1}, version=1) == []
    assert attribute_problems(ROUTE, {"k": 2, "scoring": "sigmoid"}, version=2) == []


def test_the_contract_defaults() -> None:
    """docs/op_contract.md: normalize 0, scoring softmax, no groups (1 of 1, max), scaling 1, normalize_eps 0;
    activation gelu, layer_norm 1, eps 1e-5, no quantisation, no static scales, not gated, with bias, GPT-OSS's
    alpha 1.702 and limit 7; combine in slot order; k, num_experts, expert_ids and widths have none (required).
    Every v2 default is v1's behaviour."""
    defaults = {(op, a.name): a.default for op, s in schema.SCHEMAS.items() for a in s.attributes}
    assert defaults == {(ROUTE, "k"): None, (ROUTE, "normalize"): 0, (ROUTE, "scoring"): "softmax",
                        (ROUTE, "num_groups"): 1, (ROUTE, "groups_kept"): 1, (ROUTE, "group_score"): "max",
                        (ROUTE, "routed_scaling_factor"): 1.0, (ROUTE, "normalize_eps"): 0.0,
                        (DISPATCH, "num_experts"): None, (MLP, "expert_ids"): None, (MLP, "widths"): None,
                        (MLP, "activation"): "gelu", (MLP, "layer_norm"): 1, (MLP, "eps"): 1e-5,
                        (MLP, "quant_mode"): "none", (MLP, "act_scales"): [], (MLP, "gated"): 0, (MLP, "bias"): 1,
                        (MLP, "alpha"): 1.702, (MLP, "limit"): 7.0, (COMBINE, "order"): "slot"}


# ------------------------------------------------------------------------------------------ expert MLP rules
def test_expert_ids_are_distinct_and_not_empty() -> None:
    assert problems(MLP, expert_ids=[3, 1, 2]) == []
    assert problems(MLP, expert_ids=[1, 1]) == ["expert_ids must list distinct experts, got [1, 1]"]
    assert problems(MLP, expert_ids=[0, 2, 0]) == ["expert_ids must list distinct experts, got [0, 2, 0]"]
    assert problems(MLP, expert_ids=[]) == ["expert_ids must list distinct experts, got []"]


def test_one_to_max_layers_layers() -> None:
    assert schema.MAX_LAYERS == 8
    assert problems(MLP, widths=[4, 4]) == []
    assert problems(MLP, widths=[4] * 9) == []  # 8 layers
    assert problems(MLP, widths=[4] * 10) == ["widths must hold 2..9 entries (layers + 1), got 10"]
    assert problems(MLP, widths=[4]) == ["widths must hold 2..9 entries (layers + 1), got 1"]


def test_static_int8_needs_one_scale_per_layer_and_expert() -> None:
    """w8a8: act_scales has layers x G entries (layer-major); the dynamic mode and float graphs need none."""
    assert problems(MLP, quant_mode="w8a8", act_scales=[0.1] * 4) == []  # 2 layers x 2 experts
    for count in (3, 5, 0):
        found = problems(MLP, quant_mode="w8a8", act_scales=[0.1] * count)
        assert found == [f"quant_mode w8a8 needs act_scales with layers*G = 4 entries, got {count}"], count
    assert problems(MLP, quant_mode="w8a8", widths=[4, 4], expert_ids=[0, 1, 2], act_scales=[0.1] * 3) == []
    assert problems(MLP, quant_mode="w8a8_dynamic") == []
    assert problems(MLP, quant_mode="w8a8_dynamic", act_scales=[0.1]) == []
    assert problems(MLP, quant_mode="w8a8", act_scales=[0.1, 0.1, 0.0, 0.1]) == \
        ["attribute act_scales must be > 0, got 0.0"]


# ------------------------------------------------------------------------------------------ graphs
def graph(*nodes, name: str = "g"):
    """A model of ``nodes`` (their inputs and outputs untyped: check_graph reads nodes and attributes only)."""
    return helper.make_model(helper.make_graph(list(nodes), name, [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [None, None])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]))


def node(op: str, domain: str = "pimoe", name: str = "", **attrs):
    return helper.make_node(op, ["x"], ["y"], domain=domain, name=name, **attrs)


def test_k_may_equal_num_experts_but_not_exceed_it() -> None:
    check_graph(graph(node(ROUTE, k=4), node(DISPATCH, num_experts=4)))
    with pytest.raises(ArtifactError, match=r"PiMoERoute k=5 exceeds PiMoEDispatch num_experts=4 \(k <= E\)"):
        check_graph(graph(node(ROUTE, k=5), node(DISPATCH, num_experts=4)))
    # several layers: the largest k against the smallest E
    with pytest.raises(ArtifactError, match="k=3 exceeds PiMoEDispatch num_experts=2"):
        check_graph(graph(node(ROUTE, k=1), node(DISPATCH, num_experts=8), node(ROUTE, k=3),
                          node(DISPATCH, num_experts=2)))
    check_graph(graph(node(ROUTE, k=8)))  # no dispatch: nothing to compare


def test_domains_and_unknown_ops() -> None:
    with pytest.raises(ArtifactError, match=r"node 0 \(r\): PiMoERoute is in domain '\(default\)', not 'pimoe'"):
        check_graph(graph(node(ROUTE, domain="", name="r", k=2)))
    with pytest.raises(ArtifactError, match=r"node 1 \(PiMoEFused\): PiMoEFused is not an op of contract v2 "
                                            r"\(known: \['PiMoECombine', 'PiMoEDispatch', 'PiMoEExpertMLP', "
                                            r"'PiMoERoute'\]\)"):
        check_graph(graph(node("Relu", domain=""), node("PiMoEFused")))
    with pytest.raises(ArtifactError, match=r"node 0 \(PiMoEDispatch\): attribute num_experts must be <= 1024, "
                                            r"got 1025"):
        check_graph(graph(node(DISPATCH, num_experts=1025)))
    check_graph(graph(node("Relu", domain=""), node("MatMul", domain="com.microsoft")))


def test_a_message_lists_five_problems_and_counts_the_rest() -> None:
    for count, tail in ((5, None), (6, "; and 1 more"), (9, "; and 4 more")):
        with pytest.raises(ArtifactError) as info:
            check_graph(graph(*[node(ROUTE, name=f"r{i}", k=0) for i in range(count)]))
        message = str(info.value)
        assert message.count("attribute k must be >= 1, got 0") == min(count, 5)
        assert (tail in message) if tail else ("more" not in message)
        assert "r4" in message and "r5" not in message
        assert message.startswith("the model breaks the pimoe op contract: node 0 (r0)")
        assert message.endswith("Re-export it with `pimoe-export export` (or `quantize`) from a valid checkpoint")


def test_check_graph_reads_a_file_and_names_it(tmp_path) -> None:
    import onnx

    path = tmp_path / "bad.onnx"
    onnx.save(graph(node(ROUTE, k=17)), str(path))
    with pytest.raises(ArtifactError, match=rf"^{path} breaks the pimoe op contract: node 0"):
        check_graph(path)
    with pytest.raises(ArtifactError, match=rf"^{path} breaks"):
        check_graph(str(path))


@pytest.mark.parametrize(("nodes", "expected"), [
    ([], 0),
    ([("Relu", "", {})], 0),
    ([(ROUTE, "pimoe", {"k": 2}), (DISPATCH, "pimoe", {"num_experts": 8})], 8),  # no MLP: E vs k x 1
    ([(ROUTE, "pimoe", {"k": 2}), (DISPATCH, "pimoe", {"num_experts": 8}),
      (MLP, "pimoe", {"widths": [16, 300, 16], "expert_ids": [0]})], 600),
    ([(ROUTE, "pimoe", {"k": 1}), (DISPATCH, "pimoe", {"num_experts": 1000}),
      (MLP, "pimoe", {"widths": [4, 8, 4], "expert_ids": [0]})], 1000),
    ([(ROUTE, "pimoe", {"k": 3}), (MLP, "pimoe", {"widths": [7, 5], "expert_ids": [0]}),
      (MLP, "pimoe", {"widths": [9, 2, 7], "expert_ids": [1]}), (ROUTE, "pimoe", {"k": 2})], 27),
    ([(MLP, "other", {"widths": [4096, 4096]}), (ROUTE, "pimoe", {"k": 1})], 1),  # another domain's node: ignored
])
def test_the_elements_a_token_makes_an_op_index(nodes, expected) -> None:
    """max(E, k x the widest layer) over the graph's pimoe nodes (0 without any): a unit's call may hold at most
    (2^31 - 1) // that many tokens."""
    model = graph(*[node(op, domain, **attrs) for op, domain, attrs in nodes])
    assert elements_per_token(model) == expected


# ------------------------------------------------------------------------------------------ parameter layout
@pytest.mark.parametrize(("layers", "layer_norm", "quant", "expected"), [
    (1, True, "none", [(0, "weight"), (0, "bias")]),
    (2, True, "none", [(0, "weight"), (0, "bias"), (0, "ln_gamma"), (0, "ln_beta"), (1, "weight"), (1, "bias")]),
    (2, False, "none", [(0, "weight"), (0, "bias"), (1, "weight"), (1, "bias")]),
    (2, True, "w8a8", [(0, "weight"), (0, "w_scale"), (0, "act_smooth"), (0, "bias"), (0, "ln_gamma"),
                       (0, "ln_beta"), (1, "weight"), (1, "w_scale"), (1, "act_smooth"), (1, "bias")]),
    (1, False, "w8a8_dynamic", [(0, "weight"), (0, "w_scale"), (0, "act_smooth"), (0, "bias")]),
])
def test_the_parameter_layout_of_an_expert_group(layers, layer_norm, quant, expected) -> None:
    assert schema.expert_mlp_param_layout(layers, layer_norm, quant) == expected


def test_the_layout_refuses_an_unknown_mode_and_split_checks_the_count() -> None:
    import torch

    from pimoe_export.ops.torch_ops import split_expert_params

    with pytest.raises(ValueError, match="quant_mode must be one of"):
        schema.expert_mlp_param_layout(1, False, "int4")
    tensors = [torch.full((1,), float(i)) for i in range(6)]
    roles = split_expert_params(tensors, 2, True, "none")
    assert [float(t) for t in roles["weight"]] == [0.0, 4.0] and [float(t) for t in roles["bias"]] == [1.0, 5.0]
    assert [float(t) for t in roles["ln_gamma"]] == [2.0] and [float(t) for t in roles["ln_beta"]] == [3.0]
    with pytest.raises(ValueError, match="PiMoEExpertMLP expects 6 parameter tensors, got 5"):
        split_expert_params(tensors[:5], 2, True, "none")
    roles = split_expert_params([torch.full((1,), float(i)) for i in range(8)], 2, False, "w8a8")
    assert {role: [float(t) for t in ts] for role, ts in roles.items()} == {
        "weight": [0.0, 4.0], "w_scale": [1.0, 5.0], "act_smooth": [2.0, 6.0], "bias": [3.0, 7.0], "ln_gamma": [],
        "ln_beta": []}


def test_range_text_of_the_docs_table() -> None:
    text = {(op, a.name): a.range_text() for op, s in schema.SCHEMAS.items() for a in s.attributes}
    assert text[(ROUTE, "k")] == "≥ 1, ≤ 16"
    assert text[(ROUTE, "normalize")] == "0 or 1"
    assert text[(DISPATCH, "num_experts")] == "≥ 1, ≤ 1024"
    assert text[(MLP, "eps")] == "> 0"
    assert text[(MLP, "expert_ids")] == "each ≥ 0, ≤ 1023"
    assert text[(MLP, "act_scales")] == "each > 0"
    assert text[(ROUTE, "scoring")] == '"softmax" \\| "softmax_topk" (v2) \\| "sigmoid" (v2)'
    assert text[(MLP, "limit")] == "> 0"
    assert text[(COMBINE, "order")] == '"slot" \\| "expert"'
    assert np.isclose(schema.SCHEMAS[MLP].attribute("eps").default, 1e-5)
    with pytest.raises(KeyError, match="PiMoERoute has no attribute 'K'"):
        schema.ROUTE_SCHEMA.attribute("K")


def test_route_groups_are_checked_against_the_graphs_number_of_experts() -> None:
    """With one E in the graph (every dispatch alike), the route's groups must fit it: num_groups dividing E, at
    least two experts per group for sum_top2, k within the kept groups' experts."""
    check_graph(graph(node(ROUTE, k=2, num_groups=4, groups_kept=2), node(DISPATCH, num_experts=32)))
    with pytest.raises(ArtifactError, match=r"node 0 \(PiMoERoute\): num_groups=5 does not divide the number of "
                                            r"experts E=32"):
        check_graph(graph(node(ROUTE, k=2, num_groups=5, groups_kept=2), node(DISPATCH, num_experts=32)))
    with pytest.raises(ArtifactError, match=r"k=9 exceeds the experts of the kept groups"):
        check_graph(graph(node(ROUTE, k=9, num_groups=4, groups_kept=1), node(DISPATCH, num_experts=32)))


def test_k_equal_to_the_kept_groups_experts_is_accepted() -> None:
    """docs/op_contract.md: k <= groups_kept · E/G, and every backend refuses k > groups_kept · E / num_groups: at
    equality (k = 8 = 1 · 32/4; DeepSeek-V3 shapes like E = 4, n_group = 2, topk_group = 1, k = 2) the graph is
    valid, one more is refused."""
    check_graph(graph(node(ROUTE, k=8, num_groups=4, groups_kept=1), node(DISPATCH, num_experts=32)))
    check_graph(graph(node(ROUTE, k=2, num_groups=2, groups_kept=1, scoring="sigmoid", group_score="sum_top2"),
                      node(DISPATCH, num_experts=4)))
    check_graph(graph(node(ROUTE, k=12, num_groups=4, groups_kept=3), node(DISPATCH, num_experts=16)))
    with pytest.raises(ArtifactError, match=r"k=13 exceeds the experts of the kept groups, groups_kept \* "
                                            r"E/num_groups = 12"):
        check_graph(graph(node(ROUTE, k=13, num_groups=4, groups_kept=3), node(DISPATCH, num_experts=16)))
