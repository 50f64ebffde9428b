"""The TensorRT plugin objects (plugins/harness, no TensorRT) against the PyTorch reference, on two devices:
a CUDA GPU (``trt-harness``, mark ``gpu``) and the CPU CUDA emulator (``emu``, mark ``emu``: the same kernels,
plugins and harness built against plugins/emu). Every test runs on both with the same assertions.

- The whole layer, route -> dispatch -> expert MLP per group -> combine, with the exported groups of
  ``CustomOpPiMoE`` (the weights the ONNX graph carries), for seed-512 and seed-types:
  fp32 within 1e-5 relative of the PyTorch model; fp16 within a documented tolerance of the fp16 reference
  (the same graph evaluated by PyTorch on the CPU) and of the fp32 model.
- INT8 (W8A8): the whole layer with the parameters ``quantize_model`` writes into the INT8 ONNX (``calibrated_params``,
  computed without an export) against the fake-quant PyTorch reference ``FakeQuantPiMoE`` (same codes and scales):
  routing identical, relative L2 <= 1e-3; w8a8 and w8a8_dynamic, fp32 and fp16 activations.
- Determinism: two runs are bit-identical (fp32, fp16, int8).
- Kernels at scale (vector/tensor-core paths, many tiles, E = 1024) against pimoe_export.model.functional; the int8
  expert kernels (16- and 64-row tiles, split-K, aligned and unaligned weights) against the fake-quant reference:
  bit-identical where no transcendental function is involved (relu, no LayerNorm), else within one quantisation
  step.
- Bad data reaching enqueue (ids out of range, inconsistent offsets, flat_to_sorted out of range) is reported
  as an error and never makes a kernel touch memory out of bounds; empty batches give empty outputs.

The GPU half needs a CUDA GPU: scripts/gpu_check.sh runs it (and compute-sanitizer over test_sanitizer_case); it
skips cleanly elsewhere. The emulated half runs in CI (and under AddressSanitizer/ThreadSanitizer,
tests/emu/test_emu.py).
Argument checks of the host side alone are in test_trt_harness_prepare.py; the TensorRT call sequence with
optimisation profiles is in test_emu.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from backends import get_backend

from pimoe_export.export.modules import CustomOpPiMoE
from pimoe_export.model import functional
from pimoe_export.model.factory import create_from_preset
from pimoe_export.ops import schema
from pimoe_export.testing.harness import expert_mlp_fields
from pimoe_export.validate.metrics import error_stats

# fp16 tolerance (documented in docs/trt_plugins.md): against the fp16 reference (same fp16 weights, fp32 math) the
# only differences are fp32 summation order and the resulting one-ulp flips of fp16 roundings (y_sorted, y):
# |error| <= 4e-3 x max|y| and relative L2 <= 2e-3. Against the fp32 model the fp16 weights and input add
# their own rounding: relative L2 <= 2e-2.
FP16_MAX_ABS, FP16_REL_L2, FP16_VS_FP32_REL_L2 = 4e-3, 2e-3, 2e-2


@pytest.fixture(scope="module", params=[pytest.param("trt-harness", marks=pytest.mark.gpu),
                                        pytest.param("emu", marks=pytest.mark.emu)])
def backend(request):
    return get_backend(request.param)


@pytest.fixture(scope="module", params=["seed-512", "seed-types"])
def model(request):
    return create_from_preset(request.param, seed=11)


def layer_through_plugins(backend, module: CustomOpPiMoE, x: np.ndarray):
    """hidden_states [B, S, H] (module dtype) -> (output, expert_ids, expert_weights) through the four plugins."""
    cfg = module.config
    b, s, h = x.shape
    tokens = torch.from_numpy(np.ascontiguousarray(x.reshape(b * s, h)))
    with torch.no_grad():  # the router MLP is standard ops in the exported graph (fp32): computed here on the CPU
        logits = module.router.compute_logits(tokens.float()).numpy()
    bias = module.router.selection_bias.detach().float().numpy()
    weights, ids = backend.run(schema.ROUTE, {"k": cfg.top_k, "normalize": int(cfg.normalize)}, [logits, bias])
    x_sorted, offsets, flat_to_sorted = backend.run(schema.DISPATCH, {"num_experts": cfg.num_experts},
                                                    [tokens.numpy(), ids])
    y_sorted = None
    for index, group in enumerate(module.groups):
        spec = group.spec
        group_params, quant_mode, act_scales = module.group_params(index)  # FakeQuantPiMoE: the INT8 ONNX's
        attrs = expert_mlp_fields(group.expert_ids, spec.widths, spec.activation, spec.layer_norm,
                                  cfg.layer_norm_eps, quant_mode, act_scales)
        params = [p.detach().contiguous().numpy() for p in group_params]
        part = backend.run(schema.EXPERT_MLP, attrs, [x_sorted, offsets, *params])[0]
        y_sorted = part if y_sorted is None else y_sorted + part  # the graph's Add (rows of other groups are 0)
    y = backend.run(schema.COMBINE, {}, [y_sorted, flat_to_sorted, weights])[0]
    k = cfg.top_k
    return y.reshape(b, s, h), ids.reshape(b, s, k), weights.reshape(b, s, k)


def same_routing(ids, ref_ids, logits_scores=None) -> np.ndarray:
    """Tokens whose expert choice equals the reference (all of them, barring exact near-ties)."""
    same = (ids == ref_ids).all(axis=-1)
    assert same.mean() >= 0.99, f"routing agreement {same.mean():.4f}"
    return same


SHAPES = [(1, 1), (2, 64), (3, 37)]


@pytest.mark.parametrize("shape", SHAPES)
def test_full_layer_fp32_matches_the_model(backend, model, shape) -> None:
    module = CustomOpPiMoE(model, "fp32").eval()
    x = np.random.default_rng(1).standard_normal((*shape, model.hidden_size)).astype(np.float32)
    y, ids, w = layer_through_plugins(backend, module, x)
    with torch.no_grad():
        ref, info = model(torch.from_numpy(x), return_routing_info=True)
    ref, ref_ids, ref_w = ref.numpy(), info.ids.numpy(), info.weights.numpy()
    same = same_routing(ids, ref_ids)
    np.testing.assert_allclose(w[same], ref_w[same], rtol=2e-6, atol=1e-7)
    stats = error_stats(ref[same], y[same])
    assert stats.max_abs <= 2e-5 * max(stats.ref_max_abs, 1e-3), stats
    assert stats.rel_l2 <= 1e-5, stats


@pytest.mark.parametrize("shape", SHAPES)
def test_full_layer_fp16_within_documented_tolerance(backend, model, shape) -> None:
    module16 = CustomOpPiMoE(model, "fp16").eval()
    x = np.random.default_rng(2).standard_normal((*shape, model.hidden_size)).astype(np.float16)
    y, ids, w = layer_through_plugins(backend, module16, x)
    assert y.dtype == np.float16 and ids.dtype == np.int32 and w.dtype == np.float32
    with torch.no_grad():
        ref16, ref_ids, ref_w = (t.numpy() for t in module16(torch.from_numpy(x)))
        ref32 = model(torch.from_numpy(x.astype(np.float32))).numpy()
    same = same_routing(ids, ref_ids)
    np.testing.assert_allclose(w[same], ref_w[same], rtol=2e-6, atol=1e-7)
    stats = error_stats(ref16[same].astype(np.float32), y[same].astype(np.float32))
    assert stats.max_abs <= FP16_MAX_ABS * stats.ref_max_abs, stats
    assert stats.rel_l2 <= FP16_REL_L2, stats
    assert error_stats(ref32[same], y[same].astype(np.float32)).rel_l2 <= FP16_VS_FP32_REL_L2


def determinism_shape(backend) -> tuple[int, int]:
    """384 tokens on a GPU (many blocks in flight at once); 144 on the emulator, which runs blocks one after the
    other, so there the test catches reads of memory nobody wrote (every allocation starts with other garbage,
    plugins/emu) rather than scheduling effects. Both exceed 256 rows per group (64-row tiles, no split-K)."""
    return (4, 96) if backend.name == "trt-harness" else (2, 72)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_two_runs_are_bit_identical(backend, model, precision) -> None:
    module = CustomOpPiMoE(model, precision).eval()
    dtype = np.float32 if precision == "fp32" else np.float16
    x = np.random.default_rng(3).standard_normal((*determinism_shape(backend), model.hidden_size)).astype(dtype)
    first = layer_through_plugins(backend, module, x)
    second = layer_through_plugins(backend, module, x)
    for a, b in zip(first, second, strict=True):
        assert a.tobytes() == b.tobytes()


# ------------------------------------------------------------------------------------------ INT8 (W8A8)
INT8_REL_L2 = 1e-3
_INT8: dict[tuple[int, str], tuple[object, object]] = {}


@pytest.fixture(scope="module")
def int8_module():
    """FakeQuantPiMoE of `model` with the quantisation parameters `quantize_model` writes into its INT8 ONNX
    (`calibrated_params`, the same function; test_quantize.py checks that the file carries them exactly), calibrated
    on 512 seeded tokens that no test input reuses. Nothing is exported: the GPU run does not depend on the exporter
    of the GPU machine (its torch and onnx-ir versions; scripts/gpu_check.sh runs these tests with
    PIMOE_TESTS_NO_EXPORT=1, which makes any export fail)."""
    from pimoe_export.quantize import calibrated_params
    from pimoe_export.quantize.int8 import FakeQuantPiMoE

    def get(model, mode: str):
        key = (id(model), mode)  # the cache keeps `model` alive, so its id cannot be reused by another model
        if key not in _INT8:
            calibration = torch.randn(8, 64, model.hidden_size, generator=torch.Generator().manual_seed(100))
            params = calibrated_params(model, calibration=calibration, method="max", mode=mode)[""]
            _INT8[key] = (model, FakeQuantPiMoE(model, params).eval())
        return _INT8[key][1]

    return get


def assert_routing_identical(module, x: np.ndarray, ids: np.ndarray, ref_ids: np.ndarray) -> np.ndarray:
    """ids equal the reference's; a token may differ only at an exact near-tie of the fp32 router (|gap| <= 1e-6
    between the GPU's and the CPU's softmax), which the same inputs cannot otherwise produce."""
    same = (ids == ref_ids).all(axis=-1)
    if not same.all():
        with torch.no_grad():
            logits = module.router.compute_logits(torch.from_numpy(x.reshape(-1, x.shape[-1])).float())
            scores = (torch.softmax(logits, -1) + module.router.selection_bias.float()).numpy()
        flat, ref_flat = ids.reshape(len(scores), -1), ref_ids.reshape(len(scores), -1)
        for t in np.nonzero(~same.reshape(-1))[0]:
            np.testing.assert_allclose(np.sort(scores[t, flat[t]]), np.sort(scores[t, ref_flat[t]]), rtol=0,
                                       atol=1e-6, err_msg=f"token {t}: routing differs without a tie")
    return same


@pytest.mark.parametrize("mode", ["w8a8", "w8a8_dynamic"])
@pytest.mark.parametrize("shape", SHAPES)
def test_full_layer_int8_matches_the_fake_quant_reference(backend, model, int8_module, mode, shape) -> None:
    module = int8_module(model, mode)
    x = np.random.default_rng(5).standard_normal((*shape, model.hidden_size)).astype(np.float32)
    y, ids, w = layer_through_plugins(backend, module, x)
    with torch.no_grad():
        ref, ref_ids, ref_w = (t.numpy() for t in module(torch.from_numpy(x)))
    same = assert_routing_identical(module, x, ids, ref_ids)
    np.testing.assert_allclose(w[same], ref_w[same], rtol=2e-6, atol=1e-7)
    stats = error_stats(ref[same], y[same])
    assert stats.rel_l2 <= INT8_REL_L2, stats


@pytest.mark.parametrize("mode", ["w8a8", "w8a8_dynamic"])
def test_int8_two_runs_are_bit_identical(backend, model, int8_module, mode) -> None:
    module = int8_module(model, mode)
    x = np.random.default_rng(6).standard_normal((*determinism_shape(backend), model.hidden_size)).astype(np.float32)
    first = layer_through_plugins(backend, module, x)
    second = layer_through_plugins(backend, module, x)
    for a, b in zip(first, second, strict=True):
        assert a.tobytes() == b.tobytes()


def test_empty_batch_gives_empty_outputs(backend, model) -> None:
    module = CustomOpPiMoE(model, "fp32").eval()
    y, ids, w = layer_through_plugins(backend, module, np.zeros((0, 5, model.hidden_size), np.float32))
    assert y.shape == (0, 5, model.hidden_size) and ids.shape == (0, 5, model.config.top_k) and w.size == 0


# ------------------------------------------------------------------------------------------ kernels at scale
@pytest.mark.parametrize(("n", "e", "k"), [(3000, 1024, 16), (257, 8, 2), (1, 64, 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_route_at_scale(backend, n, e, k, dtype) -> None:
    rng = np.random.default_rng(n + e)
    logits = rng.normal(0, 3, size=(n, e)).astype(dtype)
    logits[0, :3] = [np.nan, np.inf, -np.inf][: min(3, e)]
    bias = rng.normal(0, 0.01, size=e).astype(np.float32)
    weights, ids = backend.route(logits, bias, k, True)
    assert ((ids >= 0) & (ids < e)).all()
    ref_w, ref_ids = functional.route(torch.from_numpy(logits), torch.from_numpy(bias), k, True)
    same = (ids == ref_ids.numpy()).all(axis=1)
    assert same.mean() >= 0.999 and same[0]  # the NaN row is fixed exactly: experts 0..k-1
    np.testing.assert_allclose(weights[same], ref_w.numpy()[same], rtol=4e-6, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize(("n", "k", "e", "h"), [(40000, 2, 64, 8), (5000, 16, 1024, 3), (1023, 2, 8, 512)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_dispatch_and_combine_at_scale(backend, n, k, e, h, dtype) -> None:
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, h)).astype(dtype)
    ids = np.stack([rng.permutation(e)[:k] for _ in range(min(n, 64))] * (n // 64 + 1))[:n].astype(np.int32)
    x_sorted, offsets, f2s = backend.dispatch(x, ids, e)
    ref = functional.dispatch(torch.from_numpy(x), torch.from_numpy(ids), e)
    np.testing.assert_array_equal(offsets, ref[1].numpy())
    np.testing.assert_array_equal(f2s, ref[2].numpy())
    np.testing.assert_array_equal(x_sorted, ref[0].numpy())
    weights = rng.random(size=(n, k)).astype(np.float32)
    y = backend.combine(x_sorted, f2s, weights)
    ref_y = functional.combine(ref[0], ref[2], torch.from_numpy(weights)).numpy()
    np.testing.assert_array_equal(y, ref_y)  # bit-exact: no FMA contraction, slot order


@pytest.mark.parametrize("widths", [[64, 256, 64], [512, 2048, 512], [40, 24, 72, 8], [13, 37, 5]])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("rows_per_expert", [3, 150])  # 3: few rows, the fp16 GEMM splits K (decode shapes)
def test_expert_mlp_at_scale(backend, widths, dtype, layer_norm, rows_per_expert) -> None:
    from test_ops_backends import expert_reference, make_expert_case

    rng = np.random.default_rng(sum(widths) + rows_per_expert)
    x, offsets, params, expert_ids = make_expert_case(rng, e=8, groups=3, widths=widths, layer_norm=layer_norm,
                                                      dtype=dtype, rows_per_expert=rows_per_expert)
    y = backend.expert_mlp(x, offsets, params, expert_ids, widths, "gelu", layer_norm)
    ref = expert_reference(x, offsets, params, expert_ids, widths, "gelu", layer_norm)
    mine = np.zeros(x.shape[0], dtype=bool)
    for e in expert_ids:
        mine[offsets[e]:offsets[e + 1]] = True
    assert (y[~mine] == 0).all()
    if dtype == np.float32:
        scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=2e-5 * scale)
    else:
        np.testing.assert_allclose(y.astype(np.float32), ref.astype(np.float32), rtol=2e-3, atol=2e-3)


def w8a8_case(widths, dtype, layer_norm, rows_per_expert, mode, seed):
    """(x, offsets, int8 params, weight codes, act_scales, expert_ids) of 3 experts out of 8 with SmoothQuant
    divisors != 1; x holds a NaN, an inf and an all-zero row when there are rows for them."""
    from test_ops_backends import make_expert_case, quantize_case

    rng = np.random.default_rng(seed)
    x, offsets, params, expert_ids = make_expert_case(rng, e=8, groups=3, widths=widths, layer_norm=layer_norm,
                                                      dtype=dtype, rows_per_expert=rows_per_expert)
    if x.shape[0] >= 3:
        x[0, 0], x[1, -1], x[2] = np.nan, np.inf, 0
    qparams, codes, act_scales = quantize_case(rng, x, params, widths, layer_norm, 3, mode)
    return x, offsets, qparams, codes, act_scales, expert_ids


def w8a8_reference(x, offsets, qparams, expert_ids, widths, activation, layer_norm, mode, act_scales):
    import pimoe_export.ops.torch_ops as ops

    return ops.expert_mlp(torch.from_numpy(x), torch.from_numpy(offsets), [torch.from_numpy(p) for p in qparams],
                          expert_ids, list(widths), activation, layer_norm, 1e-5, mode, act_scales).numpy()


W8A8_WIDTHS = [[64, 256, 64], [512, 2048, 512], [40, 24, 72, 8], [13, 37, 5]]  # aligned (16-byte) and not


@pytest.mark.parametrize("widths", W8A8_WIDTHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["w8a8", "w8a8_dynamic"])
@pytest.mark.parametrize("rows_per_expert", [3, 150])  # 3: 16-row tiles + split-K; 150: 64-row tiles
def test_expert_mlp_w8a8_bit_exact_without_transcendentals(backend, widths, dtype, mode, rows_per_expert) -> None:
    """relu and no LayerNorm: every step (x / act_smooth, the scale, round half to even, the exact int32 sum,
    float(acc) * (s * w_scale) + b, relu) is one IEEE operation on both sides, so the int8 kernels must equal the
    fake-quant reference bit for bit (NaN where it has NaN), hidden layers included."""
    x, offsets, qparams, _, act_scales, expert_ids = w8a8_case(widths, dtype, False, rows_per_expert, mode,
                                                               sum(widths) + rows_per_expert)
    y = backend.expert_mlp(x, offsets, qparams, expert_ids, widths, "relu", False, quant_mode=mode,
                           act_scales=act_scales)
    ref = w8a8_reference(x, offsets, qparams, expert_ids, widths, "relu", False, mode, act_scales)
    assert y.dtype == x.dtype and y.shape == ref.shape
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("widths", W8A8_WIDTHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["w8a8", "w8a8_dynamic"])
@pytest.mark.parametrize("rows_per_expert", [3, 150])
def test_expert_mlp_w8a8_at_scale(backend, widths, dtype, mode, rows_per_expert) -> None:
    """LayerNorm + GELU: the fp32 LayerNorm and erf differ from PyTorch's by ulps, which can move a hidden code by
    one step at a rounding boundary: |y - ref| <= s_a * w_scale * sum|q_w| of the last layer (static scales), 1e-2
    relative for dynamic scales (the row scale itself moves by ulps), plus the fp16 rounding of the output."""
    x, offsets, qparams, codes, act_scales, expert_ids = w8a8_case(widths, dtype, True, rows_per_expert, mode,
                                                                   7 * sum(widths) + rows_per_expert)
    x[np.isinf(x)] = 0  # LayerNorm of an inf row is NaN on both sides; keep the bound meaningful
    y = backend.expert_mlp(x, offsets, qparams, expert_ids, widths, "gelu", True, quant_mode=mode,
                           act_scales=act_scales)
    ref = w8a8_reference(x, offsets, qparams, expert_ids, widths, "gelu", True, mode, act_scales)
    mine = np.zeros(x.shape[0], dtype=bool)
    for e in expert_ids:
        mine[offsets[e]:offsets[e + 1]] = True
    assert (y[~mine] == 0).all()
    y32, ref32 = y.astype(np.float64), ref.astype(np.float64)
    assert np.array_equal(np.isnan(y32), np.isnan(ref32))
    y32, ref32 = np.nan_to_num(y32), np.nan_to_num(ref32)
    scale = max(1.0, float(np.abs(ref32).max(initial=0.0)))
    slack = 1e-5 * scale + (2e-3 * np.abs(ref32) + 1e-3 if dtype == np.float16 else 0.0)
    if len(widths) == 2 or mode == "w8a8_dynamic":
        np.testing.assert_allclose(y32, ref32, rtol=1e-2 if len(widths) > 2 else 1e-6, atol=1e-2 * scale)
        return
    q_last, s_last = codes[-1]
    l1 = np.abs(q_last.astype(np.float64)).sum(axis=-1)  # [G, out]
    for g, e in enumerate(expert_ids):
        lo, hi = offsets[e], offsets[e + 1]
        a_scale = act_scales[(len(widths) - 2) * 3 + g]
        bound = a_scale * s_last[g] * l1[g] + (slack if np.isscalar(slack) else slack[lo:hi])
        assert (np.abs(y32[lo:hi] - ref32[lo:hi]) <= bound).all(), (g, np.abs(y32[lo:hi] - ref32[lo:hi]).max())


# ------------------------------------------------------------------------------------------ bad arguments / data
def _bad_argument_cases():
    from test_trt_harness_prepare import BAD

    return BAD


@pytest.mark.parametrize(("op", "attrs", "inputs", "fragment"), _bad_argument_cases(),
                         ids=[b[3][:40] for b in _bad_argument_cases()])
def test_bad_arguments_give_errors_with_device_tensors(backend, op, attrs, inputs, fragment) -> None:
    """Bad fields, wrong shapes/dtypes, k > E, w8a8: an error naming the problem, no launch, no crash (run in a
    separate process, tests/isolated.py: a check that let the case through and crashed fails this case)."""
    from isolated import assert_refused, harness_backend_run, isolated

    arrays = [np.zeros(shape, dtype=dtype) for shape, dtype in inputs]
    outcome = isolated().call(harness_backend_run, backend.harness.emulated, op, attrs, arrays)
    assert_refused(outcome, fragment, f"{backend.name}: {op} {attrs}", ("HarnessError",))


def run_isolated(backend, op: str, attrs, arrays, check_status: bool = True):
    """``op`` on bad input data in a separate process (tests/isolated.py): a kernel that let the data through and
    read or wrote out of bounds fails the one test that fed it instead of crashing the test run."""
    from isolated import harness_backend_run, isolated

    return isolated().call(harness_backend_run, backend.harness.emulated, op, attrs, arrays, check_status)


def test_ids_out_of_range_are_reported_and_clamped(backend) -> None:
    from isolated import assert_ran, assert_refused

    x = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    ids = np.array([[0, 1], [2, 9], [3, -4], [1, 2], [0, 3], [2, 1]], dtype=np.int32)
    outcome = run_isolated(backend, schema.DISPATCH, {"num_experts": 4}, [x, ids])
    assert_refused(outcome, "flat index 3) holds expert id 9", f"{backend.name}: dispatch id 9 with E = 4",
                   ("HarnessDataError",))
    x_sorted, offsets, f2s = assert_ran(run_isolated(backend, schema.DISPATCH, {"num_experts": 4}, [x, ids], False),
                                        f"{backend.name}: dispatch id 9, status unchecked")
    assert offsets[0] == 0 and offsets[-1] == 12 and (np.diff(offsets) >= 0).all()
    assert sorted(f2s.tolist()) == list(range(12))  # still a permutation: every row written exactly once
    np.testing.assert_array_equal(x_sorted[f2s], np.repeat(x, 2, axis=0))


def test_bad_offsets_zero_the_output_and_are_reported(backend) -> None:
    from isolated import assert_ran, assert_refused

    rng = np.random.default_rng(1)
    widths = [8, 16, 8]
    params = [rng.standard_normal((1, 16, 8)), np.zeros((1, 16)), np.ones((1, 16)), np.zeros((1, 16)),
              rng.standard_normal((1, 8, 16)), np.zeros((1, 8))]
    params = [p.astype(np.float32) for p in params]
    attrs = expert_mlp_fields([1], widths, "relu", True)
    x = rng.standard_normal((10, 8)).astype(np.float32)
    for bad in ([0, 4, 2, 10], [0, 4, 8, 11], [3, 4, 8, 10], [0, 4, 2_000_000_000, 10]):
        offsets = np.array(bad, dtype=np.int32)
        assert_refused(run_isolated(backend, schema.EXPERT_MLP, attrs, [x, offsets, *params]),
                       "offsets is not a partition", f"{backend.name}: offsets {bad}", ("HarnessDataError",))
        y = assert_ran(run_isolated(backend, schema.EXPERT_MLP, attrs, [x, offsets, *params], False),
                       f"{backend.name}: offsets {bad}, status unchecked")[0]
        assert (y == 0).all()


def test_flat_to_sorted_out_of_range_gives_nan_and_an_error(backend) -> None:
    from isolated import assert_ran, assert_refused

    rng = np.random.default_rng(2)
    y_sorted = rng.standard_normal((6, 5)).astype(np.float32)
    weights = rng.random((3, 2)).astype(np.float32)
    f2s = np.array([0, 1, 2, 99, 4, 5], dtype=np.int32)
    assert_refused(run_isolated(backend, schema.COMBINE, {}, [y_sorted, f2s, weights]), "flat_to_sorted[3] = 99",
                   f"{backend.name}: combine slot 99 with N*k = 6", ("HarnessDataError",))
    y = assert_ran(run_isolated(backend, schema.COMBINE, {}, [y_sorted, f2s, weights], False),
                   f"{backend.name}: combine slot 99, status unchecked")[0]
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()


UNCHECKED_FAULTS = """
import sys
import numpy as np
from pimoe_export.ops import schema
from pimoe_export.testing.harness import Harness, HarnessDataError

h = Harness(sys.argv[1])
x = np.arange(48, dtype=np.float32).reshape(6, 8)
ids = np.array([[0, 1], [2, 9], [3, -4], [1, 2], [0, 3], [2, 1]], dtype=np.int32)  # flat 3 and 5 out of range
for runs, check in ((3, False), (1, True)):
    prepared = h.prepare(schema.DISPATCH, {"num_experts": 4}, [(x.shape, x.dtype), (ids.shape, ids.dtype)])
    ins = [h.alloc(a.nbytes) for a in (x, ids)]
    h.upload(ins[0], x)
    h.upload(ins[1], ids)
    outs = [h.alloc(int(np.prod(s)) * np.dtype(d).itemsize) for s, d in prepared.outputs]
    workspace = h.alloc(max(prepared.workspace, 256))
    for _ in range(runs):
        h.enqueue(prepared, ins, outs, workspace)
    if check:
        try:
            h.check_status(prepared)
        except HarnessDataError as exc:
            print("checked:", exc, flush=True)
    print(f"released after {runs} runs", flush=True)
    h.release(prepared)
"""


def test_unchecked_faults_are_counted_and_reported_at_teardown(backend) -> None:
    """What a TensorRT user sees of bad input data without PIMOE_TRT_SYNC_CHECK (issue 25, fix 2): the kernels
    record and count it in the plugin's own status block (not in the workspace that the next layer reuses), across
    runs and without any synchronisation, and the plugin's teardown logs the count and the lowest offender. A check
    (the harness's, or the sync check) reads and clears the block, so a checked fault is not reported again."""
    env = {**os.environ, "PIMOE_TRT_LOG": "warning"}
    result = subprocess.run([sys.executable, "-c", UNCHECKED_FAULTS, backend.harness.path], capture_output=True,
                            text=True, timeout=300, env=env, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "inconsistent input entr" in line]
    # 2 bad ids per run, 3 unchecked runs; the checked plugin says nothing at teardown
    assert len(warnings) == 1 and "PiMoEDispatch: 6 inconsistent input entries" in warnings[0], result.stderr
    assert "(flat index 3) holds expert id 9" in warnings[0], warnings[0]
    assert "checked: PiMoEDispatch: ids (flat index 3) holds expert id 9" in result.stdout, result.stdout


SYNC_CHECKED = """
import sys
import numpy as np
from pimoe_export.ops import schema
from pimoe_export.testing.harness import Harness, HarnessError

h = Harness(sys.argv[1])
x = np.arange(48, dtype=np.float32).reshape(6, 8)
bad = np.array([[0, 1], [2, 9], [3, -4], [1, 2], [0, 3], [2, 1]], dtype=np.int32)  # flat 3 and 5 out of range
good = np.array([[0, 1], [2, 3], [3, 0], [1, 2], [0, 3], [2, 1]], dtype=np.int32)
prepared = h.prepare(schema.DISPATCH, {"num_experts": 4}, [(x.shape, x.dtype), (bad.shape, bad.dtype)])
ins = [h.alloc(a.nbytes) for a in (x, bad)]
h.upload(ins[0], x)
outs = [h.alloc(int(np.prod(s)) * np.dtype(d).itemsize) for s, d in prepared.outputs]
workspace = h.alloc(max(prepared.workspace, 256))
for name, ids in (("bad", bad), ("good", good)):  # the same plugin, the same buffers
    h.upload(ins[1], ids)
    try:
        h.enqueue(prepared, ins, outs, workspace)
        print(f"{name} ids: enqueued", flush=True)
    except HarnessError as exc:
        print(f"{name} ids: refused: {type(exc).__name__}: {exc}", flush=True)
print("offsets", h.download(outs[1], 5 * 4).view(np.int32).tolist(), flush=True)
h.release(prepared)
print("released", flush=True)
"""
#: the offsets of the good ids of SYNC_CHECKED, counted by hand: each of the 4 experts is chosen 3 times
GOOD_OFFSETS = "offsets [0, 3, 6, 9, 12]"
BAD_ID = "PiMoEDispatch: ids (flat index 3) holds expert id 9"


def run_harness_script(backend, script: str, log: str | None, sync_check: str | None) -> tuple[str, str]:
    """(stdout, stderr) of `script` in a fresh process, with PIMOE_TRT_LOG and PIMOE_TRT_SYNC_CHECK as given (None:
    unset). A fresh process each time: the plugins read both variables once per process."""
    env = {k: v for k, v in os.environ.items() if k not in ("PIMOE_TRT_LOG", "PIMOE_TRT_SYNC_CHECK")}
    env.update({k: v for k, v in (("PIMOE_TRT_LOG", log), ("PIMOE_TRT_SYNC_CHECK", sync_check)) if v is not None})
    result = subprocess.run([sys.executable, "-c", script, backend.harness.path], capture_output=True, text=True,
                            timeout=300, env=env, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result.stdout, result.stderr


def test_the_sync_check_fails_the_enqueue_that_met_bad_data_and_clears_the_status(backend) -> None:
    """docs/trt_plugins.md: "PIMOE_TRT_SYNC_CHECK=1 makes each enqueue synchronise, read, clear and fail on it":
    the enqueue of out-of-range ids fails with the plugin's reason; the status block is then clear, so the next
    enqueue of good ids on the same plugin succeeds (and computes them), and the teardown has nothing to report."""
    out, err = run_harness_script(backend, SYNC_CHECKED, None, "1")
    assert f"bad ids: refused: HarnessError: {BAD_ID}" in out, out + err
    assert "good ids: enqueued" in out, out + err
    assert GOOD_OFFSETS in out and "released" in out, out
    assert "inconsistent input entr" not in err, err


@pytest.mark.parametrize("sync_check", [None, "0"], ids=["unset", "0"])
def test_without_the_sync_check_bad_data_is_enqueued_and_reported_at_teardown(backend, sync_check) -> None:
    """Only "1" turns the check on (the default, and "0", leave enqueue free of synchronisation): both enqueues
    succeed, and the teardown warning counts the two bad ids of the first."""
    out, err = run_harness_script(backend, SYNC_CHECKED, None, sync_check)
    assert "bad ids: enqueued" in out and "good ids: enqueued" in out and GOOD_OFFSETS in out, out + err
    warnings = [line for line in err.splitlines() if "inconsistent input entr" in line]
    assert len(warnings) == 1 and "PiMoEDispatch: 2 inconsistent input entries" in warnings[0], err
    assert BAD_ID in warnings[0], warnings[0]


@pytest.mark.parametrize(("log", "warnings", "errors"), [(None, 1, 1), ("warning", 1, 1), ("error", 0, 1),
                                                         ("off", 0, 0)], ids=["unset", "warning", "error", "off"])
def test_the_log_level_decides_what_reaches_stderr(backend, log, warnings, errors) -> None:
    """docs/trt_plugins.md: the reason is printed to stderr ("[pimoe-trt] ERROR: ...", level from
    PIMOE_TRT_LOG=off|error|warning|info|verbose), and "by default ... when the execution context is destroyed, one
    warning on stderr". The teardown warning (UNCHECKED_FAULTS) shows at the default and at "warning"; an enqueue's
    error (the sync check) at all but "off". At "off" the plugins print nothing, and the error still reaches the
    caller (the thread's last error is kept)."""
    out, err = run_harness_script(backend, UNCHECKED_FAULTS, log, None)
    found = [line for line in err.splitlines() if line.startswith("[pimoe-trt] WARNING: ")]
    assert len(found) == warnings, err
    if warnings:
        assert "PiMoEDispatch: 6 inconsistent input entries" in found[0], found
    assert f"checked: {BAD_ID}" in out, out
    if log == "off":
        assert "[pimoe-trt]" not in err, err
    out, err = run_harness_script(backend, SYNC_CHECKED, log, "1")
    found = [line for line in err.splitlines() if line.startswith("[pimoe-trt] ERROR: ")]
    assert len(found) == errors, err
    if errors:
        assert found[0] == (f"[pimoe-trt] ERROR: {BAD_ID} outside [0, num_experts); it was clamped. ids must "
                            "come from PiMoERoute over the same experts."), found
    assert f"bad ids: refused: HarnessError: {BAD_ID}" in out, out + err
    if log == "off":
        assert "[pimoe-trt]" not in err, err


def test_sanitizer_case(backend) -> None:
    """Small but complete: every kernel on both dtypes, plus the bad-data paths (compute-sanitizer runs this)."""
    model = create_from_preset("tiny", seed=5)
    for precision, dtype in (("fp32", np.float32), ("fp16", np.float16)):
        module = CustomOpPiMoE(model, precision).eval()
        x = np.random.default_rng(4).standard_normal((2, 33, model.hidden_size)).astype(dtype)
        y, _, _ = layer_through_plugins(backend, module, x)
        assert np.isfinite(y.astype(np.float32)).all()
    for dtype in (np.float16, np.float32):  # vector loads, split-K (fp16, few rows), SIMT (fp32)
        test_expert_mlp_at_scale(backend, [64, 256, 64], dtype, True, 3)
    # int8: 16-row tiles + split-K + asynchronous copies; 64-row tiles + scalar weight path; both scale modes
    test_expert_mlp_w8a8_bit_exact_without_transcendentals(backend, [64, 256, 64], np.float16, "w8a8", 3)
    test_expert_mlp_w8a8_bit_exact_without_transcendentals(backend, [40, 24, 72, 8], np.float32, "w8a8_dynamic", 150)
    test_expert_mlp_w8a8_at_scale(backend, [64, 256, 64], np.float32, "w8a8_dynamic", 3)
    test_ids_out_of_range_are_reported_and_clamped(backend)
    test_bad_offsets_zero_the_output_and_are_reported(backend)
    test_flat_to_sorted_out_of_range_gives_nan_and_an_error(backend)
    contract_v2_paths(backend)


def contract_v2_paths(backend) -> None:
    """Every contract-v2 kernel path once: grouped sigmoid routing and softmax_topk, the expert-order combine, gated
    layers (fp32 SIMT, fp16 split-K and 64-row tiles, W8A8 with swiglu_oai), bias-free."""
    from test_ops_backends import make_expert_case, quantize_case

    import pimoe_export.ops.torch_ops as ops

    rng = np.random.default_rng(9)
    logits = rng.normal(size=(40, 64)).astype(np.float32)
    bias = rng.normal(0, 0.1, 64).astype(np.float32)
    grouped = {"scoring": "sigmoid", "num_groups": 8, "groups_kept": 4, "group_score": "sum_top2",
               "routed_scaling_factor": 2.5, "normalize_eps": 1e-20}
    for attrs, b in ((grouped, bias), ({"scoring": "softmax_topk"}, None)):
        weights, ids = backend.route(logits, b, 8, True, **attrs)
        ref_w, ref_ids = functional.route(torch.from_numpy(logits), None if b is None else torch.from_numpy(b), 8,
                                          True, **attrs)
        np.testing.assert_array_equal(ids, ref_ids.numpy())
        np.testing.assert_allclose(weights, ref_w.numpy(), rtol=2e-6, atol=1e-7)
    y_sorted = rng.normal(size=(320, 48)).astype(np.float32)
    f2s = rng.permutation(320).astype(np.int32)
    np.testing.assert_array_equal(backend.combine(y_sorted, f2s, weights, order="expert"),
                                  functional.combine(torch.from_numpy(y_sorted), torch.from_numpy(f2s),
                                                     torch.from_numpy(weights), "expert").numpy())
    widths = [64, 96, 64]
    for dtype, rows, mode, activation in ((np.float32, 3, "none", "silu"), (np.float16, 2, "none", "gelu"),
                                          (np.float16, 90, "none", "silu"), (np.float32, 3, "w8a8", "swiglu_oai"),
                                          (np.float16, 90, "w8a8_dynamic", "silu")):
        xs, offs, params, group = make_expert_case(rng, e=4, groups=2, widths=widths, layer_norm=False, dtype=dtype,
                                                   rows_per_expert=rows, gated=True, bias=False)
        scales: list[float] = []
        if mode != "none":
            params, _, scales = quantize_case(rng, xs, params, widths, False, 2, mode, bias=False)
        y = backend.expert_mlp(xs, offs, params, group, widths, activation, False, quant_mode=mode, act_scales=scales,
                               gated=True, bias=False)
        ref = ops.expert_mlp(torch.from_numpy(xs), torch.from_numpy(offs), [torch.from_numpy(p) for p in params],
                             group, widths, activation, False, 1e-5, mode, scales, gated=True, bias=False).numpy()
        scale = max(1.0, float(np.abs(ref.astype(np.float32)).max(initial=0.0)))
        np.testing.assert_allclose(y.astype(np.float32), ref.astype(np.float32), rtol=2e-2, atol=2e-2 * scale)
