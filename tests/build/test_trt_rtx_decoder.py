"""TensorRT-RTX 1.7 ahead-of-time builds of the MoE decoder graphs (CI rung 5, no GPU): the fp32 decoder and its
W8A8-dynamic variant, each with the two optimisation profiles of interface.decoder_profiles (prefill: a prompt with
an empty past; decode: one token per row with a past up to the context). TensorRT's parser turns every pimoe node into
our IPluginV3 plugins (four per MoE layer), the KV-cache inputs keep their head counts and head dims (DeepSeek's
values: their own), and the INT8 plan carries the experts as int8.
"""

from __future__ import annotations

import onnx
import pytest
from decoders import FAMILIES, int8_unit
from onnx import numpy_helper

from pimoe_export.artifacts.manifest import read_manifest
from pimoe_export.build import engine_builder as D
from pimoe_export.errors import BackendUnavailableError, PluginLoadError
from pimoe_export.interface import DECODER_LOGITS, MODEL_IDS_INPUT, decoder_profiles
from pimoe_export.ops import schema

pytestmark = [pytest.mark.trt, pytest.mark.slow]
MOE_FAMILIES = sorted(FAMILIES)


@pytest.fixture(scope="module")
def plugin():
    from pimoe_export.native import libraries as L
    from pimoe_export.native import tensorrt_loader as T

    try:
        library = L.find_plugin_library()
    except PluginLoadError as exc:
        pytest.skip(f"plugin library not built (no nvcc?): {exc}")
    try:
        T.import_tensorrt("rtx")
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    return library


def expert_bytes(path, dtype: int) -> int:
    proto = onnx.load(str(path))
    names = {i for n in proto.graph.node if n.op_type == schema.EXPERT_MLP for i in n.input}
    return sum(numpy_helper.to_array(t).nbytes for t in proto.graph.initializer
               if t.name in names and t.data_type == dtype)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_fp32_and_int8_decoder_engines_build_with_prefill_and_decode_profiles(plugin, decoder_cases,
                                                                             family) -> None:
    case = decoder_cases(family)
    int8 = int8_unit(case)
    spec = read_manifest(case.unit).decoder_spec
    assert spec is not None
    prefill, decode = decoder_profiles(spec, max_batch=8, max_prompt=512)
    assert prefill.shapes[MODEL_IDS_INPUT][2] == (8, 512) and decode.shapes[MODEL_IDS_INPUT][2] == (8, 1)
    nodes = [n.op_type for n in onnx.load(str(case.unit / "model.onnx")).graph.node]
    moe_layers = nodes.count(schema.ROUTE)  # a shared expert is one more PiMoEExpertMLP group of its layer
    expert_groups = nodes.count(schema.EXPERT_MLP)
    assert moe_layers and expert_groups >= moe_layers
    plans = {}
    for precision, path in (("fp32", case.unit / "model.onnx"), ("int8", int8 / "model.onnx")):
        seen: list[int] = []
        plan, summary = D.build_engine(path, plugin, profiles=[prefill.shapes, decode.shapes],
                                       compute_capabilities=("SM89",), configure=lambda trt, builder, config,
                                       seen=seen: seen.append(config.num_optimization_profiles))
        assert seen == [2]
        assert summary.plugin_counts() == {schema.ROUTE: moe_layers, schema.DISPATCH: moe_layers,
                                           schema.EXPERT_MLP: expert_groups, schema.COMBINE: moe_layers}
        inputs = {name: (dtype, shape) for name, dtype, shape in summary.inputs}
        # the cache: [batch, kv heads, past, head dim], fp32 (DeepSeek's values: a head dim of their own)
        for name, dim in zip(spec.past_names, spec.cache_head_dims, strict=True):
            assert inputs[name] == ("FLOAT", (-1, spec.num_kv_heads, -1, dim))
        outputs = [o[0] for o in summary.outputs]  # the decoder I/O, then each MoE layer's routing
        assert outputs[: 1 + len(spec.present_names)] == [DECODER_LOGITS, *spec.present_names]
        assert len(outputs) == 1 + len(spec.present_names) + 2 * moe_layers, outputs
        plans[precision] = plan
    # the experts as int8 in the INT8 plan: it is smaller by at least half of what int8 saves over fp32
    saved = expert_bytes(case.unit / "model.onnx", onnx.TensorProto.FLOAT) - \
        expert_bytes(int8 / "model.onnx", onnx.TensorProto.INT8)
    assert saved > 0 and len(plans["fp32"]) - len(plans["int8"]) > saved // 2


def test_a_tensorrt_rtx_decoder_unit_records_its_profiles_and_cache_io(plugin, decoder_cases, tmp_path) -> None:
    """build_unit on a decoder graph: the engine with the prefill and decode profiles (bounded by the options'
    profile), the DecoderSpec and the KV-cache I/O in the manifest, the tokenizer beside it, and the unit verifies."""
    from pimoe_export.artifacts.manifest import verify
    from pimoe_export.build.units import BuildOptions, build_unit
    from pimoe_export.interface import Profile

    case = decoder_cases("gpt_oss")
    options = BuildOptions(flavour="rtx", compute_capabilities=("SM89",), profile=Profile((1, 1), (1, 64), (4, 256)))
    manifest = build_unit(case.unit / "model.onnx", tmp_path / "trt", plugin_path=plugin, options=options,
                          client_dir=case.hf_dir)
    spec = read_manifest(case.unit).decoder_spec
    assert spec is not None and manifest.decoder_spec == spec
    assert manifest.shape_profiles == list(decoder_profiles(spec, max_batch=4, max_prompt=256))
    assert [p.name for p in manifest.shape_profiles] == ["prefill", "decode"]
    interface = manifest.interface
    assert set(spec.past_names) <= set(interface.input_names)
    assert set(spec.present_names) <= set(interface.output_names)
    roles = {a.role for a in manifest.artifacts}
    assert {"engine", "onnx", "plugin_library", "tokenizer", "hf_config"} <= roles and "genai_config" not in roles
    verify(tmp_path / "trt")
