"""The ONNX Runtime ops at boundaries built on purpose, each against an independent reference.

The hypothesis op tests (tests/ops/test_ops_backends.py) draw random cases; mutation testing of plugins/
(scripts/mutate_cpp.py, docs/mutation.md) showed which boundaries such cases never hit. Here they are constructed:
exact ties in routing scores (ties go to the lower index), NaN mixed with numbers in one row (NaN ranks after every
number), every fp16 bit pattern through the fp16 conversions, activations exactly half-way between two int8 codes
(round half to even), ids exactly E (one past the end), op attributes at non-default values (eps, activation,
layer_norm), and shapes past the kernels' task and cache blocks (64 rows, 48 rows, 128 columns, 256 k values).
References are float64 numpy (or numpy's own float16 rounding) written from docs/op_contract.md, never the package's
PyTorch reference. The ties, NaN, rounding and exact-value cases run on every backend implementing the ops
(tests/backends.py: the PyTorch reference, the ONNX Runtime CPU library, the TensorRT plugins on a GPU through the
harness, the same plugins and CUDA kernels on the emulated GPU, the ORT CUDA-EP kernels on the emulated GPU); a
backend is skipped only where it is not built (the reason is the skip's message). Every other CPU kernel set this
machine runs (generic; avx2 where the library picks avx512; the AVX-512 source on SIMDe) runs the ONNX Runtime
cases in a subprocess (PIMOE_CPU_ISA, tests/cpu_kernel_sets.py). Refusals whose message is the ONNX Runtime
library's own stay on it here; the same limits on every backend, each in a separate process so that a backend that
accepted them and crashed fails one test, are in tests/ops/test_refusals_isolated.py.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from backends import ALL_BACKEND_PARAMS, OrtOpBackend, get_backend
from cpu_kernel_sets import other_kernel_sets
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, RuntimeException
from oracle import select_topk

from pimoe_export.errors import ArtifactError
from pimoe_export.ops import schema

f32, f16, i32 = np.float32, np.float16, np.int32
ORT_ERRORS = (Fail, InvalidArgument, InvalidGraph, RuntimeException, ArtifactError)


ORT_ERROR_NAMES = tuple(t.__name__ for t in ORT_ERRORS)


class Refused(Exception):
    """An ONNX Runtime error raised in the worker process, as its type name and message."""


class IsolatedOrtBackend(OrtOpBackend):
    """The ONNX Runtime backend, each run in the worker process of tests/isolated.py: a library that accepted an
    out-of-range id, slot or offset and crashed on it fails the test that fed it (an assertion naming the case)
    instead of killing the test run. A refusal comes back as ``Refused``; any other outcome is an assertion."""

    def _run(self, model: bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        from isolated import isolated, ort_run

        outcome = isolated().call(ort_run, model, feeds)
        if outcome[0] == "ok":
            return outcome[1]
        assert outcome[0] == "error", f"the ONNX Runtime library crashed instead of refusing: {outcome[1]}"
        assert outcome[1] in ORT_ERROR_NAMES, f"refused with {outcome[1]}, not an ONNX Runtime error: {outcome[2]}"
        raise Refused(outcome[2])


@pytest.fixture(scope="module")
def ort():
    """The ONNX Runtime library for the refusals whose messages are its own (in the worker process)."""
    return IsolatedOrtBackend()


@pytest.fixture(scope="module", params=ALL_BACKEND_PARAMS)
def backend(request):
    """Every backend implementing the ops (skipped only where it is not built)."""
    return get_backend(request.param)


# ------------------------------------------------------------------------------------------ references (float64)
def softmax64(logits: np.ndarray) -> np.ndarray:
    """The contract's softmax: max (NaN propagates), exp(x - max), sum, divide."""
    x = logits.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)


def act64(name: str, x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    if name == "gelu":
        return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if name == "relu":
        return np.where(np.isnan(x), x, np.maximum(x, 0.0))
    if name == "silu":
        return x / (1.0 + np.exp(-x))
    assert name == "tanh"
    return np.tanh(x)


def mlp64(x, params, widths, activation, layer_norm, eps):
    """One expert's stack on float64 rows: Linear, then [LayerNorm] + activation on every hidden layer."""
    h = x.astype(np.float64)
    it = iter(params)
    layers = len(widths) - 1
    for layer in range(layers):
        w, b = next(it).astype(np.float64), next(it).astype(np.float64)
        h = h @ w.T + b
        if layer < layers - 1:
            if layer_norm:
                gamma, beta = next(it).astype(np.float64), next(it).astype(np.float64)
                mean = h.mean(axis=-1, keepdims=True)
                var = ((h - mean) ** 2).mean(axis=-1, keepdims=True)
                h = (h - mean) / np.sqrt(var + eps) * gamma + beta
            h = act64(activation, h)
    return h


def codes_ref(x: np.ndarray, scale: float) -> np.ndarray:
    """int8 activation codes as documented: clamp(round_half_even(x / scale), -127, 127), NaN -> 0."""
    with np.errstate(invalid="ignore"):
        q = np.clip(np.rint(x.astype(np.float64) / scale), -127, 127)
    return np.where(np.isnan(q), 0, q).astype(np.int64)


# ------------------------------------------------------------------------------------------ PiMoERoute
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [f32, f16])
def test_route_exact_ties_go_to_the_lower_index(backend, dtype, normalize) -> None:
    """150 rows (three 64-row tasks) of few distinct logits: every top-k is decided by exact ties."""
    rng = np.random.default_rng(3)
    e = 12
    logits = rng.integers(-1, 2, size=(150, e)).astype(dtype)
    logits[0] = 0  # one row tied everywhere
    for k in (1, 3, e):
        weights, ids = backend.route(logits, None, k, normalize)
        probs = softmax64(logits)
        for row in range(logits.shape[0]):
            want = select_topk(probs[row].tolist(), k)
            assert ids[row].tolist() == want, (k, row, logits[row])
            w = probs[row, want]
            np.testing.assert_allclose(weights[row], w / w.sum() if normalize else w, rtol=1e-6)


def test_route_ties_made_by_the_selection_bias(backend) -> None:
    """Uniform probabilities (1/8, exact) plus a bias with repeated values: the scores tie exactly."""
    logits = np.zeros((3, 8), f32)
    bias = np.array([0.25, 0.5, 0.5, 0.0, 0.25, 0.5, 0.0, 0.25], f32)
    for k in (1, 2, 4, 5, 8):
        weights, ids = backend.route(logits, bias, k, False)
        want = select_topk((0.125 + bias.astype(np.float64)).tolist(), k)
        assert (ids == want).all(), (k, ids[0], want)
        assert (weights == f32(0.125)).all()  # weights are the probabilities, not the biased scores


def test_route_nan_in_the_bias_ranks_after_every_number(backend) -> None:
    logits = np.array([[0.0, 1.5, 3.0, -1.0, 2.0, 0.5]] * 2, f32)
    logits[1] = logits[1][::-1]
    bias = np.array([np.nan, 0.0, np.nan, 0.0, 0.0, np.nan], f32)
    probs = softmax64(logits)
    for k in range(1, 7):  # k > 3 must take the NaN experts, in index order
        weights, ids = backend.route(logits, bias, k, True)
        for row in range(2):
            want = select_topk((probs[row] + bias).tolist(), k)
            assert ids[row].tolist() == want, (k, row)
            w = probs[row, want]
            np.testing.assert_allclose(weights[row], w / w.sum(), rtol=1e-6)


def test_route_nan_or_inf_in_a_row_of_numbers(backend) -> None:
    """NaN, +inf and an all -inf row make the row's softmax NaN (PyTorch semantics): ids are then 0..k-1 and the
    weights NaN; -inf among numbers is a probability of exactly 0; the other rows are untouched."""
    logits = np.array([[0.5, np.nan, 2.0, 1.0], [0.5, np.inf, 2.0, 1.0], [-np.inf] * 4,
                       [0.5, -np.inf, 2.0, 1.0], [0.5, 0.25, 2.0, 1.0]], f32)
    probs = softmax64(logits)
    weights, ids = backend.route(logits, None, 3, False)
    for row in range(logits.shape[0]):
        assert ids[row].tolist() == select_topk(probs[row].tolist(), 3), row
    assert ids[:3].tolist() == [[0, 1, 2]] * 3
    assert np.isnan(weights[:3]).all()
    np.testing.assert_allclose(weights[3:], np.take_along_axis(probs[3:], ids[3:], axis=1), rtol=1e-6)
    assert not np.isnan(weights[3:]).any()


# ------------------------------------------------------------------------------------------ PiMoEDispatch
def test_dispatch_accepts_id_e_minus_1(backend) -> None:
    e = 5
    x = np.arange(12, dtype=f32).reshape(3, 4)
    ids = np.array([[e - 1, 0], [e - 1, e - 1], [2, 0]], i32)
    x_sorted, offsets, f2s = backend.dispatch(x, ids, e)
    # stable counting sort by id, ties in flat order
    order = np.argsort(ids.reshape(-1), kind="stable")
    np.testing.assert_array_equal(x_sorted, x[order // 2])
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(np.bincount(ids.reshape(-1), minlength=e))]))
    np.testing.assert_array_equal(f2s[order], np.arange(6))


def test_dispatch_refuses_id_e(ort) -> None:
    e = 5
    x = np.arange(12, dtype=f32).reshape(3, 4)
    ids = np.array([[e - 1, 0], [e - 1, e - 1], [2, 0]], i32)
    for bad in (e, -1):
        ids_bad = ids.copy()
        ids_bad[2, 1] = bad
        with pytest.raises(Refused, match=rf"ids\[2, 1\] = {bad} is outside \[0, {e}\)"):
            ort.dispatch(x, ids_bad, e)


# ------------------------------------------------------------------------------------------ PiMoECombine
def test_combine_takes_flat_to_sorted_up_to_n_times_k_minus_1(backend) -> None:
    y_sorted = np.arange(12, dtype=f32).reshape(6, 2)
    weights = np.full((3, 2), 0.5, f32)
    f2s = np.array([5, 4, 3, 2, 1, 0], i32)
    y = backend.combine(y_sorted, f2s, weights)
    np.testing.assert_array_equal(y, 0.5 * y_sorted[f2s].reshape(3, 2, 2).sum(axis=1))


def test_combine_refuses_flat_to_sorted_equal_to_n_times_k(ort) -> None:
    y_sorted = np.arange(12, dtype=f32).reshape(6, 2)
    weights = np.full((3, 2), 0.5, f32)
    for bad in (6, -1):
        with pytest.raises(Refused, match=rf"flat_to_sorted\[1\] = {bad} is outside \[0, 6\)"):
            ort.combine(y_sorted, np.array([5, bad, 3, 2, 1, 0], i32), weights)


def test_every_fp16_bit_pattern_converts_exactly(backend) -> None:
    """All 65536 halves through combine (k=1): weight 1 returns them bit for bit (NaN stays NaN); other weights
    round like numpy's float32 -> float16 (round half to even, subnormals, overflow to inf)."""
    halves = np.arange(1 << 16, dtype=np.uint16).view(f16).reshape(-1, 16)
    f2s = np.arange(halves.shape[0], dtype=i32)
    nan = np.isnan(halves)
    for w in (1.0, 0.5, 3.0, 2.0**-10, 1.5, 0.2):
        y = backend.combine(halves, f2s, np.full((halves.shape[0], 1), w, f32))
        with np.errstate(over="ignore", invalid="ignore"):
            want = (halves.astype(f32) * f32(w)).astype(f16)
        assert (np.isnan(y) == nan).all()
        np.testing.assert_array_equal(y[~nan].view(np.uint16), want[~nan].view(np.uint16), err_msg=f"weight {w}")


def test_fp16_rounding_at_the_edges(backend) -> None:
    """float32 -> float16 at the overflow threshold (65520) and at half-way points between subnormal codes."""
    tiny = 2.0**-24  # the smallest fp16 subnormal
    w = np.array([65504, 65519.99, 65520, 1e6, tiny, 0.5 * tiny, 0.5 * tiny * 1.001, 1.5 * tiny, 2.5 * tiny,
                  2.0**-25 * 0.999, 2.0**-14 * (1 - 2.0**-11), 2.0**-14 * (1 - 2.0**-12), 1 + 2.0**-11,
                  1 + 3 * 2.0**-11, -65520, -1.5 * tiny], f32)
    y_sorted = np.ones((w.size, 1), f16)
    y = backend.combine(y_sorted, np.arange(w.size, dtype=i32), w.reshape(-1, 1))
    with np.errstate(over="ignore"):
        want = w.reshape(-1, 1).astype(f16)
    np.testing.assert_array_equal(y.view(np.uint16), want.view(np.uint16))


# ------------------------------------------------------------------------------------------ PiMoEExpertMLP
def float_params(rng, widths, layer_norm, groups=1, dtype=f32):
    params = []
    for layer, role in schema.expert_mlp_param_layout(len(widths) - 1, layer_norm, "none"):
        out, inp = widths[layer + 1], widths[layer]
        if role == "weight":
            params.append((rng.normal(size=(groups, out, inp)) / np.sqrt(inp)).astype(dtype))
        elif role == "ln_gamma":
            params.append(rng.uniform(0.5, 1.5, size=(groups, out)).astype(f32))
        else:
            params.append(rng.normal(0, 0.3, size=(groups, out)).astype(f32))
    return params


def member(params, g):
    return [p[g] for p in params]


@pytest.mark.parametrize("activation", schema.ACTIVATIONS)
@pytest.mark.parametrize(("layer_norm", "eps"), [(True, 0.5), (True, 3e-3), (False, 1e-5)])
def test_expert_mlp_non_default_attributes(backend, activation, layer_norm, eps) -> None:
    """eps, activation and layer_norm at non-default values, two experts of five, each with its own weights."""
    rng = np.random.default_rng(11)
    widths, expert_ids = [13, 24, 9], [1, 4]
    params = float_params(rng, widths, layer_norm, groups=2)
    offsets = np.array([0, 3, 10, 10, 12, 19], i32)
    x = rng.normal(size=(19, widths[0])).astype(f32)
    for constant in (True, False):
        y = backend.expert_mlp(x, offsets, params, expert_ids, widths, activation, layer_norm, eps=eps,
                           constant_params=constant)
        want = np.zeros(y.shape)
        for g, e in enumerate(expert_ids):
            lo, hi = offsets[e], offsets[e + 1]
            want[lo:hi] = mlp64(x[lo:hi], member(params, g), widths, activation, layer_norm, eps)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max()))


def test_expert_mlp_gelu_within_its_error_bound(backend) -> None:
    """Identity weights and zero biases make the op return its own gelu(x) exactly (each GEMM sum has one nonzero
    term): 65536 values over [-9, 9], against float64 erf, within 4e-7 * max(1, |x|). The CPU kernels' rational erf
    (plugins/kernels/cpu/simd_math.h: erf within 3.4e-7) measures at most 2.1e-7 * |x| over every float, near
    x = 4.9; PyTorch's fp32 gelu 3.0e-7 here, near x = -3.4, where 1 + erf cancels. A wrong coefficient or clamp
    of the fit misses the bound."""
    width = 64
    x = np.linspace(-9.0, 9.0, 1024 * width).astype(f32).reshape(-1, width)
    eye = np.eye(width, dtype=f32)[None]
    zero = np.zeros((1, width), f32)
    offsets = np.array([0, len(x)], i32)
    y = backend.expert_mlp(x, offsets, [eye, zero, eye, zero], [0], [width] * 3, "gelu", False)
    want = act64("gelu", x.astype(np.float64))
    err = np.abs(y.astype(np.float64) - want) / np.maximum(1.0, np.abs(x))
    assert err.max() <= 4e-7, f"gelu off by {err.max():.3g} * max(1, |x|) at x = {x.reshape(-1)[err.argmax()]}"


def test_expert_mlp_past_the_kernel_blocks(backend) -> None:
    """K = 300 (two 256-value cache blocks), 140 output columns (two 128-column panel blocks), 100 rows of one
    expert (three 48-row tasks): fp32 to 1e-5 of the float64 result; fp16 in and out to fp16 rounding."""
    rng = np.random.default_rng(5)
    widths = [300, 140, 20]
    params = float_params(rng, widths, True)
    offsets = np.array([0, 0, 100], i32)
    x = rng.normal(size=(100, widths[0])).astype(f32)
    want = mlp64(x, member(params, 0), widths, "gelu", True, 1e-5)
    y = backend.expert_mlp(x, offsets, params, [1], widths, "gelu", True)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    p16 = [p.astype(f16) if i % 4 == 0 else p for i, p in enumerate(params)]  # weights fp16, vectors fp32
    y16 = backend.expert_mlp(x.astype(f16), offsets, p16, [1], widths, "gelu", True)
    want16 = mlp64(x.astype(f16), member(p16, 0), widths, "gelu", True, 1e-5)
    np.testing.assert_allclose(y16.astype(np.float64), want16, rtol=2e-3, atol=2e-3)


def test_expert_mlp_relu_keeps_nan_and_zeroes_other_experts_rows(backend) -> None:
    widths = [8, 16, 4]
    params = float_params(np.random.default_rng(2), widths, False)
    x = np.ones((4, 8), f32)
    x[1, 3] = np.nan
    offsets = np.array([0, 1, 3, 4], i32)  # rows 1..2 belong to expert 1 (this group), rows 0 and 3 to others
    y = backend.expert_mlp(x, offsets, params, [1], widths, "relu", False)
    assert np.isnan(y[1]).all() and not np.isnan(y[2]).any()
    assert (y[[0, 3]] == 0).all()
    np.testing.assert_allclose(y[2], mlp64(x[2:3], member(params, 0), widths, "relu", False, 1e-5)[0], rtol=1e-5)


@pytest.mark.parametrize(("offsets", "fragment"), [([1, 2, 3], r"offsets\[0\] must be 0, got 1"),
                                                  ([0, 3, 2], r"non-decreasing \(offsets\[2\]=2 < 3\)"),
                                                  ([0, 1, 2], r"offsets\[E\]=2 must equal the number of rows 3")])
def test_expert_mlp_refuses_offsets_that_are_not_a_partition_of_the_rows(ort, offsets, fragment) -> None:
    """offsets[0] must be 0, non-decreasing, offsets[E] = rows: each one off by one is refused."""
    widths = [4, 4]
    params = float_params(np.random.default_rng(0), widths, False)
    x = np.ones((3, 4), f32)
    ort.expert_mlp(x, np.array([0, 1, 3], i32), params, [1], widths, "gelu", False)  # the valid neighbour
    for constant in (True, False):
        with pytest.raises(Refused, match=fragment):
            ort.expert_mlp(x, np.array(offsets, i32), params, [1], widths, "gelu", False, constant_params=constant)


def test_expert_mlp_refuses_expert_id_e(ort) -> None:
    widths = [4, 4]
    params = float_params(np.random.default_rng(0), widths, False)
    x = np.ones((3, 4), f32)
    offsets = np.array([0, 1, 3], i32)  # E = 2
    ort.expert_mlp(x, offsets, params, [1], widths, "gelu", False)  # E - 1 is fine
    for constant in (True, False):
        with pytest.raises(Refused, match=r"expert_ids\[0\]=2 is outside \[0, 2\)"):
            ort.expert_mlp(x, offsets, params, [2], widths, "gelu", False, constant_params=constant)


# ------------------------------------------------------------------------------------------ PiMoEExpertMLP, W8A8
HALF_WAY = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 127.5, -127.5, 300.0, -300.0, 3.25, -3.75, 0.0, 7.0]


def w8a8_params(wq, w_scale, smooth, bias):
    return [wq[None], w_scale[None].astype(f32), smooth[None].astype(f32), bias[None].astype(f32)]


@pytest.mark.parametrize("smooth_value", [1.0, 2.0])
def test_w8a8_codes_half_way_round_to_even(backend, smooth_value) -> None:
    """Identity int8 weights and power-of-two scales make y = code * scale exactly, so the activation codes are
    read back: x / scale exactly half-way between two codes must round to even; past +-127 it clamps; NaN -> 0."""
    n = 37  # two 16-wide vector blocks and a tail
    rows = np.array([(HALF_WAY * 3)[i:i + n] for i in range(0, 9)], f32)
    rows[4, 5] = np.nan
    wq = np.eye(n, dtype=np.int8)
    scale = 0.25
    x = rows * f32(scale * smooth_value)  # exact: powers of two
    offsets = np.array([0, rows.shape[0]], i32)
    params = w8a8_params(wq, np.ones(n), np.full(n, smooth_value), np.zeros(n))
    y = backend.expert_mlp(x, offsets, params, [0], [n, n], "gelu", False, quant_mode="w8a8", act_scales=[scale])
    want = codes_ref(x / f32(smooth_value), scale) * scale
    np.testing.assert_array_equal(y, want.astype(f32))


def test_w8a8_dynamic_row_scale_and_exact_integer_gemm(backend) -> None:
    """Dynamic scales: max|row| / 127 (1 for an all-zero row); a row whose max is 127 * 2^-3 has scale 2^-3 exactly.
    Random int8 weights, power-of-two weight scales, 13 rows (two 6-row blocks and a tail), K = 37 (odd: one padded
    k pair): y equals the int64 matmul of the codes times the scales, exactly."""
    rng = np.random.default_rng(9)
    k, out = 37, 19
    codes = rng.integers(-127, 128, size=(13, k))
    codes[:, 0] = 127  # max |x| = 127 * scale
    codes[3] = 0  # all-zero row: scale 1, codes 0
    a_scale = 2.0**-3
    x = (codes * a_scale).astype(f32)
    x[5, 1:4] = [126.5 * a_scale, -0.5 * a_scale, 2.5 * a_scale]  # half-way codes inside the row
    wq = rng.integers(-127, 128, size=(out, k)).astype(np.int8)
    w_scale = 2.0 ** rng.integers(-6, 0, size=out)
    bias = rng.integers(-8, 8, size=out) * 0.5
    params = w8a8_params(wq, w_scale, np.ones(k), bias)
    y = backend.expert_mlp(x, np.array([0, 13], i32), params, [0], [k, out], "gelu", False, quant_mode="w8a8_dynamic")
    row_scale = np.where(np.abs(x).max(axis=1) > 0, np.abs(x).max(axis=1).astype(np.float64) / 127, 1.0)
    q = np.stack([codes_ref(x[r], row_scale[r]) for r in range(13)])
    want = (q @ wq.T.astype(np.int64)) * row_scale[:, None] * w_scale[None] + bias[None]
    np.testing.assert_array_equal(y, want.astype(f32))


def test_w8a8_static_scale_per_layer_and_expert(backend) -> None:
    """act_scales is [layers * G], layer-major: each (layer, expert) uses its own scale (distinct powers of two)."""
    n = 8
    widths = [n, n, n]
    wq = np.eye(n, dtype=np.int8)
    layout = schema.expert_mlp_param_layout(2, False, "w8a8")
    one = {"weight": np.stack([wq, wq]), "w_scale": np.ones((2, n), f32), "act_smooth": np.ones((2, n), f32),
           "bias": np.zeros((2, n), f32)}
    params = [one[role] for _, role in layout]
    act_scales = [2.0**-1, 2.0**-2, 2.0**-3, 2.0**-4]  # (layer 0, g 0), (layer 0, g 1), (layer 1, g 0), (layer 1, g 1)
    x = np.tile(np.array([0.3, 1.1, 2.6, 5.3, 0.05, 0.9, 3.3, 4.4], f32), (4, 1))
    offsets = np.array([0, 2, 4], i32)
    y = backend.expert_mlp(x, offsets, params, [0, 1], widths, "relu", False, quant_mode="w8a8", act_scales=act_scales)
    for g in range(2):
        s0, s1 = act_scales[g], act_scales[2 + g]
        h = np.maximum(codes_ref(x[2 * g], s0) * s0, 0.0)
        want = codes_ref(h.astype(f32), s1) * s1
        np.testing.assert_array_equal(y[2 * g:2 * g + 2], np.tile(want.astype(f32), (2, 1)), err_msg=f"group {g}")


@pytest.mark.parametrize("role", ["w_scale", "act_smooth", "bias"])
def test_w8a8_parameters_of_the_wrong_dtype_are_refused(ort, role) -> None:
    """The contract fixes w_scale, act_smooth and bias to float32: a float16 one is refused, not converted."""
    n = 8
    params = w8a8_params(np.eye(n, dtype=np.int8), np.ones(n), np.ones(n), np.zeros(n))
    index = ["weight", "w_scale", "act_smooth", "bias"].index(role)
    params[index] = params[index].astype(f16)
    x = np.ones((2, n), f32)
    for constant in (True, False):
        with pytest.raises(Refused, match=rf"{role if role != 'bias' else 'bias/LayerNorm'}.* must be float32"):
            ort.expert_mlp(x, np.array([0, 2], i32), params, [0], [n, n], "gelu", False, quant_mode="w8a8",
                           act_scales=[0.5], constant_params=constant)


@pytest.mark.parametrize("role", ["w_scale", "act_smooth", "bias"])
def test_w8a8_parameters_of_the_wrong_shape_are_refused(ort, role) -> None:
    """Every role's shape is checked, act_smooth (the last role) included: one extra channel is refused."""
    n = 8
    params = w8a8_params(np.eye(n, dtype=np.int8), np.ones(n), np.ones(n), np.zeros(n))
    index = ["weight", "w_scale", "act_smooth", "bias"].index(role)
    params[index] = np.ones((1, n + 1), f32)
    for constant in (True, False):
        with pytest.raises(Refused, match=rf"layer 0 {role} \(input {index + 2}\) must have shape \[1, {n}\]"):
            ort.expert_mlp(np.ones((2, n), f32), np.array([0, 2], i32), params, [0], [n, n], "gelu", False,
                           quant_mode="w8a8", act_scales=[0.5], constant_params=constant)


def test_constant_weights_are_checked_when_the_session_is_created() -> None:
    """Initializer weights are packed (and their values checked) at session creation; graph-input weights at run."""
    from op_graphs import expert_mlp_attrs, single_op_model

    from pimoe_export.runtime.ort import create_session

    n = 8
    params = w8a8_params(np.eye(n, dtype=np.int8), np.zeros(n), np.ones(n), np.zeros(n))  # w_scale 0: refused
    attrs = expert_mlp_attrs([0], [n, n], "gelu", False, quant_mode="w8a8", act_scales=[0.5])
    inputs = [("x_sorted", np.ones((2, n), f32)), ("offsets", np.array([0, 2], i32))]
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    outputs = [("y", f32, 2)]
    with pytest.raises(ORT_ERRORS, match=r"w_scale \(layer 0, expert 0, channel 0\) must be positive"):
        create_session(single_op_model("PiMoEExpertMLP", inputs, outputs, attrs, named))
    session = create_session(single_op_model("PiMoEExpertMLP", inputs + named, outputs, attrs))
    with pytest.raises(ORT_ERRORS, match=r"w_scale \(layer 0, expert 0, channel 0\) must be positive"):
        session.run(None, dict(inputs + named))


@pytest.mark.parametrize(("out", "refused"), [(2**15, True), (2**15 - 1, False)])
def test_a_weight_of_exactly_2_to_the_31_elements_is_refused(out, refused) -> None:
    """G * in * out must stay below 2^31 (int32 indexing): the attributes alone decide, so weights fed as graph
    inputs (never allocated here) show the boundary at session creation."""
    from op_graphs import expert_mlp_attrs, single_op_model

    from pimoe_export.runtime.ort import create_session

    widths = [2**16, out]
    # only dtype and rank matter for a graph input's declaration (dynamic dims)
    inputs = [(name, np.empty((0,) * rank, f32)) for name, rank in (("x_sorted", 2), ("p0", 3), ("p1", 2))]
    inputs.insert(1, ("offsets", np.empty((0,), i32)))
    model = single_op_model("PiMoEExpertMLP", inputs, [("y", f32, 2)], expert_mlp_attrs([0], widths, "gelu", False))
    if refused:
        with pytest.raises(ORT_ERRORS, match=r"layer 0 weight has >= 2\^31 elements"):
            create_session(model)
    else:
        create_session(model)


# ------------------------------------------------------------------------------------------ every kernel set
def test_the_library_runs_the_isa_asked_for() -> None:
    """PIMOE_CPU_ISA forces a kernel set; otherwise the library runs the best one this CPU has (avx512, avx2,
    generic: tests/cpu_kernel_sets.py)."""
    from cpu_kernel_sets import default_kernel_set

    from pimoe_export.native.libraries import check_ort_library, find_ort_library

    assert check_ort_library(str(find_ort_library()))["cpu_isa"] == default_kernel_set()


#: the tests of this file that run the ONNX Runtime CPU library (the other backends do not read PIMOE_CPU_ISA)
ONLY_ORT_CPU = "not every_kernel_set and not torch and not emu and not trt"


@pytest.mark.slow
@pytest.mark.parametrize("kernel_set", other_kernel_sets())
def test_boundaries_hold_on_every_kernel_set(kernel_set, tmp_path) -> None:
    """The same boundaries on every other kernel set this machine runs (the generic kernels; avx2 where the library
    picks avx512; the AVX-512 source on SIMDe), each in a subprocess: PIMOE_CPU_ISA is read once per process."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PIMOE_CPU_ISA": kernel_set}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging",
                             str(Path(__file__)), "-k", ONLY_ORT_CPU, "--basetemp", str(tmp_path / "t")],
                            capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    assert " passed" in result.stdout and " failed" not in result.stdout and "skipped" not in result.stdout
