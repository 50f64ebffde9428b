"""What an export writes besides the computation: the graph kind, precision and exporter record in its metadata, the
opsets, the outputs a whole model exports with and without routing, its validation, and the exporter's own checks
of dynamic axes and sequence rewrites. Each against the graph file itself or a hand-built graph."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pimoe_export.errors import PiMoEExportError
from pimoe_export.export.exporter import export_model, export_onnx, validate_onnx, weights_fingerprint
from pimoe_export.export.tracing import axes_of, split_sequences
from pimoe_export.interface import META_EXPORTER, META_INTERFACE, META_WEIGHTS, read_metadata


def test_the_exporter_record_and_the_opsets(exported_layer) -> None:
    model, path = exported_layer("tiny", 0)
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props[META_EXPORTER]) == {"torch": torch.__version__, "onnx": onnx.__version__}
    assert props[META_WEIGHTS] == weights_fingerprint(model)
    assert proto.producer_name == "pimoe-export"
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    assert {o.domain: o.version for o in proto.opset_import}["pimoe"] == 2
    meta = read_metadata(path)
    assert (meta.graph, meta.precision, meta.contract_version) == ("custom-ops", "fp32", 2)


def test_an_fp16_export_is_an_fp16_graph(exported_layer) -> None:
    _, path = exported_layer("tiny", 0, "fp16")
    proto = onnx.load(str(path))
    assert read_metadata(path).precision == "fp16"
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16


def test_a_standard_ops_export_says_so_and_holds_no_pimoe_node(exported_layer, tmp_path) -> None:
    model, _ = exported_layer("tiny", 0)
    result = export_onnx(model, tmp_path / "std.onnx", standard_ops=True)
    assert result.graph == "standard-ops" and result.precision == "fp32"
    meta = read_metadata(result.path)
    assert meta.graph == "standard-ops" and meta.precision == "fp32"
    proto = onnx.load(str(result.path))
    assert not any(n.domain == "pimoe" for n in proto.graph.node)
    assert not any(o.domain == "pimoe" for o in proto.opset_import)
    assert not any(k.startswith("pimoe::") for k in result.node_counts)


class TwoOutputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from pimoe_export.model.factory import create_from_preset

        self.moe = create_from_preset("tiny", seed=2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.moe(x)
        return {"y": y, "total": y.sum(-1)}


@pytest.mark.parametrize("routing", [False, True])
def test_routing_outputs_only_when_asked(tmp_path, capfd, routing) -> None:
    kwargs = {"routing_outputs": True} if routing else {}
    capfd.readouterr()
    result = export_model(TwoOutputs().eval(), tmp_path / "m.onnx", {"x": torch.randn(2, 3, 16)}, **kwargs)
    assert capfd.readouterr().out == ""  # the exporter's own progress lines stay quiet (the CLI prints its own)
    names = [o.name for o in onnx.load(str(result.path)).graph.output]
    assert names == (["y", "total", "moe/expert_ids", "moe/expert_weights"] if routing else ["y", "total"])
    assert list(read_metadata(result.path).interface.output_names) == names


def test_source_metadata_cannot_replace_the_exporters_keys(tmp_path) -> None:
    """A source may add metadata (a decoder's description), never overwrite what the exporter records."""
    example = {"x": torch.randn(2, 3, 16)}
    result = export_model(TwoOutputs().eval(), tmp_path / "m.onnx", example, metadata={"pimoe.extra": "1"})
    props = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert props["pimoe.extra"] == "1" and META_INTERFACE in props
    with pytest.raises(PiMoEExportError, match=rf"replace the exporter's own keys \['{META_INTERFACE}'\]"):
        export_model(TwoOutputs().eval(), tmp_path / "n.onnx", example, metadata={META_INTERFACE: "{}"})
    assert not (tmp_path / "n.onnx").exists()


def test_a_decoder_graph_records_the_decoders_spec(tiny_decoder, tmp_path) -> None:
    """export_source writes the decoder's description (pimoe.decoder: what makes a unit built from the graph a
    decoder unit, with its KV cache and client files), equal to the spec of the model loaded on its own."""
    from pimoe_export.export.exporter import export_source
    from pimoe_export.hf.decoder import load_decoder
    from pimoe_export.hf.importers import load_source
    from pimoe_export.interface import META_DECODER

    directory = tiny_decoder("qwen3_moe")
    result = export_source(load_source(directory), tmp_path / "model.onnx")
    props = {p.key: p.value for p in onnx.load(str(result.path), load_external_data=False).metadata_props}
    spec = load_decoder(directory).spec
    assert spec is not None and json.loads(props[META_DECODER]) == spec.to_dict()
    assert read_metadata(result.path).decoder == spec


def test_validation_runs_the_full_check() -> None:
    """A graph whose declared output type contradicts what its node computes passes the structural check but not
    the full one (type inference): the export is refused."""
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)  # structurally fine
    with pytest.raises(PiMoEExportError, match=r"^the exported ONNX failed validation: .*Inferred elem type differs"):
        validate_onnx(model)
    node = helper.make_node("PiMoERoute", ["x"], ["w", "i"], domain="pimoe", k=0)
    bad = helper.make_model(helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                         [2, 4])], []))
    with pytest.raises(PiMoEExportError, match=r"^the exported ONNX breaks the op contract: .*attribute k must be "
                                               r">= 1, got 0"):
        validate_onnx(bad)


@pytest.mark.parametrize("axes", [{2: "seq"}, {-1: "seq"}, {5: "x"}])
def test_dynamic_axes_must_be_axes_of_the_input(axes) -> None:
    with pytest.raises(PiMoEExportError, match=r"dynamic_axes\['ids'\] names axes .* of a 2-d input"):
        axes_of({"ids": torch.zeros(2, 3, dtype=torch.long)}, {"ids": axes})
    specs, named = axes_of({"ids": torch.zeros(2, 3, dtype=torch.long)}, {"ids": {0: "batch", 1: "sequence"}})
    assert named == {"ids": {0: "batch", 1: "sequence"}} and set(specs[0]) == {0, 1}


def sequence_graph(split, consumers=(0, 1), length=6) -> onnx.ModelProto:
    """x [length, 2] -> SplitToSequence(split) -> SequenceAt(i) for i in consumers -> outputs y_i."""
    nodes = [helper.make_node("SplitToSequence", ["x", "split"], ["seq"], axis=0)]
    inits = [numpy_helper.from_array(np.asarray(split, np.int64), "split")]
    outputs = []
    for i in consumers:
        inits.append(numpy_helper.from_array(np.asarray(i, np.int64), f"i{i}"))
        nodes.append(helper.make_node("SequenceAt", ["seq", f"i{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [length, 2])],
                              outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize(("split", "consumers", "sizes"), [(2, (0, 2), [2, 2, 2]), ([1, 5], (0, 1), [1, 5]),
                                                           (4, (1,), [4, 2])])
def test_split_to_sequence_becomes_one_split(split, consumers, sizes) -> None:
    """TensorRT's parser has no sequence types: a constant split and constant positions become Split + Identity,
    with the same values (onnx.reference runs both)."""
    from onnx.reference import ReferenceEvaluator

    model = sequence_graph(split, consumers)
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    before = ReferenceEvaluator(model).run(None, {"x": x})
    assert split_sequences(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["Split"] + ["Identity"] * len(consumers)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert inits["seq__sizes"].tolist() == sizes
    after = ReferenceEvaluator(model).run(None, {"x": x})
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_sequence_that_cannot_be_resolved_is_left_alone() -> None:
    model = sequence_graph(2, (0,))
    model.graph.node[1].input[1] = "x"  # a position that is not a constant
    assert split_sequences(model) == 0
    assert [n.op_type for n in model.graph.node] == ["SplitToSequence", "SequenceAt"]


def test_an_export_without_the_pimoe_opset_import_gets_it(exported_layer, tmp_path) -> None:
    """finish_export adds the pimoe opset import where the exporter left it out (a custom-op graph needs it to be
    valid ONNX at all), at the contract's opset version."""
    import time

    from pimoe_export.export.exporter import finish_export
    from pimoe_export.ops import schema

    model, path = exported_layer("tiny", 0)
    proto = onnx.load(str(path))
    kept = [o for o in proto.opset_import if o.domain != schema.DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    result = finish_export(proto, tmp_path / "again.onnx", model, "custom-ops", "fp32", {}, time.perf_counter())
    written = onnx.load(str(result.path))
    assert {o.domain: o.version for o in written.opset_import} == {"": 18, schema.DOMAIN: schema.OPSET_VERSION}
    onnx.checker.check_model(written)


def test_an_fp32_export_shares_the_models_weights_and_fp16_copies_them() -> None:
    """The fp32 module traced for export holds the host model's own parameters and buffers outside its MoE layers
    (a large model is not held twice); the fp16 one has its own half copies and leaves the model's untouched."""
    from test_whole_model import TinyEncoder

    from pimoe_export.export.tracing import prepare_for_export

    model = TinyEncoder().eval()
    mine = {t.data_ptr() for t in (*model.parameters(), *model.buffers())}

    def host_tensors(module: torch.nn.Module, layers) -> list[torch.Tensor]:
        named = [*module.named_parameters(), *module.named_buffers()]
        return [t for name, t in named if t.numel() and not any(name.startswith(f"{p}.") for p in layers)]

    work, layers, _ = prepare_for_export(model, "fp32")
    host = host_tensors(work, layers)
    assert host and all(t.data_ptr() in mine for t in host)
    half, layers, _ = prepare_for_export(model, "fp16")
    host = host_tensors(half, layers)
    assert any(t.dtype == torch.float16 for t in host)
    assert not any(t.data_ptr() in mine for t in host)
    assert all(t.dtype == torch.float32 for t in model.parameters())


def test_the_exported_layer_refuses_routing_info_by_name() -> None:
    from pimoe_export.export.tracing import prepare_for_export
    from pimoe_export.model.factory import create_from_preset

    work, layers, _ = prepare_for_export(create_from_preset("tiny", seed=1), "fp32")
    (path,) = layers
    with pytest.raises(PiMoEExportError) as info:
        work(torch.zeros(1, 2, 16), return_routing_info=True)
    assert str(info.value) == (f"{path}: the model asks the PiMoE layer for routing info/metrics; export with "
                               "routing_outputs=True instead and call the layer with hidden states only")


def test_output_axes_that_sum_input_axes_take_the_matching_input_axis_name() -> None:
    """name_output_axes: an output axis the exporter wrote as a sum of input axes (a decoder's present:
    ``sequence + past_sequence``) takes the one input axis name of that size in the example (``total_sequence``);
    a sum with a symbol that is no input axis, a single symbol and an output the model did not return keep
    their form (hand-built graph, hand-written example sizes)."""
    from pimoe_export.export.tracing import name_output_axes

    def value(name: str, dims: list) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    inputs = [value("x", ["batch", "sequence"]), value("past", ["batch", "past_sequence"]),
              value("mask", ["batch", "total_sequence"])]
    outputs = [value("present", ["batch", "sequence + past_sequence"]), value("odd", ["batch", "sequence + s9"]),
               value("single", ["s4", "sequence"]), value("extra", ["batch", "sequence + past_sequence"])]
    proto = helper.make_model(helper.make_graph([], "g", inputs, outputs))
    example = {"x": torch.zeros(2, 3), "past": torch.zeros(2, 4), "mask": torch.zeros(2, 7)}
    axes = {"x": {0: "batch", 1: "sequence"}, "past": {0: "batch", 1: "past_sequence"},
            "mask": {0: "batch", 1: "total_sequence"}}
    returned = [torch.zeros(2, 7), torch.zeros(2, 3), torch.zeros(5, 3)]
    name_output_axes(proto, returned, ["present", "odd", "single"], example, axes)
    dims = {o.name: [d.dim_param for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert dims == {"present": ["batch", "total_sequence"], "odd": ["batch", "sequence + s9"],
                    "single": ["s4", "sequence"], "extra": ["batch", "sequence + past_sequence"]}


def test_a_standard_ops_graph_has_the_custom_op_graphs_outputs_and_dtypes(exported_layer, tmp_path) -> None:
    """docs/architecture.md: every graph of a layer has the layer interface (`output`, `expert_ids`,
    `expert_weights`); the op contract's ids are int32. The standard-op export (TopK, experts evaluated densely) is
    a drop-in for the custom-op one: the same output names and element types, and the same ids when run."""
    import onnxruntime as ort

    model, custom = exported_layer("tiny", 0)
    standard = tmp_path / "standard.onnx"
    export_onnx(model, standard, standard_ops=True)

    def outputs(path) -> list[tuple[str, int]]:
        return [(o.name, o.type.tensor_type.elem_type) for o in onnx.load(str(path)).graph.output]

    assert outputs(standard) == outputs(custom) == [("output", TensorProto.FLOAT), ("expert_ids", TensorProto.INT32),
                                                    ("expert_weights", TensorProto.FLOAT)]
    x = np.random.default_rng(3).standard_normal((2, 5, 16)).astype(np.float32)
    ids = ort.InferenceSession(str(standard), providers=["CPUExecutionProvider"]).run(["expert_ids"],
                                                                                        {"hidden_states": x})[0]
    with torch.no_grad():
        _, info = model(torch.from_numpy(x), return_routing_info=True)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, info.ids.numpy())


def test_a_source_without_a_standard_op_graph_refuses_standard_ops(tmp_path) -> None:
    """Only a PiMoE layer has a standard-op form (TopK and dense experts); a MoE block's source offers none, so
    export_source with standard_ops=True names that and the way out, and writes nothing (instead of a graph that
    still holds pimoe ops under a standard-ops label)."""
    from pimoe_export.export.exporter import export_source
    from pimoe_export.model.moe_block import ExpertsConfig, MoEBlock, MoEBlockConfig
    from pimoe_export.model.source import layer_source

    block = MoEBlock(MoEBlockConfig(hidden_size=8, num_experts=4, top_k=2, experts=ExpertsConfig(4))).eval()
    source = layer_source(block)
    assert source.standard_ops is False
    with pytest.raises(PiMoEExportError, match=r"offers no standard-op graph\); drop standard_ops"):
        export_source(source, tmp_path / "m.onnx", standard_ops=True)
    assert list(tmp_path.iterdir()) == []
