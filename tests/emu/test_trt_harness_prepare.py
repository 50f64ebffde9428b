"""The plugin objects' host side through plugins/harness, without a GPU and without TensorRT.

Runs on every harness build present: the emulated one (always built by scripts/setup.sh) and the CUDA one (where
nvcc built it): their host code is the same source.

pimoe_harness_prepare runs what a TensorRT build + deserialisation runs (createPlugin, getOutputDataTypes,
getOutputShapes with constant dims, supportsFormatCombination for every position, configurePlugin,
getWorkspaceSize, getFieldsToSerialize -> createPlugin(kRUNTIME) -> attachToContext -> onShapeChange), so the
shape/dtype contract, the serialisation round trip and every argument check are tested here on the CPU; the GPU
tests (test_gpu_layer.py, test_ops_backends.py[trt-harness]) add the kernels.
"""

from __future__ import annotations

import numpy as np
import pytest

from pimoe_export.ops import schema
from pimoe_export.testing.harness import (
    FIELD_INT64,
    Harness,
    RawField,
    expert_mlp_fields,
    find_harness,
)

f32, f16, i32, i8 = np.float32, np.float16, np.int32, np.int8


@pytest.fixture(scope="module", params=["cuda-build", "emulated-build"])
def harness(request) -> Harness:
    path = find_harness(emulated=request.param == "emulated-build")
    if path is None:
        pytest.skip(f"the {request.param} of the harness is not built (cuda-build: needs nvcc)")
    return Harness(path)


def outputs(harness: Harness, op: str, attrs: dict, inputs: list) -> tuple[list, int]:
    prepared = harness.prepare(op, attrs, inputs)
    try:
        return prepared.outputs, prepared.workspace
    finally:
        harness.release(prepared)


def mlp_inputs(x_dtype, rows, widths, groups, experts, layer_norm=True, weight_dtype=None, quant_mode="none"):
    """(shape, dtype) of every PiMoEExpertMLP input in contract order; int8 weights in the w8a8 modes."""
    params = []
    for layer, role in schema.expert_mlp_param_layout(len(widths) - 1, layer_norm, quant_mode):
        out, inp = widths[layer + 1], widths[layer]
        if role == "weight":
            params.append(((groups, out, inp), weight_dtype or (i8 if quant_mode != "none" else x_dtype)))
        elif role == "act_smooth":
            params.append(((groups, inp), f32))
        else:
            params.append(((groups, out), f32))
    return [((rows, widths[0]), x_dtype), ((experts + 1,), i32), *params]


def w8a8_fields(expert_ids, widths, layer_norm=True, mode="w8a8", scales=None):
    count = (len(widths) - 1) * len(expert_ids)
    act_scales = ([0.02] * count if scales is None else scales) if mode == "w8a8" else []
    return expert_mlp_fields(expert_ids, widths, "gelu", layer_norm, quant_mode=mode, act_scales=act_scales)


@pytest.mark.parametrize("dtype", [f32, f16])
def test_output_shapes_and_dtypes_follow_the_contract(harness, dtype) -> None:
    assert outputs(harness, schema.ROUTE, {"k": 3}, [((7, 8), dtype), ((8,), f32)])[0] == [((7, 3), f32),
                                                                                          ((7, 3), i32)]
    assert outputs(harness, schema.ROUTE, {"k": 1}, [((0, 8), dtype)])[0] == [((0, 1), f32), ((0, 1), i32)]
    assert outputs(harness, schema.DISPATCH, {"num_experts": 8}, [((5, 13), dtype), ((5, 2), i32)])[0] == [
        ((10, 13), dtype), ((9,), i32), ((10,), i32)]
    assert outputs(harness, schema.COMBINE, {}, [((10, 13), dtype), ((10,), i32), ((5, 2), f32)])[0] == [
        ((5, 13), dtype)]
    widths = [13, 37, 24, 5]
    attrs = expert_mlp_fields([0, 3], widths, "silu", True)
    assert outputs(harness, schema.EXPERT_MLP, attrs, mlp_inputs(dtype, 11, widths, 2, 4))[0] == [((11, 5), dtype)]


def test_workspace_sizes_cover_the_buffers(harness) -> None:
    status = 0  # the device status block is each plugin's own (attachToContext), not part of the workspace
    assert outputs(harness, schema.ROUTE, {"k": 2}, [((64, 8), f32)])[1] == status
    small = outputs(harness, schema.DISPATCH, {"num_experts": 8}, [((4, 16), f16), ((4, 2), i32)])[1]
    large = outputs(harness, schema.DISPATCH, {"num_experts": 8}, [((4096, 16), f16), ((4096, 2), i32)])[1]
    assert status < small < large <= status + 256 + 1024 * 8 * 4
    # two hidden layers: two fp32 hidden buffers of R x max(hidden) plus the tile plan
    widths, rows = [16, 64, 32, 16], 100
    ws = outputs(harness, schema.EXPERT_MLP, expert_mlp_fields([1], widths, "gelu", True),
                 mlp_inputs(f16, rows, widths, 1, 2))[1]
    assert ws >= status + 2 * rows * 64 * 4
    one_layer = outputs(harness, schema.EXPERT_MLP, expert_mlp_fields([1], [16, 8], "gelu", False),
                        mlp_inputs(f32, rows, [16, 8], 1, 2, layer_norm=False))[1]
    assert one_layer < status + 1024  # fp32, one layer: the tile plan only
    # fp16 adds the split-K partial sums for up to 256 rows: 4 splits x rows x max(width) fp32
    one_layer16 = outputs(harness, schema.EXPERT_MLP, expert_mlp_fields([1], [16, 8], "gelu", False),
                          mlp_inputs(f16, rows, [16, 8], 1, 2, layer_norm=False))[1]
    assert one_layer16 >= one_layer + 4 * rows * 8 * 4


@pytest.mark.parametrize("mode", ["w8a8", "w8a8_dynamic"])
@pytest.mark.parametrize("dtype", [f32, f16])
def test_int8_plugin_accepts_the_w8a8_contract(harness, mode, dtype) -> None:
    """int8 weights, fp32 w_scale / act_smooth / bias / LayerNorm, x and y fp32 or fp16; the serialised fields
    (quant_mode, act_scales) rebuild the runtime plugin."""
    widths = [13, 37, 24, 5]
    outs, _ = outputs(harness, schema.EXPERT_MLP, w8a8_fields([0, 3], widths, mode=mode),
                      mlp_inputs(dtype, 11, widths, 2, 4, quant_mode=mode))
    assert outs == [((11, 5), dtype)]
    # one layer, no LayerNorm: weight, w_scale, act_smooth, bias
    inputs = mlp_inputs(dtype, 3, [8, 8], 1, 2, layer_norm=False, quant_mode=mode)
    assert [d for _, d in inputs[2:]] == [i8, f32, f32, f32]
    assert outputs(harness, schema.EXPERT_MLP, w8a8_fields([1], [8, 8], False, mode), inputs)[0] == [((3, 8), dtype)]


def test_int8_workspace_covers_codes_scales_and_partials(harness) -> None:
    """w8a8 workspace: status + plan + ONE fp32 hidden buffer R x max(hidden) + int8 codes R x (widths padded to
    16) + a scale per row + int32 split-K partials 4 x min(R, 64) x max(out) (split-K runs only for R <= 64)."""
    status, widths = 256, [16, 64, 33, 16]  # padded inputs: 16, 64, 48

    def ws(rows, mode="w8a8", dtype=f16):
        return outputs(harness, schema.EXPERT_MLP, w8a8_fields([1], widths, mode=mode),
                       mlp_inputs(dtype, rows, widths, 1, 2, quant_mode=mode))[1]

    for rows in (1, 64, 65, 1000):
        need = rows * 64 * 4 + rows * 64 + rows * 4 + 4 * min(rows, 64) * 64 * 4
        assert status + need <= ws(rows) <= status + need + 5 * 256 + 1024, rows
    assert ws(1000) == ws(1000, "w8a8_dynamic") == ws(1000, dtype=f32)
    # fewer bytes than the float path, which keeps two hidden buffers
    float_ws = outputs(harness, schema.EXPERT_MLP, expert_mlp_fields([1], widths, "gelu", True),
                       mlp_inputs(f32, 1000, widths, 1, 2))[1]
    assert ws(1000) < float_ws


def test_int64_fields_and_serialisation_round_trip(harness) -> None:
    # the runtime plugin is rebuilt from getFieldsToSerialize (kINT32 fields) of a plugin built from kINT64 fields
    attrs = {"k": RawField(FIELD_INT64, np.array([2], np.int64)), "normalize": RawField(FIELD_INT64, np.array([1]))}
    assert outputs(harness, schema.ROUTE, attrs, [((3, 4), f32)])[0][0] == ((3, 2), f32)


BAD = [
    (schema.ROUTE, {"k": 2}, [((5, 3, 1), f32)], "logits must have rank 2"),
    (schema.ROUTE, {"k": 4}, [((5, 3), f32)], "k=4 exceeds the number of experts E=3"),
    (schema.ROUTE, {"k": 2}, [((5, 4), f32), ((3,), f32)], "selection_bias must have shape [4]"),
    (schema.ROUTE, {"k": 2}, [((5, 4), i32)], "logits must be float32 or float16, got int32"),
    (schema.ROUTE, {"k": 17}, [((5, 32), f32)], "attribute k must be in [1, 16]"),
    (schema.ROUTE, {}, [((5, 4), f32)], "missing required field 'k'"),
    (schema.DISPATCH, {"num_experts": 4}, [((3, 2, 8), f32), ((3, 2), i32)], "must have rank 2"),
    (schema.DISPATCH, {"num_experts": 4}, [((3, 8), f32), ((4, 2), i32)], "ids has 4 rows but x has 3"),
    (schema.DISPATCH, {"num_experts": 4}, [((3, 8), f32), ((3, 5), i32)], "ids dim 1 (k) must be in [1, min(E, 16)]"),
    (schema.DISPATCH, {"num_experts": 4}, [((3, 8), f32), ((3, 2), f32)], "ids must be int32, got float32"),
    (schema.COMBINE, {}, [((6, 8), f32), ((5,), i32), ((3, 2), f32)], "must both have N*k = 6 rows"),
    (schema.COMBINE, {}, [((6, 8), f16), ((6,), i32), ((3, 2), f16)], "weights must be float32, got float16"),
    (schema.EXPERT_MLP, expert_mlp_fields([0, 1], [8, 8], "gelu", False), mlp_inputs(f32, 4, [8, 8], 2, 4)[:3],
     "expected 4 inputs"),
    (schema.EXPERT_MLP, expert_mlp_fields([0, 7], [8, 8], "gelu", False), mlp_inputs(f32, 4, [8, 8], 2, 4),
     "expert_ids[1]=7 is outside [0, 4)"),
    (schema.EXPERT_MLP, expert_mlp_fields([0], [8, 16, 8], "gelu", True),
     [*mlp_inputs(f32, 4, [8, 16, 8], 1, 2)[:3], ((1, 15), f32), *mlp_inputs(f32, 4, [8, 16, 8], 1, 2)[4:]],
     "layer 0 bias (input 3) must have shape [1, 16], got [1, 15]"),
    (schema.EXPERT_MLP, expert_mlp_fields([0], [8, 8], "gelu", False), mlp_inputs(f32, 4, [9, 8], 1, 2),
     "hidden size 9 does not match widths[0]=8"),
    (schema.EXPERT_MLP, expert_mlp_fields([0], [8, 8], "gelu", False),
     mlp_inputs(f16, 4, [8, 8], 1, 2, weight_dtype=f32), "rejects position 2 (input 2, float32)"),
    # w8a8: static scales per (layer, expert), int8 weights, fp32 scales, the contract's input count, kernel limits
    (schema.EXPERT_MLP, w8a8_fields([0, 1], [8, 16, 8], scales=[0.5, 0.5, 0.5]),
     mlp_inputs(f32, 4, [8, 16, 8], 2, 2, quant_mode="w8a8"), "needs act_scales with layers*G = 4 entries, got 3"),
    (schema.EXPERT_MLP, w8a8_fields([0], [8, 8], False, scales=[]),
     mlp_inputs(f32, 4, [8, 8], 1, 2, False, None, "w8a8"), "needs act_scales with layers*G = 1 entries, got 0"),
    (schema.EXPERT_MLP, w8a8_fields([0], [8, 8], False, scales=[-0.5]),
     mlp_inputs(f32, 4, [8, 8], 1, 2, False, None, "w8a8"), "act_scales must be positive finite numbers"),
    (schema.EXPERT_MLP, w8a8_fields([0], [8, 8], False), mlp_inputs(f16, 4, [8, 8], 1, 2, False, f16, "w8a8"),
     "layer 0 weight (input 2) must be int8, got float16"),
    (schema.EXPERT_MLP, w8a8_fields([0], [8, 8], False, "w8a8_dynamic"),
     [*mlp_inputs(f32, 4, [8, 8], 1, 2, False, None, "w8a8_dynamic")[:3], ((1, 8), f16),
      *mlp_inputs(f32, 4, [8, 8], 1, 2, False, None, "w8a8_dynamic")[4:]],
     "layer 0 w_scale (input 3) must be float32, got float16"),
    (schema.EXPERT_MLP, w8a8_fields([0], [8, 8], False, "w8a8_dynamic"),
     [*mlp_inputs(f32, 4, [8, 8], 1, 2, False, None, "w8a8_dynamic")[:4], ((1, 9), f32),
      *mlp_inputs(f32, 4, [8, 8], 1, 2, False, None, "w8a8_dynamic")[5:]],
     "layer 0 act_smooth (input 4) must have shape [1, 8], got [1, 9]"),
    (schema.EXPERT_MLP, w8a8_fields([0], [8, 8], False), mlp_inputs(f32, 4, [8, 8], 1, 2, False, i8),
     "expected 6 inputs"),
    (schema.EXPERT_MLP, w8a8_fields([0], [131073, 1], False),
     mlp_inputs(f32, 4, [131073, 1], 1, 2, False, None, "w8a8"), "supports layer input widths up to 131072"),
    (schema.EXPERT_MLP, expert_mlp_fields([0], [8, 8], "mish", False), mlp_inputs(f32, 4, [8, 8], 1, 2),
     "unknown activation 'mish'"),
    ("PiMoEFusedMoE", {}, [], "no pimoe plugin creator named 'PiMoEFusedMoE'"),
]


@pytest.mark.parametrize(("op", "attrs", "inputs", "fragment"), BAD, ids=[b[3][:40] for b in BAD])
def test_bad_arguments_give_errors_not_crashes(harness, op, attrs, inputs, fragment) -> None:
    """In a separate process (tests/isolated.py): a check that let the case through and crashed fails this case."""
    from isolated import assert_refused, harness_prepare, isolated

    outcome = isolated().call(harness_prepare, op, attrs, inputs, emulated=harness.emulated)
    assert_refused(outcome, fragment, f"{op} {attrs}", ("HarnessError",))
