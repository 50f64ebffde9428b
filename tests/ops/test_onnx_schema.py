"""ONNX type and shape inference for the pimoe ops (generated from ops/schema.py's symbolic shapes): strict
inference types every output of a graph stripped of its value_info, and plain `onnx` (no schemas) still checks it."""

from __future__ import annotations

import subprocess
import sys

import onnx
import pytest
from onnx import TensorProto, helper

from pimoe_export.ops.onnx_schema import register_onnx_schemas

register_onnx_schemas()


def dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value_info.type.tensor_type.shape.dim]


def infer_static(nodes, inputs, outputs) -> dict[str, tuple[int, list]]:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("pimoe", 1)])
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, check_type=True)
    found = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
    return {n: (found[n].type.tensor_type.elem_type, dims(found[n])) for n in outputs}


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_static_shapes_follow_the_contract(dtype) -> None:
    """N = 6 tokens, E = 4, k = 2, H = 16, one group with widths 16 -> 32 -> 8."""
    nodes = [
        helper.make_node("PiMoERoute", ["logits", "bias"], ["w", "ids"], domain="pimoe", k=2, normalize=1,
                         scoring="softmax"),
        helper.make_node("PiMoEDispatch", ["x", "ids"], ["xs", "off", "f2s"], domain="pimoe", num_experts=4),
        helper.make_node("PiMoEExpertMLP", ["xs", "off", "w0", "b0", "w1", "b1"], ["ys"], domain="pimoe",
                         expert_ids=[0, 1, 2, 3], widths=[16, 32, 8], activation="gelu", layer_norm=0, eps=1e-5,
                         quant_mode="none"),
        helper.make_node("PiMoECombine", ["ys", "f2s", "w"], ["y"], domain="pimoe"),
    ]
    inputs = [("logits", dtype, [6, 4]), ("bias", TensorProto.FLOAT, [4]), ("x", dtype, [6, 16]),
              ("w0", dtype, [4, 32, 16]), ("b0", TensorProto.FLOAT, [4, 32]), ("w1", dtype, [4, 8, 32]),
              ("b1", TensorProto.FLOAT, [4, 8])]
    got = infer_static(nodes, inputs, ["w", "ids", "xs", "off", "f2s", "ys", "y"])
    assert got == {
        "w": (TensorProto.FLOAT, [6, 2]), "ids": (TensorProto.INT32, [6, 2]),
        "xs": (dtype, [12, 16]), "off": (TensorProto.INT32, [5]), "f2s": (TensorProto.INT32, [12]),
        "ys": (dtype, [12, 8]), "y": (dtype, [6, 8]),
    }


def test_symbolic_token_count_is_kept_and_products_left_unknown() -> None:
    nodes = [helper.make_node("PiMoEDispatch", ["x", "ids"], ["xs", "off", "f2s"], domain="pimoe", num_experts=8)]
    got = infer_static(nodes, [("x", TensorProto.FLOAT, ["N", 16]), ("ids", TensorProto.INT32, ["N", 2])],
                       ["xs", "off", "f2s"])
    assert got["off"] == (TensorProto.INT32, [9])
    assert got["xs"][1][1] == 16 and got["xs"][1][0] != "N"  # N*k is not N: unknown, never a wrong name


def test_an_untyped_input_leaves_only_the_outputs_it_types_unknown() -> None:
    """x comes from an op ONNX does not know, so x_sorted's type is unknown; the index outputs, int32 by the
    contract with shapes from ids, are still inferred (an earlier untyped output does not stop the rest)."""
    nodes = [helper.make_node("Mystery", ["raw"], ["x"], domain="vendor"),
             helper.make_node("PiMoEDispatch", ["x", "ids"], ["xs", "off", "f2s"], domain="pimoe", num_experts=8)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("raw", TensorProto.FLOAT, [6, 16]),
                                           helper.make_tensor_value_info("ids", TensorProto.INT32, [6, 2])],
                              [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None)
                               for n in ("xs", "off", "f2s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("pimoe", 1),
                                                    helper.make_opsetid("vendor", 1)])
    inferred = onnx.shape_inference.infer_shapes(model)
    found = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
    assert found["off"].type.tensor_type.elem_type == TensorProto.INT32 and dims(found["off"]) == [9]
    assert found["f2s"].type.tensor_type.elem_type == TensorProto.INT32 and dims(found["f2s"]) == [12]
    assert found["xs"].type.tensor_type.elem_type == TensorProto.UNDEFINED


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    from pimoe_export.export.exporter import export_onnx
    from pimoe_export.model.factory import create_from_preset
    from pimoe_export.quantize import quantize_model

    root = tmp_path_factory.mktemp("inference")
    model = create_from_preset("seed-types", seed=2).eval()
    paths = {}
    for precision in ("fp32", "fp16"):
        paths[precision] = export_onnx(model, root / f"{precision}.onnx", precision=precision).path
    quantize_model(model, root / "int8.onnx")
    paths["int8"] = root / "int8.onnx"
    return paths


@pytest.mark.parametrize("kind", ["fp32", "fp16", "int8"])
def test_strict_inference_on_a_stripped_graph_types_every_output(graphs, kind) -> None:
    model = onnx.load(str(graphs[kind]))
    declared = {o.name: (o.type.tensor_type.elem_type, dims(o)) for o in model.graph.output}
    del model.graph.value_info[:]
    for output in model.graph.output:
        output.type.tensor_type.ClearField("shape")
        output.type.tensor_type.elem_type = TensorProto.UNDEFINED
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, check_type=True)
    values = {v.name: v for v in inferred.graph.value_info}
    for output in inferred.graph.output:
        elem, want = declared[output.name]
        got = dims(output)
        assert output.type.tensor_type.elem_type == elem, output.name
        assert len(got) == len(want), (output.name, got, want)
        assert all(g == w for g, w in zip(got, want, strict=True) if isinstance(g, int) and isinstance(w, int))
    for node in inferred.graph.node:  # every pimoe output typed, widths where the contract fixes them
        if node.domain == "pimoe":
            for name in node.output:
                assert values[name].type.tensor_type.elem_type != TensorProto.UNDEFINED, (node.op_type, name)
            if node.op_type == "PiMoEExpertMLP":
                widths = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "widths")
                assert dims(values[node.output[0]])[1] == widths[-1]


def test_plain_onnx_without_our_schemas_still_checks_the_graph(graphs) -> None:
    code = ("import onnx, sys; onnx.checker.check_model(sys.argv[1], full_check=True); "
            "print(len(onnx.load(sys.argv[1]).graph.output))")
    for path in graphs.values():
        result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and result.stdout.strip() == "3", result.stderr[-2000:]


def infer_v2(nodes, inputs, outputs, opset: int = 2):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("pimoe", opset)])
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, check_type=True)
    found = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
    return {n: (found[n].type.tensor_type.elem_type, dims(found[n])) for n in outputs}, inferred


def v2_nodes():
    return [
        helper.make_node("PiMoERoute", ["logits"], ["w", "ids"], domain="pimoe", k=2, scoring="sigmoid",
                         routed_scaling_factor=2.5),
        helper.make_node("PiMoEDispatch", ["x", "ids"], ["xs", "off", "f2s"], domain="pimoe", num_experts=4),
        helper.make_node("PiMoEExpertMLP", ["xs", "off", "w0", "w1"], ["ys"], domain="pimoe", expert_ids=[0, 1, 2, 3],
                         widths=[16, 32, 8], activation="swiglu_oai", layer_norm=0, gated=1, bias=0, limit=5.0),
        helper.make_node("PiMoECombine", ["ys", "f2s", "w"], ["y"], domain="pimoe", order="expert"),
    ]


V2_INPUTS = [("logits", TensorProto.FLOAT, [6, 4]), ("x", TensorProto.FLOAT, [6, 16]),
             ("w0", TensorProto.FLOAT, [4, 64, 16]), ("w1", TensorProto.FLOAT, [4, 8, 32])]


def test_contract_v2_nodes_are_typed_and_checked() -> None:
    """Opset 2: a bias-free route input list, gated rows [gate; up] (y_sorted keeps widths[-1]), the combine order."""
    got, model = infer_v2(v2_nodes(), V2_INPUTS, ["w", "ids", "ys", "y"])
    assert got == {"w": (TensorProto.FLOAT, [6, 2]), "ids": (TensorProto.INT32, [6, 2]),
                   "ys": (TensorProto.FLOAT, [12, 8]), "y": (TensorProto.FLOAT, [6, 8])}
    onnx.checker.check_model(model, full_check=True)


def test_v2_attributes_are_unknown_to_the_opset_1_schema() -> None:
    """The registered opset-1 schemas are v1's: the checker refuses a v2 attribute in a graph importing pimoe 1."""
    _, model = infer_v2(v2_nodes(), V2_INPUTS, ["y"], opset=1)
    with pytest.raises(onnx.checker.ValidationError, match="Unrecognized attribute"):
        onnx.checker.check_model(model, full_check=True)
