"""Standard Q/DQ INT8 of a whole model's non-PiMoE Linear layers through onnxruntime.quantization
(pimoe_export/quantize/qdq.py): which nodes it touches, and that the result still computes the model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    from pimoe_export.export.exporter import export_model
    from pimoe_export.hf.feeds import random_feeds
    from pimoe_export.hf.moefy import MoefySettings, moefy
    from pimoe_export.quantize import quantize_model

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=90, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    dense = transformers.BertModel(config).eval()
    feeds = random_feeds(90, 0)
    model, _ = moefy(dense, [{k: torch.from_numpy(v) for k, v in f.items()} for f in feeds],
                     MoefySettings(experts=4, top_k=2, router_epochs=50))
    root = tmp_path_factory.mktemp("qdq")
    example = {k: torch.from_numpy(v[:2]) for k, v in feeds[0].items()}
    fp32 = export_model(model, root / "model.onnx", example).path
    int8 = quantize_model(model, root / "model.int8.onnx", calibration=feeds, fp32_onnx=fp32).onnx_path
    return model, feeds, int8, root


def test_only_the_non_router_linears_become_qdq(graphs) -> None:
    from pimoe_export.quantize.qdq import quantize_linears

    _, feeds, int8, root = graphs
    out = root / "model.int8-qdq.onnx"
    info = quantize_linears(int8, out, feeds)
    before, after = onnx.load(str(int8)), onnx.load(str(out))
    # 2 layers x (query, key, value, attention output) + the pooler; each router's two Linears stay fp32
    assert info["quantized_linears"] == 9 and info["router_nodes_kept_fp32"] > 0
    producer = {o: n for n in after.graph.node for o in n.output}
    inits = {i.name for i in after.graph.initializer}
    router_weights = [n for n in after.graph.node if n.op_type in ("MatMul", "Gemm") and "router" in n.input[1]]
    assert len(router_weights) == 4 and all(n.input[1] in inits for n in router_weights)  # fp32 weights, no DQ
    weighted = [n for n in after.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in producer
                and producer[n.input[1]].op_type == "DequantizeLinear"]
    assert len(weighted) == 9
    # the pimoe ops (INT8 experts) are carried over untouched
    pimoe = [(n.op_type, list(n.input), list(n.attribute)) for n in before.graph.node if n.domain == "pimoe"]
    assert pimoe == [(n.op_type, list(n.input), list(n.attribute)) for n in after.graph.node if n.domain == "pimoe"]
    ours = [{p.key: p.value for p in m.metadata_props if p.key.startswith("pimoe.")} for m in (before, after)]
    assert ours[0] and ours[0] == ours[1]  # interface, configs and contract version travel with the graph


def test_the_qdq_graph_still_computes_the_model(graphs) -> None:
    from pimoe_export.quantize.qdq import quantize_linears
    from pimoe_export.runtime.ort import create_session
    from pimoe_export.validate.metrics import pooled_embedding_cosine

    model, feeds, int8, root = graphs
    out = root / "checked.onnx"
    quantize_linears(int8, out, feeds, method="percentile")
    session = create_session(out)
    test = {"input_ids": np.arange(3 * 9).reshape(3, 9).astype(np.int64) % 90,
            "attention_mask": np.ones((3, 9), np.int64)}
    got = session.run(["last_hidden_state"], test)[0]
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in test.items()}).last_hidden_state.numpy()
    cos = pooled_embedding_cosine(ref, got, test["attention_mask"])
    assert cos.min() > 0.99, cos  # int8 weights and activations in every GEMM of a random tiny model
    assert not np.array_equal(got, session_fp(int8, test))  # the Linears really changed precision


def test_a_graph_with_external_weights_gets_the_same_qdq_graph(graphs) -> None:
    """Large models keep their weights in an external-data file: the Q/DQ pass reads them from there (it folds and
    quantises weight values) and writes the same graph as from the self-contained file."""
    from onnx import numpy_helper

    from pimoe_export.quantize.qdq import quantize_linears

    _, feeds, int8, root = graphs
    external = root / "external"
    external.mkdir()
    onnx.save_model(onnx.load(str(int8)), str(external / "model.int8.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.int8.onnx.data", size_threshold=0)
    assert onnx.load(str(external / "model.int8.onnx"), load_external_data=False).graph.initializer[0].external_data
    quantize_linears(int8, root / "embedded-qdq.onnx", feeds)
    quantize_linears(external / "model.int8.onnx", external / "qdq.onnx", feeds)
    want, got = (onnx.load(str(p)).graph for p in (root / "embedded-qdq.onnx", external / "qdq.onnx"))
    assert [(n.op_type, list(n.input)) for n in got.node] == [(n.op_type, list(n.input)) for n in want.node]
    values = {i.name: numpy_helper.to_array(i) for i in want.initializer}
    assert {i.name for i in got.initializer} == set(values)
    for tensor in got.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor, str(external)), values[tensor.name], tensor.name)


def session_fp(path, feed) -> np.ndarray:
    from pimoe_export.runtime.ort import create_session

    return create_session(path).run(["last_hidden_state"], feed)[0]


def test_bad_calibration_settings_are_refused(graphs, tmp_path) -> None:
    from pimoe_export.errors import PiMoEInputError
    from pimoe_export.quantize.qdq import quantize_linears

    _, feeds, int8, _ = graphs
    with pytest.raises(PiMoEInputError, match="minmax"):
        quantize_linears(int8, tmp_path / "x.onnx", feeds, method="kl")
    with pytest.raises(PiMoEInputError, match=r"^Q/DQ of the Linear layers needs calibration inputs \(feeds of the "
                                              r"graph's inputs\)$"):
        quantize_linears(int8, tmp_path / "x.onnx", [])
    assert not (tmp_path / "x.onnx").exists()


def test_the_qdq_graph_is_symmetric_int8_with_per_channel_weights(graphs) -> None:
    """docs: activations int8 symmetric (static), weights int8 per output channel, symmetric: every zero point is
    0, of int8 (an int32 bias's own dequantisation: int32), and each weight's scale has one entry per output
    channel."""
    from onnx import numpy_helper

    from pimoe_export.quantize.qdq import quantize_linears

    _, feeds, int8, root = graphs
    out = root / "symmetric.onnx"
    quantize_linears(int8, out, feeds)
    graph = onnx.load(str(out)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.domain in ("", "ai.onnx")]
    assert qdq
    for node in qdq:
        zero_point = inits[node.input[2]]
        bias = node.op_type == "DequantizeLinear" and inits.get(node.input[0], np.int8(0)).dtype == np.int32
        assert zero_point.dtype == (np.int32 if bias else np.int8) and not zero_point.any(), (node.name, zero_point)
    consumers = {i: n for n in graph.node for i in n.input}
    weights = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and inits[n.input[0]].dtype == np.int8 and consumers[n.output[0]].op_type in ("MatMul", "Gemm")]
    assert len(weights) == 9
    for node in weights:
        w, scale = inits[node.input[0]], inits[node.input[1]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        assert scale.shape == (w.shape[axis],) and (scale > 0).all()


def _transpose_graph(extra_reader: bool):
    """W [3, 4] read by a Transpose (a Linear's x @ W.T) and, optionally, also by an Add (a tied weight)."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "Wt"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])]
    if extra_reader:
        nodes.append(helper.make_node("Add", ["W", "W"], ["w2"]))
        outputs.append(helper.make_tensor_value_info("w2", TensorProto.FLOAT, [3, 4]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])], outputs,
                              [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), w


@pytest.mark.parametrize("extra_reader", [False, True])
def test_folding_a_weight_transpose_keeps_a_weight_still_read_elsewhere(extra_reader) -> None:
    from onnx import numpy_helper

    from pimoe_export.quantize.qdq import fold_weight_transposes

    model, w = _transpose_graph(extra_reader)
    assert fold_weight_transposes(model) == 1
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert [n.op_type for n in model.graph.node] == (["MatMul", "Add"] if extra_reader else ["MatMul"])
    np.testing.assert_array_equal(inits["Wt"], w.T)
    assert ("W" in inits) == extra_reader  # the untransposed weight goes only when nothing else reads it
    onnx.checker.check_model(model)
