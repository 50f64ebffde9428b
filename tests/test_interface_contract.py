"""pimoe_export.interface: the facts that cross module boundaries, read and written both ways, at their edges: the
pimoe.* metadata of a layer graph and of a whole model (what each encoding holds, what is refused), graph interfaces,
profiles and their (batch, sequence) ranges, the shapes a profile gives every input, and the tolerances of a check.

Known answers are written out here (docs/op_contract.md, docs/precision.md), never read back from the module."""

from __future__ import annotations

import json

import onnx
import pytest

from pimoe_export.errors import ArtifactError
from pimoe_export.interface import (
    META_CONFIG,
    META_CONTRACT,
    META_GRAPH,
    META_INTERFACE,
    META_PRECISION,
    META_QUANT,
    META_WEIGHTS,
    MODEL_TOLERANCES,
    TOLERANCES,
    GraphInterface,
    Profile,
    TensorInterface,
    Tolerances,
    graph_metadata,
    layer_configs,
    layer_interface,
    metadata_props,
    parse_metadata,
    profile_shapes,
    quantization_metadata,
    read_metadata,
    read_onnx,
    tolerances_for,
)

LAYER = {"hidden_size": 16, "top_k": 2, "num_experts": 4}
MODEL_IO = {"inputs": [["input_ids", "int64", ["batch", "sequence"]]],
            "outputs": [["last_hidden_state", "float32", ["batch", "sequence", 16]],
                        ["blocks.0.moe/expert_ids", "int32", ["batch", "sequence", 2]]]}


# ------------------------------------------------------------------------------------------ metadata
def test_the_metadata_of_a_layer_graph() -> None:
    meta = parse_metadata({META_CONFIG: json.dumps(LAYER), META_CONTRACT: "1", META_PRECISION: "w8a8",
                           META_GRAPH: "standard-ops", META_WEIGHTS: "abc", META_QUANT: json.dumps({"mode": "w8a8"})},
                          "x.onnx")
    assert (meta.config, meta.precision, meta.graph, meta.contract_version, meta.weights_sha256) == \
        (LAYER, "w8a8", "standard-ops", 1, "abc")
    assert meta.quantization == {"mode": "w8a8"} and meta.quantized and not meta.is_model
    assert meta.interface == layer_interface(16, 2, "w8a8")
    assert meta.layer_configs == {"": LAYER}


def test_what_a_layer_graphs_metadata_defaults_to() -> None:
    meta = parse_metadata({META_CONFIG: json.dumps(LAYER)}, "x.onnx")
    assert (meta.precision, meta.graph, meta.contract_version, meta.weights_sha256, meta.quantization) == \
        ("fp32", "custom-ops", 0, "", None)
    assert not meta.quantized and meta.model_interface is None
    assert parse_metadata({META_CONFIG: json.dumps(LAYER), META_QUANT: "[1]"}, "x").quantization is None
    assert parse_metadata({META_CONFIG: json.dumps(LAYER), META_PRECISION: "w8a8_dynamic"}, "x").quantized
    assert not parse_metadata({META_CONFIG: json.dumps(LAYER), META_PRECISION: "fp16"}, "x").quantized


def test_the_metadata_of_a_whole_model() -> None:
    layers = {"blocks.0.moe": LAYER, "blocks.1.moe": {**LAYER, "top_k": 1}}
    props = {META_CONFIG: json.dumps({"model": "TinyEncoder", "layers": layers}),
             META_INTERFACE: json.dumps(MODEL_IO)}
    meta = parse_metadata(props, "m.onnx")
    assert meta.is_model and meta.interface == GraphInterface.from_dict(MODEL_IO)
    assert meta.layer_configs == layers
    assert meta.interface.input_names == ("input_ids",)
    for config in ({"model": "M", "layers": [LAYER]}, {"model": "M", "layers": {"a": 3}}, {"model": "M"}):
        with pytest.raises(ArtifactError, match=r"^m\.onnx: a whole-model graph's pimoe\.config must hold its "
                                                r"layers' configs; export it"):
            parse_metadata({**props, META_CONFIG: json.dumps(config)}, "m.onnx")


@pytest.mark.parametrize(("props", "fragment"), [
    ({}, "carries no pimoe.config metadata: it was not written by pimoe-export"),
    ({META_CONFIG: "{"}, "malformed pimoe metadata"),
    ({META_CONFIG: json.dumps(LAYER), META_QUANT: "{"}, "malformed pimoe metadata"),
    ({META_CONFIG: json.dumps(LAYER), META_CONTRACT: "one"}, "malformed pimoe metadata"),
    ({META_CONFIG: "[1]"}, "config must be an object"),
    ({META_CONFIG: json.dumps(LAYER), META_PRECISION: "int4"}, "precision one of"),
    ({META_CONFIG: json.dumps(LAYER), META_GRAPH: "other"}, "graph one of"),
    ({META_CONFIG: json.dumps({"top_k": 2})}, "has no valid 'hidden_size'"),
    ({META_CONFIG: json.dumps({"hidden_size": 16})}, "has no valid 'top_k'"),
    ({META_CONFIG: json.dumps({**LAYER, "hidden_size": 0})}, "has no valid 'hidden_size'"),
    ({META_CONFIG: json.dumps({**LAYER, "top_k": True})}, "has no valid 'top_k'"),
    ({META_CONFIG: json.dumps({**LAYER, "top_k": 2.0})}, "has no valid 'top_k'"),
    ({META_CONFIG: json.dumps({"model": "M", "layers": {"a": LAYER}}), META_INTERFACE: "{"},
     "malformed pimoe.interface metadata"),
    ({META_CONFIG: json.dumps({"model": "M", "layers": {"a": LAYER}}), META_INTERFACE: "{}"},
     "the I/O description must list inputs and outputs"),
])
def test_metadata_that_is_refused(props, fragment) -> None:
    with pytest.raises(ArtifactError) as info:
        parse_metadata(props, "g.onnx")
    assert fragment in str(info.value) and str(info.value).startswith(("g.onnx", "the I/O"))
    if str(info.value).startswith("g.onnx"):
        assert str(info.value).endswith("export it with `pimoe-export export` (or `quantize`)")


def test_the_layer_graph_encoding_round_trips_and_any_other_graph_records_its_layers() -> None:
    text = json.dumps(LAYER)
    assert graph_metadata("PiMoESystem", {"": text}, layer_interface(16, 2, "fp32")) == {META_CONFIG: text}
    assert graph_metadata("PiMoESystem", {"": text}, layer_interface(16, 2, "fp16")) == {META_CONFIG: text}
    # a root layer with another interface (named differently) keeps its interface
    other = GraphInterface.from_dict({"inputs": [["x", "float32", ["batch", "sequence", 16]]],
                                      "outputs": [["y", "float32", ["batch", "sequence", 16]]]})
    props = graph_metadata("Wrapper", {"": text}, other)
    assert json.loads(props[META_CONFIG]) == {"model": "Wrapper", "layers": {"": LAYER}}
    assert GraphInterface.from_dict(json.loads(props[META_INTERFACE])) == other
    props = graph_metadata("M", {"a": text, "b": json.dumps({**LAYER, "top_k": 1})}, other)
    meta = parse_metadata(props, "m")
    assert meta.layer_configs == {"a": LAYER, "b": {**LAYER, "top_k": 1}} and meta.interface == other


def test_layer_configs_of_each_encoding() -> None:
    assert layer_configs(LAYER) == {"": LAYER}
    assert layer_configs({"model": "M", "layers": {"a": LAYER}}) == {"a": LAYER}
    assert layer_configs({"layers": {"a": LAYER}}) == {"": {"layers": {"a": LAYER}}}  # no model: a layer config
    assert layer_configs({"model": "M", "layers": [LAYER]}) == {"": {"model": "M", "layers": [LAYER]}}


def test_quantization_metadata_of_one_layer_and_of_several() -> None:
    one = {"mode": "w8a8", "method": "entropy", "thresholds": {}}
    assert quantization_metadata({"": one}, "4096 tokens") == {**one, "calibration_data": "4096 tokens"}
    two = {"a": one, "b": {**one, "method": "max"}}
    assert quantization_metadata(two, "feeds") == {"mode": "w8a8", "router": "fp32", "layers": two,
                                                   "method": "entropy", "calibration_data": "feeds"}


def test_reading_an_onnx_file(tmp_path, exported_layer) -> None:
    _, path = exported_layer("tiny", 0)
    props = metadata_props(path)
    assert json.loads(props[META_CONFIG])["hidden_size"] == 16 and props[META_CONTRACT] == "2"
    assert read_metadata(path).interface == layer_interface(16, 2, "fp32")
    with pytest.raises(ArtifactError, match=r"missing\.onnx does not exist; write it with `pimoe-export export`"):
        read_onnx(tmp_path / "missing.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x01\x12garbage")
    with pytest.raises(ArtifactError, match=r"bad\.onnx is not a readable ONNX model \(.*\); re-export it"):
        read_onnx(tmp_path / "bad.onnx")
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    with pytest.raises(ArtifactError, match=r"carries no pimoe\.config metadata"):
        read_metadata(tmp_path / "plain.onnx")


# ------------------------------------------------------------------------------------------ interfaces
def test_the_layer_interface() -> None:
    fp32 = layer_interface(16, 2, "fp32")
    assert fp32.to_dict() == {"inputs": [["hidden_states", "float32", ["batch", "sequence", 16]]],
                              "outputs": [["output", "float32", ["batch", "sequence", 16]],
                                          ["expert_ids", "int32", ["batch", "sequence", 2]],
                                          ["expert_weights", "float32", ["batch", "sequence", 2]]]}
    fp16 = layer_interface(8, 3, "fp16")
    assert [t.dtype for t in (*fp16.inputs, *fp16.outputs)] == ["float16", "float16", "int32", "float32"]
    assert [t.dtype for t in layer_interface(8, 3, "w8a8").inputs] == ["float32"]
    assert GraphInterface.from_dict(fp32.to_dict()) == fp32


@pytest.mark.parametrize("data", [None, [], {}, {"inputs": [], "outputs": [["y", "float32", [1]]]},
                                  {"inputs": [["x", "float32", [1]]], "outputs": []},
                                  {"inputs": [["x", "float32", [1]]]}, {"outputs": [["y", "float32", [1]]]},
                                  {"inputs": "x", "outputs": [["y", "float32", [1]]]}])
def test_an_interface_lists_inputs_and_outputs(data) -> None:
    with pytest.raises(ArtifactError, match="the I/O description must list inputs and outputs"):
        GraphInterface.from_dict(data)


@pytest.mark.parametrize("entry", [["x", "float32"], "x", ["x", "float64", [1]], ["", "float32", [1]],
                                   [3, "float32", [1]], ["x", "float32", 5], ["x", "float32", ["a", "b2", 1.5j]]])
def test_a_malformed_tensor_entry_is_refused(entry) -> None:
    with pytest.raises(ArtifactError, match="malformed I/O entry"):
        TensorInterface.from_list(entry)


def test_tensor_entries_keep_axis_names_and_sizes() -> None:
    t = TensorInterface.from_list(["x", "int8", ["batch", "7", 3]])
    assert t == TensorInterface("x", "int8", ("batch", "7", 3)) and t.to_list() == ["x", "int8", ["batch", "7", 3]]
    assert TensorInterface.from_list(["b", "bool", [2.0]]).dims == (2,)


# ------------------------------------------------------------------------------------------ profiles
@pytest.mark.parametrize("shapes", [((1, 1), (1, 1), (1, 1)), ((1, 2), (3, 4), (5, 6)), ((2, 2), (2, 2), (9, 2))])
def test_profiles_with_min_le_opt_le_max_on_each_axis(shapes) -> None:
    profile = Profile(*shapes)
    assert Profile.from_dict(profile.to_dict()) == profile
    assert profile.to_dict() == {"min_shape": list(shapes[0]), "opt_shape": list(shapes[1]),
                                 "max_shape": list(shapes[2])}


@pytest.mark.parametrize(("shapes", "fragment"), [
    (((0, 1), (1, 1), (1, 1)), "batch range must satisfy 1 <= min <= opt <= max, got 0, 1, 1"),
    (((1, 0), (1, 1), (1, 1)), "sequence range must satisfy 1 <= min <= opt <= max, got 0, 1, 1"),
    (((2, 1), (1, 1), (4, 1)), "batch range must satisfy 1 <= min <= opt <= max, got 2, 1, 4"),
    (((1, 1), (5, 1), (4, 1)), "batch range must satisfy 1 <= min <= opt <= max, got 1, 5, 4"),
    (((1, 1), (1, 9), (1, 8)), "sequence range must satisfy 1 <= min <= opt <= max, got 1, 9, 8"),
    (((1, 1), (1, 1), (1,)), "a profile is three (batch, sequence) pairs of integers"),
    (((1, 1), (1, 1), (1, 1, 1)), "a profile is three (batch, sequence) pairs of integers"),
    (((1, 1), (True, 1), (2, 2)), "a profile is three (batch, sequence) pairs of integers"),
    (((1, 1), (1.0, 1), (2, 2)), "a profile is three (batch, sequence) pairs of integers"),
])
def test_profiles_that_are_refused(shapes, fragment) -> None:
    with pytest.raises(ArtifactError) as info:
        Profile(*shapes)
    assert fragment in str(info.value)


def test_a_profile_holds_its_edges_and_nothing_past_them() -> None:
    profile = Profile((2, 3), (4, 8), (8, 64))
    for batch, sequence in ((2, 3), (8, 64), (2, 64), (8, 3), (5, 10)):
        assert profile.check(batch, sequence) == ""
    for batch, sequence in ((1, 3), (9, 64), (2, 2), (8, 65)):
        assert profile.check(batch, sequence) == (f"input [batch={batch}, sequence={sequence}] is outside this "
                                                  "unit's profile [2..8] x [3..64]")


@pytest.mark.parametrize("data", [None, {}, {"min_shape": [1, 1], "opt_shape": [1, 1]},
                                  {"min_shape": [1, "a"], "opt_shape": [1, 1], "max_shape": [1, 1]},
                                  {"min_shape": 1, "opt_shape": [1, 1], "max_shape": [1, 1]}])
def test_a_malformed_profile_record(data) -> None:
    with pytest.raises(ArtifactError, match="malformed profile"):
        Profile.from_dict(data)


def test_profile_shapes_put_batch_and_sequence_on_the_named_axes() -> None:
    interface = GraphInterface.from_dict({
        "inputs": [["ids", "int64", ["batch", "sequence"]], ["h", "float32", ["sequence", 4, "batch"]]],
        "outputs": [["y", "float32", ["batch", 1]]]})
    assert profile_shapes(Profile((1, 2), (3, 4), (5, 6)), interface) == {
        "ids": ((1, 2), (3, 4), (5, 6)), "h": ((2, 4, 1), (4, 4, 3), (6, 4, 5))}
    odd = GraphInterface.from_dict({"inputs": [["x", "float32", ["batch", "width"]]],
                                    "outputs": [["y", "float32", [1]]]})
    with pytest.raises(ArtifactError, match=r"input x has an axis the profile does not cover: \('batch', 'width'\)"):
        profile_shapes(Profile((1, 1), (1, 1), (1, 1)), odd)


# ------------------------------------------------------------------------------------------ tolerances
def test_the_tolerances_of_each_precision_and_of_whole_models() -> None:
    assert (TOLERANCES["fp32"].rtol, TOLERANCES["fp32"].min_cosine, TOLERANCES["fp32"].min_routing_agreement) == \
        (1e-5, 0.999999, 1.0)
    assert (TOLERANCES["fp16"].check_error_stat, TOLERANCES["fp16"].error_quantile) == ("quantile", 0.98)
    assert TOLERANCES["w8a8"].rtol == 5e-2 and TOLERANCES["w8a8_dynamic"] is TOLERANCES["w8a8"]
    assert tolerances_for("w8a8", moe_layers=1) is TOLERANCES["w8a8"]
    assert tolerances_for("w8a8", moe_layers=2) is MODEL_TOLERANCES["w8a8"]
    assert tolerances_for("w8a8_dynamic", moe_layers=3) is MODEL_TOLERANCES["w8a8"]
    assert tolerances_for("fp32", moe_layers=5) is TOLERANCES["fp32"]  # no whole-model fp32 criteria
    assert tolerances_for("fp16", moe_layers=2) is TOLERANCES["fp16"]
    model = MODEL_TOLERANCES["w8a8"]
    assert (model.min_cosine, model.min_routing_agreement, model.min_embedding_cosine, model.error_quantile) == \
        (0.995, 0.90, 0.999, 0.95)
    assert TOLERANCES["fp32"].to_dict()["check_error_stat"] == "elemwise"


def test_every_documented_tolerance_value_is_the_one_a_check_applies() -> None:
    """docs/precision.md, field by field. fp32: max |error| <= 1e-5 · max|ref| (and rtol 1e-5), cosine 0.999999,
    routing 100%, every element. fp16: a quantile check, 98% of elements within rtol/atol 1e-2 · max|ref|, cosine
    >= 0.999, routing >= 98%. INT8: cosine >= 0.999, routing 100%, 99% of elements within 5e-2 · max|ref|. Whole
    models in INT8: 95% of elements within 1e-1 · max|ref|, cosine >= 0.995, routing >= 90% in every layer, mean
    pooled-embedding cosine >= 0.999. A loosened threshold never fails a passing check, so only its value holds it."""
    assert TOLERANCES["fp32"] == Tolerances(rtol=1e-5, atol_rel=1e-5, min_cosine=0.999999, min_routing_agreement=1.0,
                                            check_error_stat="elemwise", error_quantile=0.99)
    assert TOLERANCES["fp16"] == Tolerances(rtol=1e-2, atol_rel=1e-2, min_cosine=0.999, min_routing_agreement=0.98,
                                            check_error_stat="quantile", error_quantile=0.98)
    int8 = Tolerances(rtol=5e-2, atol_rel=5e-2, min_cosine=0.999, min_routing_agreement=1.0,
                      check_error_stat="quantile", error_quantile=0.99)
    assert TOLERANCES["w8a8"] == int8 and TOLERANCES["w8a8_dynamic"] == int8
    model = Tolerances(rtol=1e-1, atol_rel=1e-1, min_cosine=0.995, min_routing_agreement=0.90,
                       check_error_stat="quantile", error_quantile=0.95, min_embedding_cosine=0.999)
    assert MODEL_TOLERANCES["w8a8"] == model and MODEL_TOLERANCES["w8a8_dynamic"] == model
    for tolerances in (*TOLERANCES.values(), *MODEL_TOLERANCES.values()):
        if tolerances is not MODEL_TOLERANCES["w8a8"]:
            assert tolerances.min_embedding_cosine is None  # no bar of its own: pooled embeddings use min_cosine
