"""The contract's limits on ids and k, one past the edge, on every backend implementing the ops: the ONNX Runtime CPU
library (the machine's kernels and, with PIMOE_CPU_ISA, every other kernel set this machine runs: generic, avx2, the
AVX-512 source on SIMDe), the CUDA kernels and TensorRT plugin objects on the emulated GPU (``emu``) and on a CUDA
GPU (``trt-harness``, skipped without one), and the ORT CUDA-EP kernels on the emulated GPU (``ort-cuda-emu``); a
backend is skipped only where it is not built. Each case runs in a separate process (tests/isolated.py): a backend
that accepted an id equal to E or a k above E reads or writes out of bounds, and the case then fails naming itself
instead of crashing the test run. The accepted edge (E - 1, k = E) is checked alongside, against the contract's
documented results.

tests/ops/test_op_boundaries.py holds the accepted edges on every backend in-process (with exact results) and the
ONNX Runtime library's own refusals, also in the worker process.
"""

from __future__ import annotations

import numpy as np
import pytest
from cpu_kernel_sets import other_kernel_sets
from isolated import assert_ran, assert_refused, emulated_available, harness_op, isolated, ort_run
from op_graphs import expert_mlp_attrs, single_op_model

f32, i32 = np.float32, np.int32
ORT_ERROR_TYPES = ("Fail", "InvalidArgument", "InvalidGraph", "RuntimeException", "ArtifactError")
EMU_ERROR_TYPES = ("HarnessError", "HarnessDataError")
#: the ONNX Runtime op library as this machine runs it, and every other kernel set this machine runs (the ISA is
#: read once per process)
ORT_WORKERS = {"ort": {}} | {f"ort-{s}": {"PIMOE_CPU_ISA": s} for s in other_kernel_sets()}
#: the TensorRT plugin objects through the harness (their messages are the plugins' own)
HARNESS = ("emu", "trt-harness")
#: the backends running the CUDA kernels: bad input data (ids, offsets) is the kernels' report, in their words
CUDA_KERNELS = (*HARNESS, "ort-cuda-emu")
BACKENDS = [*ORT_WORKERS, pytest.param("emu", marks=pytest.mark.emu),
            pytest.param("trt-harness", marks=pytest.mark.gpu),
            pytest.param("ort-cuda-emu", marks=pytest.mark.emu)]


def _ort_cuda_emu_library() -> str | None:
    from pimoe_export.errors import PluginLoadError
    from pimoe_export.native.libraries import find_ort_cuda_library

    try:
        return str(find_ort_cuda_library(emulated=True))
    except PluginLoadError:
        return None


def _cuda_available() -> bool:
    import torch

    from pimoe_export.testing.harness import find_harness

    return torch.cuda.is_available() and find_harness() is not None


def call(backend: str, op: str, *args):
    """(outcome, the error types that count as a refusal) of ``op`` on ``backend``, in the backend's worker."""
    if backend == "emu":
        if not emulated_available():
            pytest.skip("emu: the emulated-GPU harness libpimoe_trt_harness_emu.so was not built")
        return isolated().call(harness_op, True, op, *args), EMU_ERROR_TYPES
    if backend == "trt-harness":
        if not _cuda_available():
            pytest.skip("trt-harness: no CUDA GPU here, or plugins/harness was not built")
        return isolated().call(harness_op, False, op, *args), EMU_ERROR_TYPES
    model, feeds = ORT_GRAPHS[op](*args)
    if backend == "ort-cuda-emu":
        library = _ort_cuda_emu_library()
        if library is None:
            pytest.skip("ort-cuda-emu: libpimoe_ort_cuda_emu.so was not built")
        # bad ids, slots and offsets are data the CUDA kernels report asynchronously; the sync check raises them at
        # the run that had them (without it they are clamped and reported at teardown: tests/runtime/test_ort_cuda.py)
        sync = {"PIMOE_ORT_SYNC_CHECK": "1"}
        return isolated(sync).call(ort_run, model, feeds, library=library), ORT_ERROR_TYPES
    return isolated(ORT_WORKERS[backend]).call(ort_run, model, feeds), ORT_ERROR_TYPES


def _route(logits, bias, k, normalize):
    return single_op_model("PiMoERoute", [("logits", logits)], [("weights", f32, 2), ("ids", i32, 2)],
                           {"k": k, "normalize": int(normalize)}), {"logits": logits}


def _dispatch(x, ids, e):
    return single_op_model("PiMoEDispatch", [("x", x), ("ids", ids)],
                           [("x_sorted", f32, 2), ("offsets", i32, 1), ("flat_to_sorted", i32, 1)],
                           {"num_experts": e}), {"x": x, "ids": ids}


def _combine(y_sorted, f2s, weights):
    inputs = [("y_sorted", y_sorted), ("flat_to_sorted", f2s), ("weights", weights)]
    return single_op_model("PiMoECombine", inputs, [("y", f32, 2)], {}), dict(inputs)


def _expert_mlp(x, offsets, params, expert_ids, widths, activation, layer_norm):
    attrs = expert_mlp_attrs(expert_ids, widths, activation, layer_norm)
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    return single_op_model("PiMoEExpertMLP", [("x_sorted", x), ("offsets", offsets)], [("y", f32, 2)], attrs,
                           named), {"x_sorted": x, "offsets": offsets}


def only(result):
    """The one output of an op (ONNX Runtime returns the list of a graph's outputs)."""
    return np.asarray(result[0] if isinstance(result, list) else result)


ORT_GRAPHS = {"route": _route, "dispatch": _dispatch, "combine": _combine, "expert_mlp": _expert_mlp}


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_takes_k_equal_to_e_and_refuses_k_above_it(backend) -> None:
    logits = np.array([[0.5, 2.0, -1.0, 1.0], [3.0, 3.0, 0.0, -2.0]], f32)
    outcome, _ = call(backend, "route", logits, None, 4, False)
    weights, ids = assert_ran(outcome, f"{backend}: k = E = 4")[:2]
    # every expert, by descending probability, ties to the lower index
    assert ids.tolist() == [[1, 3, 0, 2], [0, 1, 2, 3]]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(weights, np.take_along_axis(probs, ids.astype(np.int64), -1), rtol=1e-6)
    outcome, types = call(backend, "route", logits, None, 5, False)
    assert_refused(outcome, "k=5 exceeds the number of experts E=4", f"{backend}: PiMoERoute k = 5 > E = 4", types)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [4, -1, 2**31 - 1])
def test_dispatch_refuses_an_id_outside_0_to_e(backend, bad) -> None:
    x = np.arange(12, dtype=f32).reshape(3, 4)
    ids = np.array([[3, 0], [1, 3], [2, 0]], i32)
    outcome, _ = call(backend, "dispatch", x, ids, 4)
    x_sorted, offsets, f2s = assert_ran(outcome, f"{backend}: ids up to E - 1")
    assert offsets.tolist() == [0, 2, 3, 4, 6] and f2s.tolist() == [4, 0, 2, 5, 3, 1]
    np.testing.assert_array_equal(x_sorted, x[[0, 2, 1, 2, 0, 1]])
    ids[1, 1] = bad
    outcome, types = call(backend, "dispatch", x, ids, 4)
    fragment = f"holds expert id {bad} outside" if backend in CUDA_KERNELS else f"ids[1, 1] = {bad} is outside [0, 4)"
    assert_refused(outcome, fragment, f"{backend}: PiMoEDispatch id {bad} with E = 4", types)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dispatch_refuses_more_slots_than_experts(backend) -> None:
    x = np.ones((3, 4), f32)
    outcome, types = call(backend, "dispatch", x, np.zeros((3, 5), i32), 4)
    assert_refused(outcome, "ids dim 1 (k) must be in [1, min(E, 16)], got 5", f"{backend}: dispatch k = 5 > E = 4",
                   types)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [6, -1])
def test_combine_refuses_a_slot_outside_0_to_n_times_k(backend, bad) -> None:
    y_sorted = np.arange(12, dtype=f32).reshape(6, 2)
    weights = np.full((3, 2), 0.5, f32)
    f2s = np.array([5, 4, 3, 2, 1, 0], i32)
    outcome, _ = call(backend, "combine", y_sorted, f2s, weights)
    y = only(assert_ran(outcome, f"{backend}: slots up to N*k - 1"))
    np.testing.assert_array_equal(y, 0.5 * y_sorted[f2s].reshape(3, 2, 2).sum(axis=1))
    f2s[1] = bad
    outcome, types = call(backend, "combine", y_sorted, f2s, weights)
    fragment = f"flat_to_sorted[1] = {bad} is outside [0, "
    assert_refused(outcome, fragment, f"{backend}: PiMoECombine slot {bad} with N*k = 6", types)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_mlp_refuses_an_expert_id_equal_to_e(backend) -> None:
    params = [np.eye(4, dtype=f32)[None] * 2.0, np.full((1, 4), 0.25, f32)]
    x = np.arange(12, dtype=f32).reshape(3, 4) / 10
    offsets = np.array([0, 1, 3], i32)  # E = 2: expert 1 holds rows 1 and 2
    outcome, _ = call(backend, "expert_mlp", x, offsets, params, [1], [4, 4], "relu", False)
    y = only(assert_ran(outcome, f"{backend}: expert id E - 1"))
    expected = np.zeros_like(x)  # rows outside the group: 0; one layer: no activation
    expected[1:] = 2.0 * x[1:] + 0.25
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    outcome, types = call(backend, "expert_mlp", x, offsets, params, [2], [4, 4], "relu", False)
    assert_refused(outcome, "expert_ids[0]=2 is outside [0, 2)", f"{backend}: PiMoEExpertMLP expert id 2 with E = 2",
                   types)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("offsets", "fragment_ort", "fragment_emu"), [
    ([0, 2, 1, 3], "non-decreasing", "offsets is not a partition"),
    ([0, 1, 4], "must equal the number of rows 3", "offsets is not a partition"),
    ([1, 2, 3], "offsets[0]", "offsets is not a partition"),
    ([0, 2_000_000_000, 3], "non-decreasing", "offsets is not a partition"),
])
def test_expert_mlp_refuses_offsets_that_are_not_a_partition_of_the_rows(backend, offsets, fragment_ort,
                                                                         fragment_emu) -> None:
    """An offset past the rows would make the kernel read and write rows that do not exist."""
    params = [np.eye(4, dtype=f32)[None], np.zeros((1, 4), f32)]
    x = np.ones((3, 4), f32)
    outcome, types = call(backend, "expert_mlp", x, np.array(offsets, i32), params, [1], [4, 4], "relu", False)
    assert_refused(outcome, fragment_emu if backend in CUDA_KERNELS else fragment_ort, f"{backend}: offsets {offsets}",
                   types)
