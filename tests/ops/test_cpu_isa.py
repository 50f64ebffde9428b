"""The CPU kernel sets against each other (plugins/kernels/cpu/isa.h): INT8 outputs bit-identical on every set
(generic, avx2, avx512 and its SIMDe build avx512-simde), fp32 outputs bit-identical on the SIMD sets, every set
deterministic across thread counts and concurrent calls; PIMOE_CPU_ISA forces each set or says why it cannot.

The library picks its kernels once per process, so each set runs in a subprocess (tests/cpu_kernel_sets.py) on the
same single-op PiMoEExpertMLP graphs: every activation, with and without LayerNorm, fp32 / w8a8 (static scales,
SmoothQuant divisors) / w8a8_dynamic, widths that leave tails in every vector loop (1 to 16 lanes, 64-lane
LayerNorm sums, 4-panel register groups), a NaN row, rows large enough to saturate the activations, and fp16
I/O; and gated (GLU) layers: every activation with swiglu_oai (clamping often), with and without bias, a gated
layer after a gated layer, odd output panel counts (GLU tasks take 4, 2 or 1 output panels), an fp32 layer over
more than one K block (the GLU tile accumulates them), fp16 I/O. A set this CPU lacks is skipped with the reason;
the SIMDe build runs wherever AVX2 does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cpu_kernel_sets import KERNEL_SETS, default_kernel_set, runs_here
from op_graphs import expert_mlp_attrs, single_op_model

from pimoe_export.ops import schema
from pimoe_export.quantize.int8 import quantize_weight

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "tests" / "cpu_kernel_sets.py"
GROUP = [0, 2, 3]  # of 4 experts: expert 1's rows belong to another group (zero rows, non-contiguous segments)
ROWS = [[20, 3, 14, 5], [1, 0, 7, 0]]  # rows per expert of the two inputs of every case (two sizes)
WIDTHS = [[37, 70, 29], [16, 136, 64, 9]]  # odd widths: every vector loop has a tail; 136 = 8.5 panels
KBLOCKED = [1030, 24, 40, 5]  # a gated layer over two fp32 K blocks (1024 + 6), then a gated layer after it
SWIGLU_OAI = {"alpha": 1.702, "limit": 2.0}  # a low clamp, so that both clamps act on many elements


def case_names() -> list[str]:
    """The models of the ``cases`` fixture, per quant mode (each run on the two inputs of ROWS)."""
    names = []
    for mode in schema.QUANT_MODES:
        names += [f"{mode}-{a}-{ln}" for a in schema.ACTIVATIONS for ln in ("ln", "noln")] + [f"{mode}-fp16"]
        names += [f"{mode}-glu-{a}-{b}" for a in schema.ALL_ACTIVATIONS for b in ("bias", "nobias")]
        names += [f"{mode}-glu-kblocked", f"{mode}-glu-fp16"]
    return names


def expert_case(rng: np.random.Generator, widths: list[int], activation: str, layer_norm: bool, mode: str,
                dtype: type, gated: bool = False, bias: bool = True) -> tuple[bytes, dict[str, np.ndarray]]:
    """One PiMoEExpertMLP model (constant parameters) and its two inputs, keyed '<input>/<i>'; ``gated``: every hidden
    layer a GLU with rows [gate; up] (contract v2), ``bias`` False: no bias inputs."""
    groups, layers = len(GROUP), len(widths) - 1
    params = []
    for layer, role in schema.expert_mlp_param_layout(layers, layer_norm, mode, bias=bias):
        out, inp = widths[layer + 1], widths[layer]
        if role in ("weight", "w_scale", "bias"):
            out = schema.expert_mlp_param_rows(widths, layer, gated)
        if role == "weight":
            w = (rng.normal(size=(groups, out, inp)) / np.sqrt(inp)).astype(np.float32)
            params.append(quantize_weight(w)[0] if mode != "none" else w.astype(dtype))
            scale = quantize_weight(w)[1]
        elif role == "w_scale":
            params.append(scale)
        elif role == "act_smooth":
            params.append(rng.uniform(0.5, 2.0, size=(groups, inp)).astype(np.float32))
        elif role == "ln_gamma":
            params.append(rng.uniform(0.5, 1.5, size=(groups, out)).astype(np.float32))
        else:
            params.append(rng.normal(0, 0.1, size=(groups, out)).astype(np.float32))
    act_scales = [] if mode != "w8a8" else [float(np.float32(rng.uniform(0.01, 0.05))) for _ in range(layers * groups)]
    v2 = ({"gated": True, "bias": bias} | (SWIGLU_OAI if activation == "swiglu_oai" else {})) if gated else {}
    attrs = expert_mlp_attrs(GROUP, widths, activation, layer_norm, quant_mode=mode, act_scales=act_scales, **v2)
    feeds: dict[str, np.ndarray] = {}
    for i, rows in enumerate(ROWS):
        x = rng.normal(0, 2, size=(sum(rows), widths[0])).astype(np.float32)
        if len(x) > 8:
            x[3, 5] = np.nan  # a NaN row
            x[7] *= 1e3  # saturates the activations, the exp/erf/tanh ranges, the int8 clamp
        feeds[f"x_sorted/{i}"] = x.astype(dtype)
        feeds[f"offsets/{i}"] = np.concatenate([[0], np.cumsum(rows)]).astype(np.int32)
    inputs = [("x_sorted", feeds["x_sorted/0"]), ("offsets", feeds["offsets/0"])]
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    model = single_op_model("PiMoEExpertMLP", inputs, [("y_sorted", np.dtype(dtype), 2)], attrs, named)
    return model, feeds


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cases")
    rng = np.random.default_rng(28)
    for mode in schema.QUANT_MODES:
        for a, activation in enumerate(schema.ACTIVATIONS):
            for layer_norm in (True, False):
                model, feeds = expert_case(rng, WIDTHS[(a + layer_norm) % 2], activation, layer_norm, mode,
                                           np.float32)
                name = f"{mode}-{activation}-{'ln' if layer_norm else 'noln'}"
                (folder / f"{name}.onnx").write_bytes(model)
                np.savez(folder / f"{name}.npz", **feeds)
        model, feeds = expert_case(rng, WIDTHS[0], "gelu", True, mode, np.float16)
        (folder / f"{mode}-fp16.onnx").write_bytes(model)
        np.savez(folder / f"{mode}-fp16.npz", **feeds)
        for a, activation in enumerate(schema.ALL_ACTIVATIONS):
            for bias in (True, False):
                model, feeds = expert_case(rng, WIDTHS[(a + bias) % 2], activation, False, mode, np.float32,
                                           gated=True, bias=bias)
                name = f"{mode}-glu-{activation}-{'bias' if bias else 'nobias'}"
                (folder / f"{name}.onnx").write_bytes(model)
                np.savez(folder / f"{name}.npz", **feeds)
        for name, widths, dtype in (("kblocked", KBLOCKED, np.float32), ("fp16", WIDTHS[1], np.float16)):
            model, feeds = expert_case(rng, widths, "silu", False, mode, dtype, gated=True)
            (folder / f"{mode}-glu-{name}.onnx").write_bytes(model)
            np.savez(folder / f"{mode}-glu-{name}.npz", **feeds)
    assert sorted(p.stem for p in folder.glob("*.onnx")) == sorted(case_names())
    return folder


@pytest.fixture(scope="module")
def outputs(cases, tmp_path_factory):
    """kernel set -> (completed runner process, its outputs); each set run once, when a test first asks."""
    done: dict[str, tuple[subprocess.CompletedProcess, Path]] = {}

    def run(kernel_set: str) -> tuple[subprocess.CompletedProcess, dict[str, np.ndarray]]:
        if not runs_here(kernel_set):
            pytest.skip(f"this CPU lacks the instructions of the {kernel_set} kernels")
        if kernel_set not in done:
            out = tmp_path_factory.mktemp(kernel_set) / "outputs.npz"
            env = {**os.environ, "PIMOE_CPU_ISA": kernel_set}
            done[kernel_set] = (subprocess.run([sys.executable, str(RUNNER), str(cases), str(out)], env=env,
                                               capture_output=True, text=True, cwd=ROOT, timeout=900), out)
        result, out = done[kernel_set]
        assert result.returncode == 0, f"{kernel_set}: {result.stdout[-2000:]}{result.stderr[-4000:]}"
        with np.load(out) as data:
            return result, {k: data[k] for k in data.files}

    return run


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit for bit, NaNs equal wherever both are NaN (their payloads are not part of the contract)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan = np.isnan(a)
    if not np.array_equal(nan, np.isnan(b)):
        return False
    bits = np.uint16 if a.dtype == np.float16 else np.uint32
    return bool(np.array_equal(a[~nan].view(bits), b[~nan].view(bits)))


@pytest.mark.parametrize("kernel_set", KERNEL_SETS)
def test_each_kernel_set_is_deterministic_across_threads_and_concurrent_calls(kernel_set, outputs) -> None:
    """The runner checks 1 thread vs 2 threads in concurrent calls of two sizes on one session, bit for bit; and the
    library must run the set asked for (native or SIMDe: the test id says which)."""
    result, ys = outputs(kernel_set)
    assert result.stdout.strip().splitlines()[-1] == kernel_set
    assert sorted(ys) == sorted(f"{name}/{i}/0" for name in case_names() for i in range(len(ROWS)))


@pytest.mark.parametrize("kernel_set", [s for s in KERNEL_SETS if s != "generic"])
def test_int8_outputs_are_bit_identical_to_the_portable_kernels(kernel_set, outputs) -> None:
    _, portable = outputs("generic")
    _, ys = outputs(kernel_set)
    int8 = [k for k in portable if k.startswith("w8a8")]
    assert len(int8) == len(ROWS) * sum(name.startswith("w8a8") for name in case_names())
    assert sum("-glu-" in k for k in int8) == len(ROWS) * 2 * (2 * len(schema.ALL_ACTIVATIONS) + 2)
    differ = [k for k in int8 if not same_bits(ys[k], portable[k])]
    assert not differ, f"{kernel_set} differs from generic on {differ}"


@pytest.mark.parametrize("kernel_set", ["avx512", "avx512-simde"])
def test_fp32_outputs_are_bit_identical_to_avx2(kernel_set, outputs) -> None:
    """The fp32 GEMM's fused multiply-add chains and the canonical epilogue give the SIMD sets the same bits."""
    _, avx2 = outputs("avx2")
    _, ys = outputs(kernel_set)
    differ = [k for k in avx2 if not same_bits(ys[k], avx2[k])]
    assert not differ, f"{kernel_set} differs from avx2 on {differ}"


def test_the_portable_fp32_kernels_differ_from_the_simd_ones_only_by_rounding(outputs) -> None:
    """The generic fp32 GEMM rounds each multiply and add (no FMA): not the same bits, but within fp32 rounding."""
    _, portable = outputs("generic")
    _, simd = outputs(default_kernel_set() if default_kernel_set() != "generic" else "generic")
    for k in portable:
        if k.startswith("none") and "fp16" not in k:
            np.testing.assert_allclose(simd[k], portable[k], rtol=2e-5, atol=2e-5, err_msg=k)


def test_the_library_runs_the_best_kernel_set_this_cpu_has() -> None:
    from pimoe_export.runtime.ort import check_ort_library, find_ort_library

    assert check_ort_library(str(find_ort_library()))["cpu_isa"] == default_kernel_set()


@pytest.mark.parametrize("asked", [*KERNEL_SETS, "avx9"])
def test_pimoe_cpu_isa_forces_a_kernel_set_or_says_why_not(asked, cases) -> None:
    code = ("import sys; from pimoe_export.runtime.ort import create_session, check_ort_library, find_ort_library\n"
            "print(check_ort_library(str(find_ort_library()))['cpu_isa'])\n"
            "try:\n    create_session(sys.argv[1])\nexcept Exception as e:\n    print('error:', e)\n")
    env = {**os.environ, "PIMOE_CPU_ISA": asked}
    result = subprocess.run([sys.executable, "-c", code, str(cases / "w8a8-gelu-ln.onnx")], env=env,
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    isa, *rest = result.stdout.strip().splitlines()
    if asked in KERNEL_SETS and runs_here(asked):
        assert (isa, rest) == (asked, [])
    elif asked in KERNEL_SETS:  # the session refuses to load, saying which instructions are missing
        assert isa.startswith(f"unavailable: PIMOE_CPU_ISA={asked}: this CPU lacks")
        assert rest and "this CPU lacks" in rest[0] and "unset PIMOE_CPU_ISA or set it to one" in rest[0]
    else:
        assert isa.startswith("unavailable: PIMOE_CPU_ISA=avx9 is not a kernel set")
        assert rest and "is not a kernel set (generic, avx2, avx512 or avx512-simde)" in rest[0]
