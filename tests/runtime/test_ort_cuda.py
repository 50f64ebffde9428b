"""libpimoe_ort_cuda: libpimoe_ort's CPU ops plus CUDA execution-provider kernels for the four pimoe ops
(plugins/ort/pimoe_ort_cuda.cpp, on the plugins/kernels/cuda launchers the TensorRT plugins use; built with nvcc).

- Everywhere it is built (CI builds it with nvcc): registering it in ONNX Runtime (CPU and CUDA kernels of the same
  ops in one domain) is accepted, and on the CPU provider it gives libpimoe_ort's outputs bit for bit, fp32 and INT8.
- ``emu`` (CI): libpimoe_ort_cuda_emu, the same CUDA-provider kernel code on the CPU CUDA emulator (plugins/emu),
  registered for the CPU provider: the wrappers (input checks, parameter roles, act_scales, scratch sizes, device
  status) give libpimoe_ort's outputs within the GPU tolerances of tests/emu/test_gpu_layer.py, fp32/fp16/INT8;
  bad expert ids are clamped, and reported as a run error with PIMOE_ORT_SYNC_CHECK=1.
- ``gpu``: with onnxruntime-gpu on a CUDA GPU, every pimoe node runs on the CUDA provider (ONNX Runtime's profile
  names the provider of each node), the outputs match the CPU provider within the same tolerances, and two runs are
  bit-identical. Skipped, with the reason, without a GPU or without onnxruntime-gpu (PIMOE_SETUP_ORT=gpu
  scripts/setup.sh installs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pimoe_export.errors import PluginLoadError
from pimoe_export.native.libraries import check_ort_library, find_ort_cuda_library, find_ort_library
from pimoe_export.ops import schema
from pimoe_export.runtime.ort import CUDA_PROVIDER, create_session, op_library_for, session_options
from pimoe_export.validate.metrics import error_stats

PIMOE_OPS = {schema.ROUTE, schema.DISPATCH, schema.EXPERT_MLP, schema.COMBINE}
FP16_MAX_ABS = 4e-3  # x max|y|: tests/emu/test_gpu_layer.py's fp16 bound (fp32 summation order, fp16 rounding flips)
INT8_REL_L2 = 1e-3  # tests/emu/test_gpu_layer.py's bound of the int8 GPU path against the fake-quant reference


@pytest.fixture(scope="module")
def cuda_library() -> str:
    try:
        return check_ort_library(str(find_ort_cuda_library()))["path"]
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort_cuda is not built (needs nvcc): {exc}")


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, Path]:
    """fp32, fp16 and INT8 (w8a8) exports of one tiny layer."""
    from pimoe_export.export.exporter import export_onnx
    from pimoe_export.model import create_from_preset
    from pimoe_export.quantize import quantize_model

    root = tmp_path_factory.mktemp("ort-cuda")
    model = create_from_preset("tiny", seed=21).eval()
    export_onnx(model, root / "fp32.onnx")
    export_onnx(model, root / "fp16.onnx", precision="fp16")
    calibration = torch.randn(4, 32, model.hidden_size, generator=torch.Generator().manual_seed(1))
    quantize_model(model, root / "int8.onnx", calibration=calibration, method="max", fp32_onnx=root / "fp32.onnx")
    return {"fp32": root / "fp32.onnx", "fp16": root / "fp16.onnx", "int8": root / "int8.onnx",
            "hidden": model.hidden_size}


def _input(graphs, precision: str, shape=(3, 11)) -> np.ndarray:
    x = np.random.default_rng(4).standard_normal((*shape, graphs["hidden"]))
    return x.astype(np.float16 if precision == "fp16" else np.float32)


def test_library_declares_the_cuda_provider(cuda_library) -> None:
    assert check_ort_library(cuda_library)["providers"] == ["CPUExecutionProvider", CUDA_PROVIDER]
    assert op_library_for([CUDA_PROVIDER, "CPUExecutionProvider"]) == Path(cuda_library)
    assert op_library_for(None) == find_ort_library()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_on_the_cpu_provider_it_is_libpimoe_ort(cuda_library, graphs, precision) -> None:
    x = _input(graphs, precision)
    want = create_session(graphs[precision], library=find_ort_library()).run(None, {"hidden_states": x})
    got = create_session(graphs[precision], library=cuda_library).run(None, {"hidden_states": x})
    for name, a, b in zip(("output", "expert_ids", "expert_weights"), got, want, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)


def assert_matches_the_cpu_kernels(got, want, precision: str) -> None:
    """CUDA kernels (GPU or emulated) against libpimoe_ort's CPU kernels on the same graph and input."""
    y, ids, w = want
    np.testing.assert_array_equal(got[1], ids)  # random inputs: no ties
    np.testing.assert_allclose(got[2], w, rtol=2e-6, atol=1e-7)
    scale = float(np.abs(y.astype(np.float32)).max())
    if precision == "fp32":
        np.testing.assert_allclose(got[0], y, rtol=1e-5, atol=1e-5 * scale)
    elif precision == "fp16":
        assert float(np.abs(got[0].astype(np.float32) - y.astype(np.float32)).max()) <= FP16_MAX_ABS * scale
    else:
        assert error_stats(y, got[0]).rel_l2 <= INT8_REL_L2


# ------------------------------------------------------------------------------------------ emulated CUDA kernels
@pytest.fixture(scope="module")
def emu_library() -> str:
    try:
        return check_ort_library(str(find_ort_cuda_library(emulated=True)))["path"]
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort_cuda_emu is not built: {exc}")


@pytest.mark.emu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_emulated_cuda_kernels_match_the_cpu_kernels(emu_library, graphs, precision) -> None:
    for shape in ((3, 11), (1, 1), (0, 4)):
        x = _input(graphs, precision, shape)
        want = create_session(graphs[precision], library=find_ort_library()).run(None, {"hidden_states": x})
        got = create_session(graphs[precision], library=emu_library).run(None, {"hidden_states": x})
        if shape[0]:
            assert_matches_the_cpu_kernels(got, want, precision)
        else:
            assert [a.shape for a in got] == [b.shape for b in want]


BAD_IDS = """
import gc
import sys
import numpy as np
from op_graphs import single_op_model
from pimoe_export.runtime.ort import create_session

x = np.arange(12, dtype=np.float32).reshape(3, 4)
ids = np.array([[0, 1], [5, 2], [1, 0]], dtype=np.int32)  # 5 is outside [0, 3)
model = single_op_model("PiMoEDispatch", [("x", x), ("ids", ids)],
                        [("x_sorted", np.float32, 2), ("offsets", np.int32, 1), ("flat_to_sorted", np.int32, 1)],
                        {"num_experts": 3})
session = create_session(model, library=sys.argv[1])
for _ in range(3):
    try:
        x_sorted, offsets, f2s = session.run(None, {"x": x, "ids": ids})
    except Exception as exc:
        print("ERROR", exc)
    else:
        print("OK", offsets.tolist(), sorted(f2s.tolist()))
print("released", flush=True)
del session
gc.collect()
"""


@pytest.mark.emu
@pytest.mark.parametrize("sync_check", ["0", "1"])
def test_bad_expert_ids_are_clamped_or_reported(emu_library, sync_check) -> None:
    """Without the sync check: clamped, counted in the kernel's status block, and reported once, when the session
    is released (what a user sees; issue 25, fix 2). With PIMOE_ORT_SYNC_CHECK=1: every run fails with the
    message, and nothing is left to report at teardown."""
    env = {**os.environ, "PIMOE_ORT_SYNC_CHECK": sync_check,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", BAD_IDS, emu_library], env=env, capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "released" and len(lines) == 4, done.stdout
    teardown = [line for line in done.stderr.splitlines() if line.startswith("[pimoe-ort] WARNING")]
    for line in lines[:3]:
        if sync_check == "1":
            assert line.startswith("ERROR") and "PiMoEDispatch" in line and "expert" in line, line
        else:  # clamped into [0, E): still a partition of the 6 pairs, every row written once
            assert line.startswith("OK") and line.endswith("[0, 1, 2, 3, 4, 5]"), line
    if sync_check == "1":
        assert teardown == [], done.stderr
    else:  # one bad id per run, three runs
        assert len(teardown) == 1 and "PiMoEDispatch (CUDA): 3 inconsistent input entries" in teardown[0], done.stderr
        assert "(flat index 2) holds expert id 5" in teardown[0], teardown[0]


def run_concurrently(session, inputs: list[np.ndarray], rounds: int) -> list[list[list[np.ndarray]]]:
    """Two threads run `session` on every input, `rounds` times each, in opposite orders; returns each thread's
    outputs per input and round."""
    from concurrent.futures import ThreadPoolExecutor

    def worker(order: list[int]) -> list[tuple[int, list[np.ndarray]]]:
        return [(i, session.run(None, {"hidden_states": inputs[i]})) for _ in range(rounds) for i in order]

    forward = list(range(len(inputs)))
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(worker, [forward, forward[::-1]]))
    got: list[list[list[np.ndarray]]] = [[] for _ in inputs]
    for thread in results:
        for i, outputs in thread:
            got[i].append(outputs)
    return got


def assert_bit_identical(got: list[list[list[np.ndarray]]], want: list[list[np.ndarray]]) -> None:
    for i, (runs, reference) in enumerate(zip(got, want, strict=True)):
        for outputs in runs:
            for name, a, b in zip(("output", "expert_ids", "expert_weights"), outputs, reference, strict=True):
                assert a.tobytes() == b.tobytes(), f"input {i}: {name} differs from the sequential run"


@pytest.mark.emu
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_emulated_cuda_kernels_two_threads_one_session(emu_library, graphs, precision) -> None:
    """Two threads running one session concurrently give, bit for bit, the outputs of sequential runs (issue 25,
    fix 1). On the emulator the kernels of the two threads interleave launch by launch (its device lock) and the
    scratch buffers come from ONNX Runtime's CPU allocator: this checks the kernel objects' shared state (the lazily
    allocated status block) and the wrappers under concurrency; the stream ordering of the scratch memory needs the
    GPU test below."""
    session = create_session(graphs[precision], library=emu_library)
    inputs = [_input(graphs, precision, (2, 5 + 3 * i)) * (1 + i) for i in range(4)]
    want = [session.run(None, {"hidden_states": x}) for x in inputs]
    assert_bit_identical(run_concurrently(session, inputs, rounds=2), want)


# ------------------------------------------------------------------------------------------ on the GPU
@pytest.fixture(scope="module")
def ort_gpu(cuda_library):
    import onnxruntime as ort

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    if CUDA_PROVIDER not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDA provider: install onnxruntime-gpu "
                    "(pip install 'pimoe-export[gpu]', or PIMOE_SETUP_ORT=gpu scripts/setup.sh)")
    return ort


def _gpu_run(ort, library: str, path: Path, x: np.ndarray, profile_dir: Path) -> tuple[list[np.ndarray], dict]:
    options = session_options(library=library)
    options.enable_profiling = True
    options.profile_file_prefix = str(profile_dir / "profile")
    session = ort.InferenceSession(str(path), options, providers=[CUDA_PROVIDER, "CPUExecutionProvider"])
    if session.get_providers()[0] != CUDA_PROVIDER:
        pytest.fail(f"the CUDA provider could not be created (providers: {session.get_providers()}); are cuDNN and "
                    "cuBLAS of onnxruntime-gpu's CUDA major installed?")
    outputs = session.run(None, {"hidden_states": x})
    events = json.loads(Path(session.end_profiling()).read_text())
    providers: dict[str, set[str]] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and args.get("op_name") in PIMOE_OPS:
            providers.setdefault(args["op_name"], set()).add(args.get("provider", "?"))
    return outputs, providers


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_cuda_provider_runs_the_pimoe_ops_and_matches_the_cpu(ort_gpu, cuda_library, graphs, precision,
                                                             tmp_path) -> None:
    x = _input(graphs, precision)
    got, providers = _gpu_run(ort_gpu, cuda_library, graphs[precision], x, tmp_path)
    assert providers == {op: {CUDA_PROVIDER} for op in PIMOE_OPS}, providers
    want = create_session(graphs[precision], library=cuda_library).run(None, {"hidden_states": x})
    assert_matches_the_cpu_kernels(got, want, precision)
    again, _ = _gpu_run(ort_gpu, cuda_library, graphs[precision], x, tmp_path)
    for a, b in zip(got, again, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_cuda_provider_two_threads_one_session_bit_identical(ort_gpu, cuda_library, graphs, precision) -> None:
    """Two threads running one CUDA-provider session concurrently (each Run() on its own stream) give the outputs of
    sequential runs bit for bit: the scratch memory of one run is never handed to the other while its kernels still
    run (KernelContext_GetScratchBuffer on the compute stream; issue 25, fix 1). Inputs large enough that the two
    streams' kernels overlap."""
    session = ort_gpu.InferenceSession(str(graphs[precision]), session_options(library=cuda_library),
                                       providers=[CUDA_PROVIDER, "CPUExecutionProvider"])
    if session.get_providers()[0] != CUDA_PROVIDER:
        pytest.fail(f"the CUDA provider could not be created (providers: {session.get_providers()})")
    inputs = [_input(graphs, precision, (4, 256 + 64 * i)) * (1 + i) for i in range(4)]
    want = [session.run(None, {"hidden_states": x}) for x in inputs]
    assert_bit_identical(run_concurrently(session, inputs, rounds=10), want)
