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


def session_fp(path, feed) -> np.ndarray:
    from pimoe_export.runtime.ort import create_session

    return create_session(path).run(["last_hidden_state"], feed)[0]


def test_bad_calibration_settings_are_refused(graphs, tmp_path) -> None:
    from pimoe_export.errors import PiMoEInputError
    from pimoe_export.quantize.qdq import quantize_linears

    _, feeds, int8, _ = graphs
    with pytest.raises(PiMoEInputError, match="minmax"):
        quantize_linears(int8, tmp_path / "x.onnx", feeds, method="kl")
    with pytest.raises(PiMoEInputError, match="calibration inputs"):
        quantize_linears(int8, tmp_path / "x.onnx", [])
    assert not (tmp_path / "x.onnx").exists()
