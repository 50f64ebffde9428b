"""The CUDA half on the emulated GPU (verification rung 5e, docs/verification.md): the CUDA kernels, the four TensorRT
plugin objects and the harness of plugins/, built against the CPU CUDA emulator (plugins/emu), driven the way
TensorRT drives them.

- The emulator's own feature test (the same file nvcc builds for a real GPU in scripts/gpu_check.sh).
- The TensorRT call sequence with optimisation profiles: each plugin is built for a (min, opt, max) profile that
  differs from the run shapes, its workspace sized at build time by getWorkspaceSize for the profile, serialised and
  deserialised, then run for several shapes inside the profile in one context (onShapeChange each time): N = 0,
  N = 1, and N*k on both sides of the dispatch tiling thresholds. Every run is compared with the PyTorch reference,
  and every kernel must stay inside the workspace and outputs it was given (guard bytes around every buffer) and
  leave its inputs untouched.
- Regressions of the two defects found at commit 9ba5aa3: the dispatch workspace for a profile maximum was smaller
  than a smaller batch needed; fp16 PiMoEExpertMLP returned NaN once a hidden value reached 65520.
- The emulated suite under AddressSanitizer (+ UBSan alignment) and ThreadSanitizer, in subprocesses: any report
  fails the test.

The op matrix (tests/ops/test_ops_backends.py) and the whole-layer tests (tests/emu/test_gpu_layer.py) run on the
emulator too, through their ``emu`` backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from test_ops_backends import expert_reference, make_expert_case, quantize_case

from pimoe_export.model import functional
from pimoe_export.ops import schema
from pimoe_export.testing.harness import (
    Harness,
    HarnessOpBackend,
    PluginProfile,
    PluginSession,
    expert_mlp_fields,
    find_harness,
)

pytestmark = pytest.mark.emu
ROOT = Path(__file__).resolve().parents[2]
f32, f16, i32, i8 = np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.int32), np.dtype(np.int8)


def emulated_library() -> Path:
    path = find_harness(emulated=True)
    if path is None:
        if os.environ.get("PIMOE_SKIP_EMU") == "1":
            pytest.skip("PIMOE_SKIP_EMU=1: the emulated harness is not built")
        pytest.fail("libpimoe_trt_harness_emu.so is not built: run scripts/setup.sh (it builds it by default; it needs "
                    "only g++, python and the TensorRT headers it fetches)")
    return path


@pytest.fixture(scope="module")
def harness() -> Harness:
    h = Harness(emulated_library())
    assert h.emulated
    return h


# ------------------------------------------------------------------------------------------ the emulator itself
def test_emulator_selftest_passes() -> None:
    """WMMA and mma.sync fragment layouts, shuffles, barriers, cp.async, and the errors the emulator must report."""
    binary = emulated_library().parent / "pimoe_emu_selftest"
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    passed = int(summary.split()[0])
    assert summary.endswith(" 0 failed") and passed >= 16, result.stdout
    # the negative cases were reported by the emulator with their source lines
    assert "is not in mask 0x0000ffff" in result.stderr and "not 256-bit aligned" in result.stderr


# ------------------------------------------------------------------------------------------ profiles
def profile_of(mins, opts, maxs, dtypes) -> PluginProfile:
    def shapes(x):
        return tuple(tuple(int(d) for d in s) for s in x)

    return PluginProfile(shapes(mins), shapes(opts), shapes(maxs), tuple(np.dtype(d) for d in dtypes))


def test_route_runs_every_shape_of_its_profile(harness) -> None:
    e, k = 24, 4
    profile = profile_of([(0, e), (e,)], [(16, e), (e,)], [(64, e), (e,)], [f32, f32])
    rng = np.random.default_rng(0)
    bias = rng.normal(0, 0.05, size=e).astype(np.float32)
    with PluginSession(harness, schema.ROUTE, {"k": k, "normalize": 1}, profile) as session:
        assert session.workspace_bytes == 0  # none: the device status block is the plugin's own
        for n in (0, 1, 64, 17, 0, 33):
            logits = rng.normal(0, 2, size=(n, e)).astype(np.float32)
            weights, ids = session.run([logits, bias])
            ref_w, ref_ids = functional.route(torch.from_numpy(logits), torch.from_numpy(bias), k, True)
            np.testing.assert_array_equal(ids, ref_ids.numpy())
            np.testing.assert_allclose(weights, ref_w.numpy(), rtol=2e-6, atol=1e-7)


# N*k around the tiling thresholds of the counting sort (32 pairs per warp tile, at most 1024 tiles: 32768 pairs)
DISPATCH_RUNS = [0, 1, 4095, 4096, 4097, 4000, 2056, 5000, 3]


def test_dispatch_runs_every_shape_of_its_profile(harness) -> None:
    """Profile N in [0, 5000], k = 8, E = 64 (the case of the workspace defect): every run bit-exact, inside its
    workspace."""
    e, k, h = 64, 8, 3
    profile = profile_of([(0, h), (0, k)], [(1000, h), (1000, k)], [(5000, h), (5000, k)], [f16, i32])
    rng = np.random.default_rng(1)
    with PluginSession(harness, schema.DISPATCH, {"num_experts": e}, profile) as session:
        for n in DISPATCH_RUNS:
            x = rng.normal(size=(n, h)).astype(np.float16)
            ids = rng.integers(0, e, size=(n, k)).astype(np.int32)
            x_sorted, offsets, f2s = session.run([x, ids])
            ref = functional.dispatch(torch.from_numpy(x), torch.from_numpy(ids), e)
            np.testing.assert_array_equal(offsets, ref[1].numpy())
            np.testing.assert_array_equal(f2s, ref[2].numpy())
            np.testing.assert_array_equal(x_sorted, ref[0].numpy())


def test_combine_runs_every_shape_of_its_profile(harness) -> None:
    k, h = 4, 19
    profile = profile_of([(0, h), (0,), (0, k)], [(40, h), (40,), (10, k)], [(1200, h), (1200,), (300, k)],
                         [f32, i32, f32])
    rng = np.random.default_rng(2)
    with PluginSession(harness, schema.COMBINE, {}, profile) as session:
        for n in (0, 1, 300, 77):
            y_sorted = rng.normal(size=(n * k, h)).astype(np.float32)
            f2s = rng.permutation(n * k).astype(np.int32)
            weights = rng.random(size=(n, k)).astype(np.float32)
            y = session.run([y_sorted, f2s, weights])[0]
            ref = functional.combine(torch.from_numpy(y_sorted), torch.from_numpy(f2s), torch.from_numpy(weights))
            np.testing.assert_array_equal(y, ref.numpy())


def random_offsets(rng, rows: int, experts: int) -> np.ndarray:
    cuts = np.sort(rng.integers(0, rows + 1, size=experts - 1))
    return np.concatenate([[0], cuts, [rows]]).astype(np.int32)


# rows: empty, one, few (split-K; 16-row int8 tiles), 64/65 (int8 split-K limit), > 256 (int8 64-row tiles, no
# fp16 split-K)
MLP_RUNS = [0, 1, 3, 65, 300, 64, 400]


@pytest.mark.parametrize(("dtype", "quant_mode", "gated"), [(f32, "none", False), (f16, "none", False),
                                                            (f32, "w8a8", False), (f16, "w8a8_dynamic", False),
                                                            (f16, "none", True), (f32, "w8a8", True)])
def test_expert_mlp_runs_every_shape_of_its_profile(harness, dtype, quant_mode, gated) -> None:
    """gated (contract v2): the GLU buffer of the workspace, sized for the profile maximum, serves every smaller R."""
    widths, e, group, layer_norm = [40, 72, 24], 4, [1, 3], not gated
    v2 = {"gated": True, "bias": False} if gated else {}
    rng = np.random.default_rng(3)
    x0, _, float_params, _ = make_expert_case(rng, e=e, groups=len(group), widths=widths, layer_norm=layer_norm,
                                              dtype=dtype, rows_per_expert=2, gated=gated, bias=not gated)
    act_scales: list[float] = []
    params = float_params
    if quant_mode != "none":
        params, _, act_scales = quantize_case(rng, x0, float_params, widths, layer_norm, len(group), quant_mode,
                                              bias=not gated)
    attrs = expert_mlp_fields(group, widths, "gelu", layer_norm, quant_mode=quant_mode, act_scales=act_scales, **v2)
    dtypes = [dtype, i32, *[p.dtype for p in params]]
    fixed = [p.shape for p in params]
    profile = profile_of([(0, widths[0]), (e + 1,), *fixed], [(32, widths[0]), (e + 1,), *fixed],
                         [(400, widths[0]), (e + 1,), *fixed], dtypes)
    import pimoe_export.ops.torch_ops as ops

    with PluginSession(harness, schema.EXPERT_MLP, attrs, profile) as session:
        for rows in MLP_RUNS:
            x = rng.normal(size=(rows, widths[0])).astype(dtype)
            offsets = random_offsets(rng, rows, e)
            y = session.run([x, offsets, *params])[0]
            ref = ops.expert_mlp(torch.from_numpy(x), torch.from_numpy(offsets), [torch.from_numpy(p) for p in params],
                                 group, list(widths), "gelu", layer_norm, 1e-5, quant_mode, act_scales, **v2).numpy()
            assert y.shape == ref.shape == (rows, widths[-1]) and y.dtype == dtype
            scale = max(1.0, float(np.abs(ref.astype(np.float32)).max(initial=0.0)))
            # this test is about every shape of the profile running through the TensorRT call sequence; the int8
            # kernels' exactness is held on the same emulated harness by tests/emu/test_gpu_layer.py's `emu` backend
            # (bit-identical without transcendentals, one code step of the last layer at scale). Here GELU and
            # LayerNorm in fp32 against PyTorch's can move hidden codes by one step, so 1e-2 relative is the
            # bound, not a precision claim
            if quant_mode != "none":
                np.testing.assert_allclose(y.astype(np.float32), ref.astype(np.float32), rtol=1e-2, atol=1e-2 * scale)
            elif dtype == f32:
                np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * scale)
            else:
                np.testing.assert_allclose(y.astype(np.float32), ref.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_runs_outside_the_profile_are_refused(harness) -> None:
    """Each bad shape runs in a separate process (tests/isolated.py): a check that let it through and crashed
    fails this test, naming the shape."""
    from isolated import assert_ran, assert_refused, isolated, profile_session_run

    profile = profile_of([(1, 8)], [(4, 8)], [(16, 8)], [f32])
    for bad in ((17, 8), (0, 8)):
        outcome = isolated().call(profile_session_run, schema.ROUTE, {"k": 2}, profile, [np.zeros(bad, np.float32)])
        assert_refused(outcome, "outside the profile", f"PiMoERoute run at {bad} for a profile of 1..16 rows")
    outcome = isolated().call(profile_session_run, schema.ROUTE, {"k": 2}, profile, [np.zeros((16, 8), np.float32)])
    assert assert_ran(outcome, "the profile's maximum")[1].shape == (16, 2)


# ------------------------------------------------------------------------------------------ workspace sizes
def workspace(harness: Harness, op: str, attrs: dict, lo, hi, dtypes) -> int:
    prepared = harness.prepare_profile(op, attrs, profile_of(lo, hi, hi, dtypes))
    try:
        return prepared.workspace
    finally:
        harness.release(prepared)


def dispatch_maxima() -> list[int]:
    """Profile maxima of N*k: both sides of every power of two, of the 32768-pair tile limit and of multiples of
    32, and a seeded sample up to 300,000."""
    rng = np.random.default_rng(4)
    special = {1, 31, 32, 33, 1023, 1024, 1025, 32767, 32768, 32769, 32800, 40000, 65535, 65537, 300000}
    special |= {2**p + d for p in range(5, 19) for d in (-1, 0, 1)}
    return sorted(special | set(rng.integers(1, 300_001, size=120).tolist()))


@pytest.mark.parametrize("experts", [1, 64, 1024])
def test_dispatch_workspace_for_a_profile_maximum_covers_every_smaller_batch(harness, experts) -> None:
    """TensorRT sizes the workspace once, for the profile's largest shape: the size must not decrease with N*k.
    (At 9ba5aa3 it did for about 89% of maxima above 32768 pairs.)"""
    sizes: dict[int, int] = {}

    def size(pairs: int) -> int:  # N = pairs with k = 1: the plugin sizes by N*k
        if pairs not in sizes:
            sizes[pairs] = workspace(harness, schema.DISPATCH, {"num_experts": experts}, [(pairs, 1), (pairs, 1)],
                                     [(pairs, 1), (pairs, 1)], [f32, i32])
        return sizes[pairs]

    maxima = dispatch_maxima()
    for top in maxima:
        # the profile's own size (min 0 .. max top) is what TensorRT allocates
        given = workspace(harness, schema.DISPATCH, {"num_experts": experts}, [(0, 1), (0, 1)], [(top, 1), (top, 1)],
                          [f32, i32])
        assert given == size(top)
        for pairs in [*[m for m in maxima if m <= top][-12:], 1, top // 2, (top + 1) // 2]:
            assert size(pairs) <= given, (top, pairs, size(pairs), given)


@pytest.mark.parametrize(("dtype", "quant_mode", "gated"), [(f32, "none", False), (f16, "none", False),
                                                            (f16, "w8a8", False), (f16, "none", True),
                                                            (f32, "w8a8", True)])
def test_expert_mlp_workspace_never_decreases_with_rows(harness, dtype, quant_mode, gated) -> None:
    widths, group = [16, 64, 33, 16], [1]
    layout = schema.expert_mlp_param_layout(len(widths) - 1, not gated, quant_mode)
    params = []
    for layer, role in layout:
        out, inp = schema.expert_mlp_param_rows(widths, layer, gated), widths[layer]
        if role in ("ln_gamma", "ln_beta"):
            out = widths[layer + 1]
        shape = (1, out, inp) if role == "weight" else (1, inp) if role == "act_smooth" else (1, out)
        params.append((shape, i8 if role == "weight" and quant_mode != "none" else dtype if role == "weight" else f32))
    attrs = expert_mlp_fields(group, widths, "gelu", not gated, quant_mode=quant_mode,
                              act_scales=[0.02] * 3 if quant_mode == "w8a8" else (), **({"gated": True} if gated
                                                                                          else {}))
    previous = 0
    for rows in [0, 1, 2, 15, 16, 17, 63, 64, 65, 255, 256, 257, 1000, 4096]:
        shapes = [(rows, widths[0]), (3,), *[s for s, _ in params]]
        ws = workspace(harness, schema.EXPERT_MLP, attrs, shapes, shapes, [dtype, i32, *[d for _, d in params]])
        assert ws >= previous, (rows, ws, previous)
        previous = ws


def test_dispatch_below_the_profile_maximum_stays_inside_its_workspace(tmp_path) -> None:
    """The defect of 9ba5aa3: profile maximum N = 5000, k = 8, E = 64 gave 160,512 bytes; N = 4000 needs 256,512.
    Run in a subprocess: at 9ba5aa3 the overflowing kernel corrupts the heap (or trips the guard bytes)."""
    script = textwrap.dedent(f"""
        import numpy as np
        from pimoe_export.testing.harness import Harness, PluginSession, PluginProfile
        h = Harness({str(emulated_library())!r})
        f32, i32 = np.dtype(np.float32), np.dtype(np.int32)
        profile = PluginProfile(((1, 1), (1, 8)), ((4000, 1), (4000, 8)), ((5000, 1), (5000, 8)), (f32, i32))
        rng = np.random.default_rng(0)
        with PluginSession(h, "PiMoEDispatch", {{"num_experts": 64}}, profile) as session:
            x = rng.normal(size=(4000, 1)).astype(np.float32)
            ids = rng.integers(0, 64, size=(4000, 8)).astype(np.int32)
            session.run([x, ids])
            print("workspace", session.workspace_bytes, "OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr[-3000:]
    assert int(result.stdout.split()[1]) >= 1000 * 64 * 4  # 1000 tiles of 64 counts for 32,000 pairs


# ------------------------------------------------------------------------------------------ fp16 beyond 65504
@pytest.mark.parametrize("rows_per_expert", [2, 90])  # few rows: split-K; many rows: one K pass
@pytest.mark.parametrize("layer_norm", [False, True])
def test_fp16_hidden_values_beyond_the_fp16_range_stay_finite(harness, rows_per_expert, layer_norm) -> None:
    """fp16 is storage only: a hidden activation of 80,000 (or 1e9) is fp32 arithmetic like any other. At 9ba5aa3
    the tensor-core GEMM split such a value into +inf and -inf and returned NaN; the CPU kernel and PyTorch are
    finite. Rows with huge hidden values sit beside ordinary rows, which must be unaffected."""
    widths = [16, 32, 24, 16]
    rng = np.random.default_rng(5)
    x, offsets, params, expert_ids = make_expert_case(rng, e=3, groups=3, widths=widths, layer_norm=layer_norm,
                                                      dtype=np.float16, rows_per_expert=rows_per_expert)
    assert x.shape[0] >= 3
    x[::3] *= 40  # every third row: hidden values far beyond 65504 through the large first-layer weights
    params[0] = (params[0].astype(np.float32) * 2000).astype(np.float16)  # layer-0 weights of a few hundred
    layout = schema.expert_mlp_param_layout(len(widths) - 1, layer_norm, "none")
    if layer_norm:  # LayerNorm would bring the hidden values back to O(1): a large gamma keeps them huge
        params[layout.index((0, "ln_gamma"))] = (params[layout.index((0, "ln_gamma"))] * 3e5).astype(np.float32)
    last = layout.index((len(widths) - 2, "weight"))  # small last-layer weights: the OUTPUT fits in fp16 again
    params[last] = (params[last].astype(np.float32) * 1e-4).astype(np.float16)
    backend = HarnessOpBackend(harness)
    y = backend.expert_mlp(x, offsets, params, expert_ids, widths, "relu", layer_norm)
    ref = expert_reference(x, offsets, params, expert_ids, widths, "relu", layer_norm)
    import pimoe_export.ops.torch_ops as ops

    hidden = ops.expert_mlp(torch.from_numpy(x).float(), torch.from_numpy(offsets),
                            [torch.from_numpy(p).float() for p in params[:2]], expert_ids,
                            widths[:2], "relu", False, 1e-5, "none", []).abs().max().item()
    assert hidden > 65520, "the case must put hidden values beyond fp16's range"
    assert np.isfinite(ref.astype(np.float32)).all()
    assert np.isfinite(y.astype(np.float32)).all(), "NaN/inf where the reference is finite"
    np.testing.assert_allclose(y.astype(np.float32), ref.astype(np.float32), rtol=2e-3,
                               atol=2e-3 * max(1.0, float(np.abs(ref.astype(np.float32)).max())))


# ------------------------------------------------------------------------------------------ enqueue: no allocation
ALLOCATIONS = """
import ctypes, json, sys
import numpy as np
from pimoe_export.ops import schema
from pimoe_export.testing.harness import Harness, expert_mlp_fields

h = Harness(sys.argv[1])
rng = np.random.default_rng(0)
f32, f16, i32, i8 = np.float32, np.float16, np.int32, np.int8


def mlp_case(dtype, mode, gated=False, activation="gelu"):
    # gated (contract v2): GLU hidden layers over [gate; up] rows, no bias, no LayerNorm
    widths, groups, experts, rows = [32, 64, 32], [1, 3], 4, 100
    offsets = np.array([0, 30, 55, 80, rows], i32)
    layer_norm = not gated
    params = []
    for layer, role in schema.expert_mlp_param_layout(2, layer_norm, mode, bias=not gated):
        out, inp = widths[layer + 1], widths[layer]
        rows_l = schema.expert_mlp_param_rows(widths, layer, gated)
        if role == "weight":
            shape = (2, rows_l, inp)
            w = rng.integers(-127, 128, shape).astype(i8) if mode != "none" else rng.normal(size=shape)
            params.append(w.astype(i8 if mode != "none" else dtype))
        elif role == "act_smooth":
            params.append(rng.uniform(0.5, 2.0, (2, inp)).astype(f32))
        elif role == "w_scale":
            params.append(rng.uniform(0.01, 0.02, (2, rows_l)).astype(f32))
        elif role == "ln_gamma":
            params.append(rng.uniform(0.01, 0.02, (2, out)).astype(f32))
        else:
            params.append(rng.normal(0, 0.1, (2, rows_l if role == "bias" else out)).astype(f32))
    scales = [0.05] * 4 if mode == "w8a8" else []
    v2 = {"gated": True, "bias": False, "alpha": 1.5, "limit": 6.0} if gated else {}
    attrs = expert_mlp_fields(groups, widths, activation, layer_norm, quant_mode=mode, act_scales=scales, **v2)
    return schema.EXPERT_MLP, attrs, [rng.normal(size=(rows, 32)).astype(dtype), offsets, *params]


ids = rng.integers(0, 8, (64, 2)).astype(i32)
cases = {
    "route": (schema.ROUTE, {"k": 2, "normalize": 1}, [rng.normal(size=(64, 8)).astype(f32),
                                                      rng.normal(0, 0.1, 8).astype(f32)]),
    "dispatch": (schema.DISPATCH, {"num_experts": 8}, [rng.normal(size=(64, 16)).astype(f16), ids]),
    "combine": (schema.COMBINE, {}, [rng.normal(size=(128, 16)).astype(f16), rng.permutation(128).astype(i32),
                                     rng.random((64, 2)).astype(f32)]),
    "expert_mlp fp32": mlp_case(f32, "none"),
    "expert_mlp fp16": mlp_case(f16, "none"),
    "expert_mlp w8a8": mlp_case(f16, "w8a8"),
    "expert_mlp w8a8_dynamic": mlp_case(f32, "w8a8_dynamic"),
    # contract v2 attributes
    "route sigmoid, groups, scaled": (schema.ROUTE, {"k": 2, "normalize": 1, "scoring": "sigmoid", "num_groups": 4,
                                                      "groups_kept": 2, "group_score": "sum_top2",
                                                      "routed_scaling_factor": 2.5, "normalize_eps": 1e-20},
                                      [rng.normal(size=(64, 8)).astype(f16), rng.normal(0, 0.1, 8).astype(f32)]),
    "route softmax_topk": (schema.ROUTE, {"k": 2, "scoring": "softmax_topk"}, [rng.normal(size=(64, 8)).astype(f32)]),
    "combine expert order": (schema.COMBINE, {"order": "expert"},
                             [rng.normal(size=(128, 16)).astype(f32), rng.permutation(128).astype(i32),
                              rng.random((64, 2)).astype(f32)]),
    "expert_mlp gated fp32 swiglu_oai": mlp_case(f32, "none", gated=True, activation="swiglu_oai"),
    "expert_mlp gated fp16 silu": mlp_case(f16, "none", gated=True, activation="silu"),
    "expert_mlp gated w8a8": mlp_case(f32, "w8a8", gated=True, activation="swiglu_oai"),
    "expert_mlp gated w8a8_dynamic": mlp_case(f16, "w8a8_dynamic", gated=True, activation="silu"),
}
counts = {}
for name, (op, attrs, arrays) in cases.items():
    prepared = h.prepare(op, attrs, [(a.shape, a.dtype) for a in arrays])
    ins = [h.alloc(a.nbytes) for a in arrays]
    for ptr, a in zip(ins, arrays):
        h.upload(ptr, a)
    outs = [h.alloc(max(1, int(np.prod(s)) * np.dtype(d).itemsize)) for s, d in prepared.outputs]
    workspace = h.alloc(max(prepared.workspace, 256))
    h.enqueue(prepared, ins, outs, workspace)  # the first launch of each kernel warms the emulator's pools
    h.check_status(prepared)
    counts[name] = [h.enqueue_counting_allocations(prepared, ins, outs, workspace) for _ in range(3)]
    h.check_status(prepared)
# the counter is live: a refused enqueue (a null input) allocates its error message
count = ctypes.c_longlong(-1)
nulls = (ctypes.c_void_p * len(ins))(*([None] + ins[1:]))
outputs = (ctypes.c_void_p * len(outs))(*outs)
rc = h.lib.pimoe_harness_enqueue_counting_allocations(prepared.handle, nulls, outputs, workspace, None,
                                                      ctypes.byref(count))
counts["refused (null input)"] = [rc, count.value]
print(json.dumps(counts))
"""


def test_enqueue_allocates_nothing() -> None:
    """Enqueue does no attribute validation and no heap allocation (issue 25): a warm enqueue of every op (with the
    attributes of contract v1 and v2: every scoring, grouped selection, the expert-order combine, gated bias-free
    layers in every precision), the plugin's checks, launchers and the emulated launches included, makes no
    malloc/new of any kind (counted by libpimoe_alloc_counter.so, preloaded). The counter is shown live by a refused
    enqueue, whose message allocates."""
    library = emulated_library()
    counter = library.parent / "libpimoe_alloc_counter.so"
    assert counter.is_file(), f"{counter} is not built (plugins/emu builds it next to the emulated harness)"
    env = {**os.environ, "LD_PRELOAD": str(counter), "PIMOE_TRT_LOG": "off"}
    result = subprocess.run([sys.executable, "-c", ALLOCATIONS, str(library)], capture_output=True, text=True,
                            timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    refused = counts.pop("refused (null input)")
    assert refused[0] == -1 and refused[1] > 0, refused
    assert counts and all(c == [0, 0, 0] for c in counts.values()), counts


# ------------------------------------------------------------------------------------------ sanitizers
def test_small_case_every_kernel_path(harness) -> None:
    """One small run of every kernel path (fp32/fp16, LayerNorm, split-K, int8 16- and 64-row tiles with cp.async,
    both scale modes, bad data): what the sanitizer runs below execute under ASan and TSan."""
    backend = HarnessOpBackend(harness)
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(9, 6)).astype(np.float16)
    bias = rng.normal(0, 0.1, 6).astype(np.float32)
    weights, ids = backend.route(logits, bias, 2, True)
    ref_w, ref_ids = functional.route(torch.from_numpy(logits), torch.from_numpy(bias), 2, True)
    np.testing.assert_array_equal(ids, ref_ids.numpy())
    np.testing.assert_allclose(weights, ref_w.numpy(), rtol=2e-6, atol=1e-7)
    x = rng.normal(size=(9, 24)).astype(np.float32)
    x_sorted, offsets, f2s = backend.dispatch(x, ids, 6)
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(np.bincount(ids.ravel(), minlength=6))]))
    np.testing.assert_array_equal(x_sorted[f2s], np.repeat(x, 2, axis=0))
    y = backend.combine(x_sorted, f2s, weights)
    np.testing.assert_array_equal(y, functional.combine(torch.from_numpy(x_sorted), torch.from_numpy(f2s),
                                                        torch.from_numpy(weights)).numpy())
    widths = [32, 64, 48]
    for dtype, rows_per_expert in ((np.float32, 3), (np.float16, 2), (np.float16, 80)):
        xs, offs, params, group = make_expert_case(rng, e=4, groups=2, widths=widths, layer_norm=True, dtype=dtype,
                                                   rows_per_expert=rows_per_expert)
        y = backend.expert_mlp(xs, offs, params, group, widths, "gelu", True)
        ref = expert_reference(xs, offs, params, group, widths, "gelu", True)
        np.testing.assert_allclose(y.astype(np.float32), ref.astype(np.float32), rtol=2e-3, atol=2e-3)
    for mode, rows_per_expert in (("w8a8", 3), ("w8a8_dynamic", 90)):
        xs, offs, params, group = make_expert_case(rng, e=4, groups=2, widths=widths, layer_norm=False,
                                                   dtype=np.float32, rows_per_expert=rows_per_expert)
        qparams, _, scales = quantize_case(rng, xs, params, widths, False, 2, mode)
        y = backend.expert_mlp(xs, offs, qparams, group, widths, "relu", False, quant_mode=mode, act_scales=scales)
        import pimoe_export.ops.torch_ops as ops

        ref = ops.expert_mlp(torch.from_numpy(xs), torch.from_numpy(offs), [torch.from_numpy(p) for p in qparams],
                             group, widths, "relu", False, 1e-5, mode, scales).numpy()
        np.testing.assert_array_equal(y, ref)  # relu, no LayerNorm: bit-exact (tests/emu/test_gpu_layer.py)
    # contract v2: every routing mode, grouped selection, the expert-order combine, gated layers (fp32, fp16 split-K,
    # W8A8 with swiglu_oai), bias-free
    logits = rng.normal(size=(9, 8)).astype(np.float32)
    for attrs in ({"scoring": "sigmoid", "num_groups": 4, "groups_kept": 2, "group_score": "sum_top2",
                   "routed_scaling_factor": 2.5, "normalize_eps": 1e-20}, {"scoring": "softmax_topk"},
                  {"scoring": "sigmoid"}, {"scoring": "softmax", "num_groups": 2, "groups_kept": 1}):
        b = rng.normal(0, 0.1, 8).astype(np.float32) if attrs.get("num_groups", 1) > 1 else None
        weights, ids = backend.route(logits, b, 2, True, **attrs)
        ref_w, ref_ids = functional.route(torch.from_numpy(logits), None if b is None else torch.from_numpy(b), 2,
                                          True, **attrs)
        np.testing.assert_array_equal(ids, ref_ids.numpy())
        np.testing.assert_allclose(weights, ref_w.numpy(), rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(
        backend.combine(x_sorted, f2s, weights, order="expert"),
        functional.combine(torch.from_numpy(x_sorted), torch.from_numpy(f2s), torch.from_numpy(weights),
                           "expert").numpy())
    for dtype, rows_per_expert, mode, activation in ((np.float32, 3, "none", "silu"), (np.float16, 2, "none", "gelu"),
                                                    (np.float32, 3, "w8a8", "swiglu_oai"),
                                                    (np.float32, 90, "w8a8_dynamic", "silu")):
        xs, offs, params, group = make_expert_case(rng, e=4, groups=2, widths=widths, layer_norm=False, dtype=dtype,
                                                   rows_per_expert=rows_per_expert, gated=True, bias=False)
        scales: list[float] = []
        if mode != "none":
            params, _, scales = quantize_case(rng, xs, params, widths, False, 2, mode, bias=False)
        y = backend.expert_mlp(xs, offs, params, group, widths, activation, False, quant_mode=mode, act_scales=scales,
                               gated=True, bias=False)
        import pimoe_export.ops.torch_ops as ops

        ref = ops.expert_mlp(torch.from_numpy(xs), torch.from_numpy(offs), [torch.from_numpy(p) for p in params],
                             group, widths, activation, False, 1e-5, mode, scales, gated=True, bias=False).numpy()
        scale = max(1.0, float(np.abs(ref.astype(np.float32)).max(initial=0.0)))
        np.testing.assert_allclose(y.astype(np.float32), ref.astype(np.float32), rtol=2e-2, atol=2e-2 * scale)


SANITIZERS = {
    # build folder (scripts/setup.sh), runtime library, options, what to run
    "address": ("build/plugins-emu-asan", "libasan.so", "ASAN_OPTIONS", "detect_leaks=0:abort_on_error=0",
                ["tests/ops/test_ops_backends.py", "-k", "emu and not ort",
                 "tests/emu/test_emu.py::test_small_case_every_kernel_path",
                 "tests/emu/test_emu.py::test_dispatch_runs_every_shape_of_its_profile",
                 "tests/emu/test_emu.py::test_expert_mlp_runs_every_shape_of_its_profile",
                 "tests/emu/test_emu.py::test_fp16_hidden_values_beyond_the_fp16_range_stay_finite"]),
    "thread": ("build/plugins-emu-tsan", "libtsan.so", "TSAN_OPTIONS", "",
               ["tests/emu/test_emu.py::test_small_case_every_kernel_path"]),
}


def sanitizer_library(sanitizer: str) -> Path:
    folder = SANITIZERS[sanitizer][0]
    path = ROOT / folder / "emu" / "libpimoe_trt_harness_emu.so"
    if not path.is_file():
        if os.environ.get("PIMOE_SKIP_EMU_SANITIZERS") == "1":
            pytest.skip("PIMOE_SKIP_EMU_SANITIZERS=1")
        pytest.fail(f"{path.relative_to(ROOT)} is not built: scripts/setup.sh builds the sanitizer variants of the "
                    "emulated harness by default (PIMOE_SETUP_EMU_SANITIZERS=0 skips them; then set "
                    "PIMOE_SKIP_EMU_SANITIZERS=1 here)")
    return path


def sanitizer_env(sanitizer: str, library: Path, logs: Path) -> dict[str, str]:
    _, runtime, options_var, options, _ = SANITIZERS[sanitizer]
    preload = subprocess.run(["gcc", f"-print-file-name={runtime}"], capture_output=True, text=True).stdout.strip()
    env = dict(os.environ)
    env.update({
        "LD_PRELOAD": preload,
        options_var: ":".join(o for o in (options, f"log_path={logs / sanitizer}") if o),
        "PIMOE_TRT_HARNESS_EMU": str(library),
        "PIMOE_HARNESS_GUARD_BYTES": "0",  # exact-size buffers: the sanitizer sees the overruns itself
        "EMU_STACK_KB": "64",
        "PIMOE_OP_EXAMPLES": "30",
        "PIMOE_SKIP_EMU_SANITIZERS": "1",  # no recursion
    })
    return env


def sanitizer_reports(logs: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(logs.glob("*")))


@pytest.mark.slow
@pytest.mark.parametrize("sanitizer", ["address", "thread"])
def test_emulated_suite_is_clean_under_sanitizer(sanitizer, tmp_path) -> None:
    """The emulated op suite on small shapes (ASan + UBSan alignment), and a reduced set (TSan: every CUDA thread
    a fiber, barriers the only happens-before edges). Any sanitizer report fails."""
    library = sanitizer_library(sanitizer)
    logs = tmp_path / "logs"
    logs.mkdir()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-x",
               *SANITIZERS[sanitizer][4]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500, cwd=ROOT,
                            env=sanitizer_env(sanitizer, library, logs))
    reports = sanitizer_reports(logs)
    assert result.returncode == 0 and not reports, (result.stdout[-4000:] + result.stderr[-2000:] + reports[:8000])
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("sanitizer", ["address", "thread"])
def test_sanitizer_runs_do_report_a_planted_fault(sanitizer, tmp_path) -> None:
    """The sanitizer wiring is live: ASan reports a kernel writing past a too-small workspace; TSan reports the
    emulator's missing-barrier demo kernel (and not its fixed twin)."""
    library = sanitizer_library(sanitizer)
    logs = tmp_path / "logs"
    logs.mkdir()
    env = sanitizer_env(sanitizer, library, logs)
    if sanitizer == "address":
        script = textwrap.dedent(f"""
            import numpy as np
            from pimoe_export.testing.harness import Harness, PluginProfile
            h = Harness({str(library)!r})
            x = np.ones((64, 4), np.float32); ids = np.zeros((64, 2), np.int32)
            prepared = h.prepare("PiMoEDispatch", {{"num_experts": 8}}, [(x.shape, x.dtype), (ids.shape, ids.dtype)])
            bufs = [h.alloc(a.nbytes) for a in (x, ids)] + [h.alloc(n) for n in (64 * 2 * 16, 9 * 4, 64 * 2 * 4)]
            h.upload(bufs[0], x); h.upload(bufs[1], ids)
            workspace = h.alloc(16)  # the plugin was told nothing of this: it needs {{prepared.workspace}}
            h.enqueue(prepared, bufs[:2], bufs[2:], workspace)
        """)
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=env)
        assert "heap-buffer-overflow" in sanitizer_reports(logs)
    else:
        race = library.parent / "pimoe_emu_race"
        subprocess.run([str(race), "fixed"], capture_output=True, text=True, timeout=300, env=env)
        assert "ThreadSanitizer" not in sanitizer_reports(logs)
        subprocess.run([str(race), "missing_sync"], capture_output=True, text=True, timeout=300, env=env)
        assert "WARNING: ThreadSanitizer: data race" in sanitizer_reports(logs)
