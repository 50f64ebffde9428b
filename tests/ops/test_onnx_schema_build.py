"""The ONNX schemas of the pimoe ops as they are built (not only as registered at import time): every formal
parameter, type constraint and attribute of each op, and each schema's own type and shape inference, run through
onnx.shape_inference.infer_node_outputs on a freshly built schema. The registry itself is checked by
test_onnx_schema.py; here the functions that build it are called directly, so a fault in them is seen even though
the registry was filled when the package was first imported.

Expected values are the contract (docs/op_contract.md): N = 6 tokens, E = 4, k = 2, H = 16, widths 16 -> 32 -> 8."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper
from onnx.defs import OpSchema

from pimoe_export.ops import schema
from pimoe_export.ops.onnx_schema import onnx_op_schema, register_onnx_schemas

SINGLE, OPTIONAL, VARIADIC = (OpSchema.FormalParameterOption.Single, OpSchema.FormalParameterOption.Optional,
                              OpSchema.FormalParameterOption.Variadic)
FLOATS = ["tensor(float)", "tensor(float16)"]


def formal(params) -> list[tuple]:
    return [(p.name, p.type_str, p.option, p.is_homogeneous) for p in params]


def built(op: str, version: int | None = None) -> OpSchema:
    return onnx_op_schema(schema.SCHEMAS[op]) if version is None else onnx_op_schema(schema.SCHEMAS[op], version)


def test_the_default_build_is_the_newest_opset() -> None:
    assert schema.OPSET_VERSION == 2
    for op in schema.SCHEMAS:
        assert built(op).since_version == 2 and built(op, 1).since_version == 1, op


def test_route_schema() -> None:
    s = built("PiMoERoute", 1)
    assert (s.name, s.domain, s.since_version) == ("PiMoERoute", "pimoe", 1)
    assert formal(s.inputs) == [("logits", "T", SINGLE, True), ("selection_bias", "tensor(float)", OPTIONAL, True)]
    assert formal(s.outputs) == [("weights", "tensor(float)", SINGLE, True), ("ids", "tensor(int32)", SINGLE, True)]
    assert {c.type_param_str: sorted(c.allowed_type_strs) for c in s.type_constraints} == {"T": FLOATS}
    assert {name: (a.type, a.required) for name, a in s.attributes.items()} == {
        "k": (OpSchema.AttrType.INT, True), "normalize": (OpSchema.AttrType.INT, False),
        "scoring": (OpSchema.AttrType.STRING, False)}
    # opset 2: the same inputs and outputs, and contract v2's grouped selection and weight scaling
    s2 = built("PiMoERoute")
    assert (s2.name, s2.domain, s2.since_version) == ("PiMoERoute", "pimoe", 2)
    assert formal(s2.inputs) == formal(s.inputs) and formal(s2.outputs) == formal(s.outputs)
    assert {name: (a.type, a.required) for name, a in s2.attributes.items()} == {
        "k": (OpSchema.AttrType.INT, True), "normalize": (OpSchema.AttrType.INT, False),
        "scoring": (OpSchema.AttrType.STRING, False), "num_groups": (OpSchema.AttrType.INT, False),
        "groups_kept": (OpSchema.AttrType.INT, False), "group_score": (OpSchema.AttrType.STRING, False),
        "routed_scaling_factor": (OpSchema.AttrType.FLOAT, False), "normalize_eps": (OpSchema.AttrType.FLOAT, False)}


def test_dispatch_and_combine_schemas() -> None:
    s = built("PiMoEDispatch")
    assert s.since_version == 2
    assert formal(s.inputs) == [("x", "T", SINGLE, True), ("ids", "tensor(int32)", SINGLE, True)]
    assert formal(s.outputs) == [("x_sorted", "T", SINGLE, True), ("offsets", "tensor(int32)", SINGLE, True),
                                 ("flat_to_sorted", "tensor(int32)", SINGLE, True)]
    assert {name: a.required for name, a in s.attributes.items()} == {"num_experts": True}
    s = built("PiMoECombine")
    assert formal(s.inputs) == [("y_sorted", "T", SINGLE, True), ("flat_to_sorted", "tensor(int32)", SINGLE, True),
                                ("weights", "tensor(float)", SINGLE, True)]
    assert formal(s.outputs) == [("y", "T", SINGLE, True)]
    assert {name: (a.type, a.required) for name, a in s.attributes.items()} == {
        "order": (OpSchema.AttrType.STRING, False)}
    assert built("PiMoECombine", 1).attributes == {}  # opset 1: no attributes


def test_the_expert_mlp_takes_one_heterogeneous_variadic_input() -> None:
    """x_sorted, offsets and the parameters as ONE variadic input of every dtype they may have (torch.onnx binds all
    positional arguments to a variadic parameter); the output keeps x_sorted's float type."""
    s = built("PiMoEExpertMLP")
    assert formal(s.inputs) == [("inputs", "V", VARIADIC, False)]
    assert s.inputs[0].min_arity == 1
    assert "x_sorted, offsets, params" in s.inputs[0].description
    assert formal(s.outputs) == [("y_sorted", "T", SINGLE, True)]
    assert {c.type_param_str: sorted(c.allowed_type_strs) for c in s.type_constraints} == {
        "V": ["tensor(float)", "tensor(float16)", "tensor(int32)", "tensor(int8)"], "T": FLOATS}
    v1 = {"expert_ids": True, "widths": True, "activation": False, "layer_norm": False, "eps": False,
          "quant_mode": False, "act_scales": False}
    assert {name: a.required for name, a in built("PiMoEExpertMLP", 1).attributes.items()} == v1
    assert {name: a.required for name, a in s.attributes.items()} == {
        **v1, "gated": False, "bias": False, "alpha": False, "limit": False}
    assert s.attributes["act_scales"].type == OpSchema.AttrType.FLOATS
    assert {s.attributes[n].type for n in ("alpha", "limit")} == {OpSchema.AttrType.FLOAT}
    assert {s.attributes[n].type for n in ("gated", "bias")} == {OpSchema.AttrType.INT}


def infer(op: str, inputs: dict[str, tuple[int, list]], **attrs) -> dict[str, tuple[int, list]]:
    node = helper.make_node(op, list(inputs), [o.name for o in schema.SCHEMAS[op].outputs], domain="pimoe", **attrs)
    types = {name: helper.make_tensor_type_proto(elem, dims) for name, (elem, dims) in inputs.items()}
    out = onnx.shape_inference.infer_node_outputs(built(op), node, types)
    result = {}
    for name, proto in out.items():
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in proto.tensor_type.shape.dim]
        result[name] = (proto.tensor_type.elem_type, dims)
    return result


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_each_built_schema_infers_the_contracts_shapes(dtype) -> None:
    assert infer("PiMoERoute", {"logits": (dtype, [6, 4]), "bias": (TensorProto.FLOAT, [4])}, k=2) == {
        "weights": (TensorProto.FLOAT, [6, 2]), "ids": (TensorProto.INT32, [6, 2])}
    assert infer("PiMoEDispatch", {"x": (dtype, [6, 16]), "ids": (TensorProto.INT32, [6, 2])}, num_experts=4) == {
        "x_sorted": (dtype, [12, 16]), "offsets": (TensorProto.INT32, [5]), "flat_to_sorted": (TensorProto.INT32, [12])}
    assert infer("PiMoEExpertMLP", {"xs": (dtype, [12, 16]), "off": (TensorProto.INT32, [5]),
                                    "w0": (dtype, [4, 32, 16]), "b0": (TensorProto.FLOAT, [4, 32])},
                 expert_ids=[0, 1, 2, 3], widths=[16, 32, 8]) == {"y_sorted": (dtype, [12, 8])}
    assert infer("PiMoECombine", {"ys": (dtype, [12, 8]), "f2s": (TensorProto.INT32, [12]),
                                  "w": (TensorProto.FLOAT, [6, 2])}) == {"y": (dtype, [6, 8])}


def test_symbols_stay_symbols_and_products_of_unknowns_are_unknown() -> None:
    got = infer("PiMoEDispatch", {"x": (TensorProto.FLOAT, ["N", 16]), "ids": (TensorProto.INT32, ["N", 2])},
                num_experts=8)
    assert got == {"x_sorted": (TensorProto.FLOAT, [None, 16]), "offsets": (TensorProto.INT32, [9]),
                   "flat_to_sorted": (TensorProto.INT32, [None])}
    got = infer("PiMoERoute", {"logits": (TensorProto.FLOAT16, ["tokens", 4])}, k=3)
    assert got == {"weights": (TensorProto.FLOAT, ["tokens", 3]), "ids": (TensorProto.INT32, ["tokens", 3])}
    got = infer("PiMoECombine", {"ys": (TensorProto.FLOAT, [None, 8]), "f2s": (TensorProto.INT32, [None]),
                                 "w": (TensorProto.FLOAT, ["N", 2])})
    assert got == {"y": (TensorProto.FLOAT, ["N", 8])}


def test_an_output_whose_type_parameter_is_unknown_is_left_to_the_graph() -> None:
    node = helper.make_node("PiMoEDispatch", ["x", "ids"], ["xs", "off", "f2s"], domain="pimoe", num_experts=4)
    types = {"x": onnx.TypeProto(), "ids": helper.make_tensor_type_proto(TensorProto.INT32, [6, 2])}
    out = onnx.shape_inference.infer_node_outputs(built("PiMoEDispatch"), node, types)
    assert out.get("xs", onnx.TypeProto()) == onnx.TypeProto()  # untyped: not set
    assert out["off"].tensor_type.elem_type == TensorProto.INT32


def test_registration_adds_what_is_missing_and_keeps_what_is_there() -> None:
    register_onnx_schemas()
    before = onnx.defs.get_schema("PiMoECombine", 1, "pimoe")
    onnx.defs.deregister_schema("PiMoECombine", 1, "pimoe")
    with pytest.raises(onnx.defs.SchemaError):
        onnx.defs.get_schema("PiMoECombine", 1, "pimoe")
    register_onnx_schemas()
    again = onnx.defs.get_schema("PiMoECombine", 1, "pimoe")
    assert formal(again.inputs) == formal(before.inputs)
    register_onnx_schemas()  # idempotent: nothing is registered twice
    assert {s.name for s in onnx.defs.get_all_schemas() if s.domain == "pimoe"} == set(schema.SCHEMAS)


def test_range_text_of_any_attribute() -> None:
    """The docs tables' "allowed" column, for attributes the contract may add: no bound, one bound, and integer
    bounds beyond six significant digits written out in full."""
    assert schema.AttrSpec("x", "int").range_text() == "any"
    assert schema.AttrSpec("x", "int", maximum=5).range_text() == "≤ 5"
    assert schema.AttrSpec("x", "int", minimum=0, maximum=2**31 - 1).range_text() == "≥ 0, ≤ 2147483647"
    assert schema.AttrSpec("x", "ints", minimum=1, maximum=2**31 - 1).range_text() == "each ≥ 1, ≤ 2147483647"
    assert schema.AttrSpec("x", "float", minimum=0.5).range_text() == "≥ 0.5"
    assert schema.AttrSpec("x", "floats", minimum=0.0, exclusive_minimum=True).range_text() == "each > 0"
    assert schema.AttrSpec("x", "float", minimum=0.0, maximum=1e10).range_text() == "≥ 0, ≤ 1e+10"
    assert schema.AttrSpec("x", "int", flag=True, minimum=0, maximum=1).range_text() == "0 or 1"
    assert schema.AttrSpec("x", "string", choices=("a", "b")).range_text() == '"a" \\| "b"'


def test_a_variadic_input_after_fixed_ones_is_collapsed_and_one_that_comes_first_is_kept() -> None:
    """The registered signature of any op the contract may add: fixed inputs followed by a variadic one become one
    heterogeneous variadic input over all their dtypes; a variadic input that comes first stays as it is."""
    from pimoe_export.ops.onnx_schema import _collapse_variadic

    fixed = schema.TensorSpec("a", ("float32",), "[N]")
    second = schema.TensorSpec("b", ("int32",), "[N]")
    variadic = schema.TensorSpec("rest", ("int8",), "", variadic=True)
    collapsed = _collapse_variadic(schema.OpSchema("X", inputs=(fixed, second, variadic), outputs=()))
    assert [(s.name, s.dtypes, s.variadic, s.type_param) for s in collapsed] == [
        ("inputs", ("float32", "int32", "int8"), True, "V")]
    assert collapsed[0].doc == "a, b, rest (see schema.py)"
    first = schema.OpSchema("Y", inputs=(variadic, fixed), outputs=())
    assert _collapse_variadic(first) == first.inputs
    plain = schema.OpSchema("Z", inputs=(fixed, second), outputs=())
    assert _collapse_variadic(plain) == plain.inputs


def test_an_expert_mlp_with_empty_widths_leaves_its_output_width_unknown() -> None:
    """widths[-1] of an empty list is unknown, not an error inside inference (the contract check refuses the node
    with a message later: test_validation.py)."""
    from onnx import AttributeProto

    node = helper.make_node("PiMoEExpertMLP", ["xs", "off"], ["y"], domain="pimoe", expert_ids=[0])
    node.attribute.append(helper.make_attribute("widths", [], attr_type=AttributeProto.INTS))
    types = {"xs": helper.make_tensor_type_proto(TensorProto.FLOAT, [12, 16]),
             "off": helper.make_tensor_type_proto(TensorProto.INT32, [5])}
    out = onnx.shape_inference.infer_node_outputs(built("PiMoEExpertMLP"), node, types)
    dims = out["y"].tensor_type.shape.dim
    assert dims[0].dim_value == 12 and not dims[1].HasField("dim_value") and not dims[1].dim_param
