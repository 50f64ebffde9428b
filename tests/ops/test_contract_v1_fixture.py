"""Graphs and a unit exported by the op-contract-v1 release compute bit for bit what they computed then.

The fixture (tests/fixtures/contract_v1, made by its make_fixture.py at the last v1 commit) holds the ``tiny`` layer
as fp32, fp16, W8A8 and W8A8-dynamic custom-op graphs, the manifest ``package`` wrote for the fp32 one, and what
every backend computed on them with the v1 code: ONNX Runtime with each CPU ISA, the ONNX Runtime CUDA-EP kernels on
the emulated GPU, and every pimoe node through the TensorRT plugins on the emulated harness. Each backend here must
reproduce its own recording exactly (backends differ from each other by fp32 rounding, so each has its own).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from pimoe_export._files import sha256_file
from pimoe_export.errors import PluginLoadError
from pimoe_export.interface import META_CONTRACT
from pimoe_export.native.libraries import check_ort_library, find_ort_cuda_library, find_ort_library
from pimoe_export.ops import schema
from pimoe_export.ops.validation import _attribute_value, check_graph
from pimoe_export.runtime.ort import create_session

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "contract_v1"
GRAPHS = ("fp32", "fp16", "w8a8", "w8a8_dynamic")
OUTPUTS = ("output", "expert_ids", "expert_weights")


@pytest.fixture(scope="module")
def recordings() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "recordings.npz") as data:
        return {k: data[k] for k in data.files}


def run_graph(graph: str, recordings, library: str | None = None, threads: int = 1) -> list[np.ndarray]:
    session = create_session(FIXTURE / f"tiny_{graph}.onnx", library=library, threads=threads)
    return session.run(None, {"hidden_states": recordings[f"{graph}/x"]})


def assert_recorded(got: list[np.ndarray], recordings, graph: str, backend: str) -> None:
    for name, value in zip(OUTPUTS, got, strict=True):
        want = recordings[f"{graph}/{backend}/{name}"]
        assert value.dtype == want.dtype and value.shape == want.shape, name
        np.testing.assert_array_equal(value, want, err_msg=f"{graph} {name} on {backend}")


@pytest.mark.parametrize("graph", GRAPHS)
def test_v1_graphs_are_valid_v1_graphs_of_the_current_contract(graph) -> None:
    proto = onnx.load(str(FIXTURE / f"tiny_{graph}.onnx"))
    assert {p.key: p.value for p in proto.metadata_props}[META_CONTRACT] == "1"
    onnx.checker.check_model(proto, full_check=True)
    check_graph(proto)  # every v1 attribute is valid in the current contract; every left-out one defaults to v1


@pytest.mark.parametrize("graph", GRAPHS)
def test_v1_graphs_bit_identical_on_onnx_runtime_cpu(graph, recordings) -> None:
    """libpimoe_ort with the CPU ISA it selects here (run again with PIMOE_CPU_ISA=generic by the test below), on one
    and two threads."""
    isa = check_ort_library(str(find_ort_library()))["cpu_isa"]
    backend = f"ort-{isa}"
    for threads in (1, 2):
        got = run_graph(graph, recordings, threads=threads)
        if f"{graph}/{backend}/output" in recordings:
            assert_recorded(got, recordings, graph, backend)
        else:  # an ISA that v1 did not have (recorded: avx2, generic): v1's semantics to fp32 rounding
            np.testing.assert_array_equal(got[1], recordings[f"{graph}/ort-avx2/expert_ids"])
            want = recordings[f"{graph}/ort-avx2/output"].astype(np.float32)
            np.testing.assert_allclose(got[0].astype(np.float32), want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


@pytest.mark.slow
def test_v1_graphs_bit_identical_on_the_portable_cpu_kernels(tmp_path) -> None:
    """The ISA is chosen once per process: the test above again, in a process that forces the portable kernels."""
    env = {**os.environ, "PIMOE_CPU_ISA": "generic"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "bit_identical_on_onnx_runtime_cpu", "--basetemp", str(tmp_path / "t")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"{len(GRAPHS)} passed" in done.stdout, done.stdout[-2000:]


@pytest.mark.emu
@pytest.mark.parametrize("graph", GRAPHS)
def test_v1_graphs_bit_identical_on_the_emulated_cuda_ep_kernels(graph, recordings) -> None:
    try:
        library = check_ort_library(str(find_ort_cuda_library(emulated=True)))["path"]
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort_cuda_emu is not built: {exc}")
    assert_recorded(run_graph(graph, recordings, library=library), recordings, graph, "ort-cuda-emu")


@pytest.mark.emu
@pytest.mark.parametrize("graph", GRAPHS)
def test_v1_nodes_bit_identical_through_the_emulated_tensorrt_plugins(graph, recordings) -> None:
    """Every pimoe node of the v1 graph, with its v1 attributes (plugin fields), on the inputs ONNX Runtime computed
    for it then: the TensorRT plugin objects and CUDA kernels on the emulated GPU give the recorded outputs."""
    from onnx import numpy_helper

    from pimoe_export.testing.harness import emulated_backend_or_none

    backend = emulated_backend_or_none()
    if backend is None:
        pytest.skip("the emulated harness is not built (scripts/setup.sh)")
    proto = onnx.load(str(FIXTURE / f"tiny_{graph}.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if n.domain == schema.DOMAIN]
    assert [n.op_type for n in nodes].count(schema.EXPERT_MLP) == 3
    for index, node in enumerate(nodes):
        attrs = {a.name: _attribute_value(a) for a in node.attribute}
        arrays = [recordings.get(f"{graph}/node{index}/in{j}", inits.get(name)) for j, name in enumerate(node.input)]
        outs = backend.run(node.op_type, attrs, arrays)
        for j, out in enumerate(outs):
            np.testing.assert_array_equal(out, recordings[f"{graph}/node{index}/trt-emu/out{j}"],
                                          err_msg=f"{graph} node {index} ({node.op_type}) output {j}")


def test_v1_unit_loads_and_runs_bit_identical(recordings, tmp_path) -> None:
    """The unit ``package`` wrote for the fp32 graph: its v1 manifest, its ONNX; the library (a build output, not
    committed) is the current one, fingerprinted in the manifest the way package does."""
    from pimoe_export.runtime.engine import Engine

    unit = tmp_path / "unit"
    unit.mkdir()
    shutil.copyfile(FIXTURE / "tiny_fp32.onnx", unit / "model.onnx")
    library = find_ort_library()
    shutil.copyfile(library, unit / "libpimoe_ort.so")
    manifest = json.loads((FIXTURE / "unit_manifest.json").read_text())
    assert manifest["contract_version"] == 1
    for artifact in manifest["artifacts"]:
        if artifact["role"] == "ort_library":
            artifact["sha256"] = sha256_file(unit / "libpimoe_ort.so")
            artifact["bytes"] = (unit / "libpimoe_ort.so").stat().st_size
    (unit / "manifest.json").write_text(json.dumps(manifest))
    isa = check_ort_library(str(library))["cpu_isa"]
    if f"fp32/ort-{isa}/output" not in recordings:
        pytest.skip(f"no v1 recording for the {isa} kernels")
    with Engine.load(unit) as engine:
        y, ids, weights = engine.run(recordings["fp32/x"], routing=True)
    assert_recorded([y, ids, weights], recordings, "fp32", f"ort-{isa}")


def test_v1_graph_packaged_by_the_current_code_runs_bit_identical(recordings, tmp_path) -> None:
    """`package` of a v1 graph records contract 1 (what the graph needs), and the unit loads and computes the
    recorded bits with the current library."""
    from pimoe_export.build.units import package_ort
    from pimoe_export.runtime.engine import Engine

    manifest = package_ort(FIXTURE / "tiny_fp32.onnx", tmp_path / "unit")
    assert manifest.contract_version == 1
    isa = check_ort_library(str(find_ort_library()))["cpu_isa"]
    if f"fp32/ort-{isa}/output" not in recordings:
        pytest.skip(f"no v1 recording for the {isa} kernels")
    with Engine.load(tmp_path / "unit") as engine:
        y, ids, weights = engine.run(recordings["fp32/x"], routing=True)
    assert_recorded([y, ids, weights], recordings, "fp32", f"ort-{isa}")
