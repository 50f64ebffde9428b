"""TensorRT-RTX 1.7 ahead-of-time engine builds on a CPU-only machine (CI rung 5).

TensorRT's ONNX parser maps every ``pimoe`` node of the exported custom-op graphs to our IPluginV3 plugins (3 +
one PiMoEExpertMLP per expert group), and the builder accepts them in a strongly typed network with a dynamic
[batch, sequence, H] profile for SM89 and SM80: fp32 and fp16, presets seed-512 and seed-types, and the INT8
graphs `quantize_model` writes for both (w8a8 and w8a8_dynamic: int8 weight initializers reach the plugin as INT8
constants). Also: static registration (PIMOE_TRT_STATIC_REGISTRATION=1) serves dlopen-only loaders, and bad nodes
fail the build with the plugin's reason instead of crashing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from op_graphs import expert_mlp_attrs, single_op_model

from pimoe_export.build import engine_builder as D
from pimoe_export.errors import BackendUnavailableError, PluginLoadError
from pimoe_export.interface import Profile, layer_interface, profile_shapes
from pimoe_export.ops import schema

pytestmark = pytest.mark.trt
ROOT = Path(__file__).resolve().parents[2]


def layer_profile(hidden_size: int) -> dict:
    """hidden_states over batch 1..8, sequence 1..512 (opt 1 x 64)."""
    return profile_shapes(Profile((1, 1), (1, 64), (8, 512)), layer_interface(hidden_size, 1, "fp32"))


@pytest.fixture(scope="module")
def rtx():
    from pimoe_export.native import libraries as L
    from pimoe_export.native import tensorrt_loader as T

    try:
        plugin = L.find_plugin_library()
    except PluginLoadError as exc:
        pytest.skip(f"plugin library not built (no nvcc?): {exc}")
    try:
        T.import_tensorrt("rtx")
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    return T, plugin


@pytest.fixture(scope="module")
def exported(exported_layer):
    def get(preset: str, precision: str):
        model, path = exported_layer(preset, 3, precision)
        return path, model.config

    return get


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["seed-512", "seed-types"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("sm", ["SM89", "SM80"])
def test_aot_build_of_exported_graph(rtx, exported, preset, precision, sm) -> None:
    _, plugin = rtx
    path, config = exported(preset, precision)
    profile = layer_profile(config.hidden_size)
    plan, summary = D.build_engine(path, plugin, profile, compute_capabilities=(sm,), strongly_typed=True)
    groups = len(config.expert_groups())
    assert isinstance(plan, bytes) and len(plan) > 1_000_000  # the expert weights are embedded
    assert summary.layer_types.get("PLUGIN_V3") == 3 + groups
    assert summary.plugin_counts() == {schema.ROUTE: 1, schema.DISPATCH: 1, schema.EXPERT_MLP: groups,
                                       schema.COMBINE: 1}
    dtype = "FLOAT" if precision == "fp32" else "HALF"
    assert summary.inputs == [("hidden_states", dtype, (-1, -1, config.hidden_size))]
    assert [o[:2] for o in summary.outputs] == [("output", dtype), ("expert_ids", "INT32"),
                                                ("expert_weights", "FLOAT")]
    # every PiMoEExpertMLP layer receives x_sorted, offsets and its parameters as inputs
    for layer in summary.plugin_layers:
        if layer.plugin == schema.EXPERT_MLP:
            assert layer.num_inputs >= 4


_QUANTIZED: dict[tuple[str, str], Path] = {}


@pytest.fixture(scope="module")
def quantized(exported, tmp_path_factory):
    """`quantize_model` of the same seed-3 model as `exported` (its fp32 ONNX reused), calibrated on 256 tokens."""
    import torch

    from pimoe_export.model.factory import create_from_preset
    from pimoe_export.quantize import quantize_model

    def get(preset: str, mode: str) -> Path:
        key = (preset, mode)
        if key not in _QUANTIZED:
            fp32_path, config = exported(preset, "fp32")
            model = create_from_preset(preset, seed=3)
            calibration = torch.randn(4, 64, config.hidden_size, generator=torch.Generator().manual_seed(0))
            out = tmp_path_factory.mktemp(f"{preset}-{mode}") / "model.int8.onnx"
            _QUANTIZED[key] = quantize_model(model, out, calibration=calibration, method="max", mode=mode,
                                             fp32_onnx=fp32_path).onnx_path
        return _QUANTIZED[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["seed-512", "seed-types"])
@pytest.mark.parametrize("mode", ["w8a8", "w8a8_dynamic"])
@pytest.mark.parametrize("sm", ["SM89", "SM80"])
def test_aot_build_of_int8_graph(rtx, exported, quantized, preset, mode, sm) -> None:
    """The INT8 ONNX of `pimoe-export quantize` (PiMoEExpertMLP in w8a8 mode, int8 weight initializers, fp32
    router) builds strongly typed: our four plugins as PLUGIN_V3 layers, every expert node with the int8 layout's
    inputs, and a plan that holds the weights as int8 (smaller than 1.5x their int8 bytes; fp32 would be 4x)."""
    import onnx

    _, plugin = rtx
    _, config = exported(preset, "fp32")
    path = quantized(preset, mode)
    proto = onnx.load(str(path))
    nodes = [n for n in proto.graph.node if n.op_type == schema.EXPERT_MLP]
    int8_bytes = sum(len(t.raw_data) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8)
    assert nodes and int8_bytes > 0
    profile = layer_profile(config.hidden_size)
    plan, summary = D.build_engine(path, plugin, profile, compute_capabilities=(sm,), strongly_typed=True)
    groups = len(config.expert_groups())
    assert len(nodes) == groups
    assert summary.layer_types.get("PLUGIN_V3") == 3 + groups
    assert summary.plugin_counts() == {schema.ROUTE: 1, schema.DISPATCH: 1, schema.EXPERT_MLP: groups,
                                       schema.COMBINE: 1}
    assert summary.inputs == [("hidden_states", "FLOAT", (-1, -1, config.hidden_size))]
    assert [o[:2] for o in summary.outputs] == [("output", "FLOAT"), ("expert_ids", "INT32"),
                                                ("expert_weights", "FLOAT")]
    # x_sorted, offsets, then per layer weight, w_scale, act_smooth, bias [, ln_gamma, ln_beta]
    assert sorted(p.num_inputs for p in summary.plugin_layers if p.plugin == schema.EXPERT_MLP) == sorted(
        len(n.input) for n in nodes)
    assert isinstance(plan, bytes) and int8_bytes <= len(plan) < 1.5 * int8_bytes


def _single_op_file(tmp_path: Path, name: str, model: bytes) -> Path:
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(model)
    return path


def test_single_op_graph_with_weak_typing_builds(rtx, tmp_path) -> None:
    _, plugin = rtx
    logits = np.zeros((4, 8), np.float32)
    model = single_op_model("PiMoERoute", [("logits", logits), ("selection_bias", np.zeros(8, np.float32))],
                            [("weights", np.float32, 2), ("ids", np.int32, 2)], {"k": 2, "normalize": 1})
    path = _single_op_file(tmp_path, "route", model)
    profile = {"logits": ((1, 8), (16, 8), (256, 8)), "selection_bias": ((8,), (8,), (8,))}
    plan, summary = D.build_engine(path, plugin, profile, compute_capabilities=("SM89",), strongly_typed=False)
    assert summary.plugin_counts() == {schema.ROUTE: 1} and len(plan) > 0


def _w8a8_single_op(dtype, mode: str, act_scales) -> bytes:
    rng = np.random.default_rng(0)
    params = [("w", rng.integers(-127, 128, size=(2, 24, 16), dtype=np.int8)),
              ("s", np.full((2, 24), 0.01, np.float32)), ("m", np.ones((2, 16), np.float32)),
              ("b", np.zeros((2, 24), np.float32))]
    return single_op_model("PiMoEExpertMLP", [("x_sorted", np.zeros((4, 16), dtype)),
                                              ("offsets", np.zeros(4, np.int32))],
                           [("y_sorted", dtype, 2)],
                           expert_mlp_attrs([0, 2], [16, 24], "gelu", False, quant_mode=mode, act_scales=act_scales),
                           params)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["w8a8", "w8a8_dynamic"])
def test_int8_expert_node_builds_with_int8_constant_weights(rtx, tmp_path, dtype, mode) -> None:
    """The parser hands the int8 initializer to the plugin as an INT8 constant; x/y fp32 or fp16."""
    _, plugin = rtx
    path = _single_op_file(tmp_path, "w8a8", _w8a8_single_op(dtype, mode, [0.1, 0.2] if mode == "w8a8" else []))
    profile = {"x_sorted": ((1, 16), (8, 16), (64, 16)), "offsets": ((4,), (4,), (4,))}
    plan, summary = D.build_engine(path, plugin, profile, compute_capabilities=("SM89",))
    assert summary.plugin_counts() == {schema.EXPERT_MLP: 1} and len(plan) > 0
    assert summary.layer_types.get("CONSTANT") == 4  # int8 weight, w_scale, act_smooth, bias
    assert summary.plugin_layers[0].num_inputs == 6


def test_bad_int8_node_fails_with_the_plugins_reason(rtx, tmp_path) -> None:
    _, plugin = rtx
    path = _single_op_file(tmp_path, "w8a8_bad", _w8a8_single_op(np.float32, "w8a8", [0.1, 0.2, 0.3]))
    profile = {"x_sorted": ((1, 16), (8, 16), (64, 16)), "offsets": ((4,), (4,), (4,))}
    with pytest.raises(D.EngineBuildError, match=r"needs act_scales with layers\*G = 2 entries, got 3"):
        D.build_engine(path, plugin, profile, compute_capabilities=("SM89",))


def test_k_larger_than_experts_fails_the_build(rtx, tmp_path) -> None:
    _, plugin = rtx
    model = single_op_model("PiMoERoute", [("logits", np.zeros((4, 3), np.float32))],
                            [("weights", np.float32, 2), ("ids", np.int32, 2)], {"k": 4})
    path = _single_op_file(tmp_path, "k4e3", model)
    with pytest.raises(D.EngineBuildError, match="k=4 exceeds the number of experts E=3"):
        D.build_engine(path, plugin, {"logits": ((1, 3), (4, 3), (16, 3))}, compute_capabilities=("SM89",))


STATIC_SCRIPT = r"""
import ctypes, sys
from pimoe_export.native import tensorrt_loader as T
from pimoe_export.build import engine_builder as D
from pimoe_export.errors import PluginLoadError
trt = T.import_tensorrt(sys.argv[1])
registry = trt.get_plugin_registry()
assert registry.get_creator("PiMoERoute", "1", "") is None
ctypes.CDLL(sys.argv[2])  # a dlopen-only loader (polygraphy --plugins): the library registers itself
assert all(registry.get_creator(n, "1", "") is not None for n in T.PLUGIN_NAMES), "static registration failed"
if sys.argv[1] == "rtx":  # the parser finds the statically registered creators
    plan, summary = D.build_engine(sys.argv[3], sys.argv[2], {"logits": ((1, 8), (4, 8), (64, 8))},
                                   compute_capabilities=("SM89",))
    assert summary.plugin_counts() == {"PiMoERoute": 1}
# dynamic loading of the same library now fails: the two modes exclude each other
handle = registry.load_library(sys.argv[2])
assert handle is None, "loadLibrary accepted already-registered creators"
print("static registration ok")
"""


@pytest.mark.parametrize("flavour", ["rtx", "lean"])
def test_static_registration_for_dlopen_only_loaders(rtx, tmp_path, flavour) -> None:
    _, plugin = rtx
    model = single_op_model("PiMoERoute", [("logits", np.zeros((4, 8), np.float32))],
                            [("weights", np.float32, 2), ("ids", np.int32, 2)], {"k": 2})
    path = _single_op_file(tmp_path, "route", model)
    env = {**os.environ, "PIMOE_TRT_STATIC_REGISTRATION": "1", "PIMOE_TRT_LOG": "warning"}
    result = subprocess.run([sys.executable, "-c", STATIC_SCRIPT, flavour, str(plugin), str(path)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "static registration ok" in result.stdout


def test_load_failure_names_the_static_registration_conflict(rtx, monkeypatch) -> None:
    T, plugin = rtx

    class Registry:  # a registry whose loadLibrary refuses, as TensorRT does for registered creators
        def get_creator(self, *args):
            return None

        def load_library(self, path):
            return None

    monkeypatch.setenv("PIMOE_TRT_STATIC_REGISTRATION", "1")
    with pytest.raises(PluginLoadError, match="PIMOE_TRT_STATIC_REGISTRATION=1 is set"):
        T.load_plugin_library(None, plugin, registry=Registry())
