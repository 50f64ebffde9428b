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


def test_the_plugin_library_given_is_the_one_used(rtx, tmp_path, monkeypatch) -> None:
    """build_engine(plugin_path=...) registers and checks that library: with $PIMOE_TRT_PLUGINS naming a file that
    is not there, a build that looked the default up anywhere would fail."""
    from pimoe_export.native import libraries as L

    _, plugin = rtx
    monkeypatch.setenv(L.PLUGIN_LIBRARY_ENV, str(tmp_path / "not-this-one.so"))
    model = single_op_model("PiMoERoute", [("logits", np.zeros((4, 8), np.float32))],
                            [("weights", np.float32, 2), ("ids", np.int32, 2)], {"k": 2})
    path = _single_op_file(tmp_path, "route", model)
    plan, summary = D.build_engine(path, plugin, {"logits": ((1, 8), (4, 8), (16, 8))}, strongly_typed=False)
    assert summary.plugin_counts() == {schema.ROUTE: 1} and len(plan) > 0
    with pytest.raises(PluginLoadError, match=r"not-this-one\.so"):  # and without a path, the environment's
        D.build_engine(path, None, {"logits": ((1, 8), (4, 8), (16, 8))}, strongly_typed=False)


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


class _V2Block:
    """A DeepSeek-V3/GPT-OSS-shaped block in contract v2 ops (sigmoid + grouped routing with a correction bias, gated
    bias-free swiglu_oai experts, a shared group over every token, the expert-order combine), for export."""

    @staticmethod
    def module():
        import torch

        import pimoe_export.ops.torch_ops  # noqa: F401

        class Block(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                gen = torch.Generator().manual_seed(0)
                self.router = torch.nn.Parameter(torch.randn(8, 16, generator=gen))
                self.bias = torch.nn.Parameter(torch.randn(8, generator=gen) * 0.1)
                self.w0 = torch.nn.Parameter(torch.randn(8, 48, 16, generator=gen) * 0.2)
                self.w1 = torch.nn.Parameter(torch.randn(8, 16, 24, generator=gen) * 0.2)
                self.s0 = torch.nn.Parameter(torch.randn(1, 48, 16, generator=gen) * 0.2)
                self.s1 = torch.nn.Parameter(torch.randn(1, 16, 24, generator=gen) * 0.2)

            def forward(self, x):
                ops = torch.ops.pimoe
                weights, ids = ops.route(x @ self.router.t(), self.bias, 2, True, scoring="sigmoid", num_groups=4,
                                         groups_kept=2, group_score="sum_top2", routed_scaling_factor=2.5,
                                         normalize_eps=1e-20)
                x_sorted, offsets, f2s = ops.dispatch(x, ids, 8)
                y_sorted = ops.expert_mlp(x_sorted, offsets, [self.w0, self.w1], list(range(8)), [16, 24, 16],
                                          "swiglu_oai", False, 1e-5, "none", [], gated=True, bias=False)
                # offsets [0, N] of a group over every token (a tensor op on N, as the exporter needs it)
                everyone = torch.stack([offsets[0] * 0, offsets[0] * 0 + x.shape[0]])
                shared = ops.expert_mlp(x, everyone, [self.s0, self.s1], [0], [16, 24, 16], "silu", False, 1e-5,
                                        "none", [], gated=True, bias=False)
                return ops.combine(y_sorted, f2s, weights, "expert") + shared, ids, weights

        return Block().eval()


@pytest.mark.slow
def test_aot_build_of_a_contract_v2_graph(rtx, tmp_path) -> None:
    """An exported contract-v2 graph (every new Route attribute, gated bias-free experts with swiglu_oai, a shared
    group, the expert-order combine) parses into our five plugin layers and builds for SM89."""
    import onnx
    import torch

    from pimoe_export.ops.onnx_translation import custom_translation_table

    _, plugin = rtx
    x = torch.randn(5, 16)
    program = torch.onnx.export(_V2Block.module(), (x,), dynamo=True, input_names=["x"], verbose=False,
                                custom_translation_table=custom_translation_table(),
                                dynamic_shapes=({0: torch.export.Dim("tokens")},))
    path = tmp_path / "v2.onnx"
    onnx.save(program.model_proto, str(path))
    nodes = {n.op_type: n for n in onnx.load(str(path)).graph.node if n.domain == schema.DOMAIN}
    assert {a.name for a in nodes[schema.EXPERT_MLP].attribute} >= {"gated", "bias", "activation"}
    plan, summary = D.build_engine(path, plugin, {"x": ((1, 16), (8, 16), (64, 16))}, compute_capabilities=("SM89",))
    assert summary.plugin_counts() == {schema.ROUTE: 1, schema.DISPATCH: 1, schema.EXPERT_MLP: 2, schema.COMBINE: 1}
    assert len(plan) > 0


def test_gated_int8_expert_node_builds(rtx, tmp_path) -> None:
    """W8A8 gated layer: int8 weights with 2*out rows [gate; up], per-row scales over the fused rows, no bias."""
    _, plugin = rtx
    rng = np.random.default_rng(1)
    params = [("w0", rng.integers(-127, 128, size=(2, 48, 16), dtype=np.int8)),
              ("s0", np.full((2, 48), 0.01, np.float32)), ("m0", np.ones((2, 16), np.float32)),
              ("w1", rng.integers(-127, 128, size=(2, 16, 24), dtype=np.int8)),
              ("s1", np.full((2, 16), 0.01, np.float32)), ("m1", np.ones((2, 24), np.float32))]
    model = single_op_model("PiMoEExpertMLP", [("x_sorted", np.zeros((4, 16), np.float16)),
                                               ("offsets", np.zeros(4, np.int32))], [("y_sorted", np.float16, 2)],
                            expert_mlp_attrs([0, 2], [16, 24, 16], "silu", False, quant_mode="w8a8_dynamic",
                                             gated=True, bias=False), params)
    path = _single_op_file(tmp_path, "gated_w8a8", model)
    profile = {"x_sorted": ((1, 16), (8, 16), (64, 16)), "offsets": ((4,), (4,), (4,))}
    plan, summary = D.build_engine(path, plugin, profile, compute_capabilities=("SM89",))
    assert summary.plugin_counts() == {schema.EXPERT_MLP: 1} and len(plan) > 0
    assert summary.plugin_layers[0].num_inputs == 8
