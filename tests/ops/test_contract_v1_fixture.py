"""Graphs and a unit exported by the op-contract-v1 release compute bit for bit what they computed then.

The fixture (tests/fixtures/contract_v1, made by its make_fixture.py at the last v1 commit) holds the ``tiny`` layer
as fp32, fp16, W8A8 and W8A8-dynamic custom-op graphs, the manifest ``package`` wrote for the fp32 one, and what
every backend computed on them with the v1 code: ONNX Runtime with each CPU kernel set (avx2, generic), the ONNX
Runtime CUDA-EP kernels on the emulated GPU, and every pimoe node through the TensorRT plugins on the emulated
harness. Each backend here must reproduce its own recording exactly (backends differ from each other by fp32
rounding, so each has its own); the avx512 kernels and their SIMDe build, which v1 did not have, must reproduce the
avx2 recording (isa.h: the same bits as avx2), never a tolerance.

One deliberate exception, element by element (issue28_changes.npz, made by make_issue28_changes.py): issue 28 gave
every CPU kernel set one canonical LayerNorm and activation order (plugins/kernels/cpu/isa.h, simd_math.h), so that
INT8 outputs are bit-identical on generic, avx2 and avx512 and fp32 outputs on the SIMD sets. That moved bits of
the expert outputs of two graphs, only there (routing outputs, the fp16 and static W8A8 graphs, the CUDA and
TensorRT recordings are unchanged):

- ``ort-avx2``: v1's AVX2 LayerNorm summed each row in 8 lanes (element i into lane i % 8, each lane in order of i)
  with the elements past the last multiple of 8 added one by one after the lanes; the canonical order sums in 64
  lanes reduced by halving. For the fixture's 32- and 64-wide LayerNorm rows the mean and variance round
  differently. Later in the same issue the canonical gelu's erf became a rational fit (simd_math.h: one division,
  no exponential, half the epilogue's time) in place of v1's Abramowitz & Stegun 7.1.26 form, whose results it
  matches to a few units in the last place. Together: 264 of the fp32 graph's 336 output elements change and 145
  of the W8A8-dynamic graph's (its per-row activation scales come from those rows; with the 7.1.26 erf the
  LayerNorm order alone changed 130 and 34). The rest of v1's AVX2 epilogue (the other activations, the
  normalisation) is unchanged.
- ``ort-generic``: v1's portable kernels used libm's erf (gelu) and sequential LayerNorm sums with a separately
  rounded multiply and add; they now compute the canonical order too: 242 fp32 and 125 W8A8-dynamic output
  elements change (262 and 180 with the 7.1.26 erf), and every W8A8-dynamic output now equals the avx2 kernels'
  value bit for bit (v1's generic and avx2 recordings differed in 173 of them).

How this was established: the v1 code (this branch before the merge of issue 28) rebuilt today reproduces both
recordings exactly; the current code with v1's AVX2 LayerNorm sums put back reproduces every ``ort-avx2`` recording
exactly, and with v1's generic LayerNorm and libm activations put back every ``ort-generic`` one (both with the
7.1.26 erf). The rational erf's part: the code just before it (cdfd483) gave the 7.1.26 counts above (this test
passed there) and differs from the current code in simd_math.h's erf alone; make_issue28_changes.py rerun on the
current code gives the counts above. The changed values are at most 4 units in the last place of the graph's largest
output away from v1's (asserted below; with the rational erf the largest is 3.5).
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
from cpu_kernel_sets import other_kernel_sets

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
# (graph, recording) -> how many of the 336 elements of its "output" issue 28's canonical epilogue changed
CHANGED_BY_ISSUE_28 = {("fp32", "ort-avx2"): 264, ("w8a8_dynamic", "ort-avx2"): 145,
                       ("fp32", "ort-generic"): 242, ("w8a8_dynamic", "ort-generic"): 125}
# the recording each CPU kernel set must reproduce: v1 had generic and avx2; avx512 (native or SIMDe) gives avx2's bits
RECORDING_OF = {"generic": "ort-generic", "avx2": "ort-avx2", "avx512": "ort-avx2", "avx512-simde": "ort-avx2"}


@pytest.fixture(scope="module")
def recordings() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "recordings.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def issue28_changes() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "issue28_changes.npz") as data:
        return {k: data[k] for k in data.files}


def expected(recordings, issue28_changes, graph: str, backend: str, name: str) -> np.ndarray:
    """The v1 recording, with the elements issue 28 changed (and only those) at their new values."""
    want = recordings[f"{graph}/{backend}/{name}"].copy()
    key = f"{graph}/{backend}/{name}"
    if f"{key}/index" in issue28_changes:
        want.reshape(-1)[issue28_changes[f"{key}/index"]] = issue28_changes[f"{key}/value"]
    return want


def cpu_recording() -> str:
    """The recording the CPU kernel set of this process must reproduce."""
    isa = check_ort_library(str(find_ort_library()))["cpu_isa"]
    assert isa in RECORDING_OF, f"no v1 recording for the {isa} kernels: add the set to RECORDING_OF"
    return RECORDING_OF[isa]


def run_graph(graph: str, recordings, library: str | None = None, threads: int = 1) -> list[np.ndarray]:
    session = create_session(FIXTURE / f"tiny_{graph}.onnx", library=library, threads=threads)
    return session.run(None, {"hidden_states": recordings[f"{graph}/x"]})


def assert_recorded(got: list[np.ndarray], recordings, graph: str, backend: str,
                    issue28_changes: dict[str, np.ndarray] | None = None) -> None:
    """Bit for bit (NaNs by payload too); ``issue28_changes`` for the CPU recordings."""
    for name, value in zip(OUTPUTS, got, strict=True):
        want = (expected(recordings, issue28_changes, graph, backend, name) if issue28_changes is not None
                else recordings[f"{graph}/{backend}/{name}"])
        assert value.dtype == want.dtype and value.shape == want.shape, name
        assert value.tobytes() == want.tobytes(), (
            f"{graph} {name} on {backend}: {np.sum(value != want)} elements differ from the recording")


@pytest.mark.parametrize("graph", GRAPHS)
def test_v1_graphs_are_valid_v1_graphs_of_the_current_contract(graph) -> None:
    proto = onnx.load(str(FIXTURE / f"tiny_{graph}.onnx"))
    assert {p.key: p.value for p in proto.metadata_props}[META_CONTRACT] == "1"
    onnx.checker.check_model(proto, full_check=True)
    check_graph(proto)  # every v1 attribute is valid in the current contract; every left-out one defaults to v1


@pytest.mark.parametrize("graph", GRAPHS)
def test_v1_graphs_bit_identical_on_onnx_runtime_cpu(graph, recordings, issue28_changes) -> None:
    """libpimoe_ort with the CPU kernel set it selects here (the others run by the test below), on one and two
    threads: its recording bit for bit, with issue 28's documented changes."""
    backend = cpu_recording()
    for threads in (1, 2):
        assert_recorded(run_graph(graph, recordings, threads=threads), recordings, graph, backend, issue28_changes)


@pytest.mark.slow
@pytest.mark.parametrize("kernel_set", other_kernel_sets())
def test_v1_graphs_bit_identical_on_every_cpu_kernel_set(kernel_set, tmp_path) -> None:
    """The kernel set is chosen once per process: the test above again, in a process that forces each other set this
    machine runs (generic; avx2 and avx512-simde on an AVX-512 machine)."""
    env = {**os.environ, "PIMOE_CPU_ISA": kernel_set}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "bit_identical_on_onnx_runtime_cpu", "--basetemp", str(tmp_path / "t")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"{len(GRAPHS)} passed" in done.stdout, done.stdout[-2000:]


def test_issue28_changes_are_exactly_the_documented_ones(recordings, issue28_changes) -> None:
    """The amended elements: only the expert outputs of the fp32 and W8A8-dynamic graphs on the two CPU recordings, as
    many as documented, each really different from v1's value and at most 4 units in the last place of the graph's
    largest output away from it; and the point of the change: W8A8-dynamic now gives the avx2 bits on the generic
    kernels too, where v1's recordings differed."""
    keys = {(k.split("/")[0], k.split("/")[1]) for k in issue28_changes}
    assert keys == set(CHANGED_BY_ISSUE_28)
    assert len(issue28_changes) == 2 * len(keys) and all(k.split("/", 2)[2] in ("output/index", "output/value")
                                                         for k in issue28_changes)
    for (graph, backend), count in CHANGED_BY_ISSUE_28.items():
        index, value = (issue28_changes[f"{graph}/{backend}/output/{part}"] for part in ("index", "value"))
        old = recordings[f"{graph}/{backend}/output"].reshape(-1)
        assert index.size == count == len(np.unique(index)) and value.dtype == old.dtype
        assert np.all(np.isfinite(value)) and np.all(value != old[index])
        ulp = np.spacing(np.abs(old).max())
        assert np.abs(value - old[index]).max() <= 4 * ulp, (graph, backend)
    v1_generic, v1_avx2 = (recordings[f"w8a8_dynamic/{b}/output"] for b in ("ort-generic", "ort-avx2"))
    assert np.sum(v1_generic != v1_avx2) == 173
    new_generic, new_avx2 = (expected(recordings, issue28_changes, "w8a8_dynamic", b, "output")
                             for b in ("ort-generic", "ort-avx2"))
    assert new_generic.tobytes() == new_avx2.tobytes()


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


def test_v1_unit_loads_and_runs_bit_identical(recordings, issue28_changes, tmp_path) -> None:
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
    with Engine.load(unit) as engine:
        y, ids, weights = engine.run(recordings["fp32/x"], routing=True)
    assert_recorded([y, ids, weights], recordings, "fp32", cpu_recording(), issue28_changes)


def test_v1_graph_packaged_by_the_current_code_runs_bit_identical(recordings, issue28_changes, tmp_path) -> None:
    """`package` of a v1 graph records contract 1 (what the graph needs), and the unit loads and computes the
    recorded bits with the current library."""
    from pimoe_export.build.units import package_ort
    from pimoe_export.runtime.engine import Engine

    manifest = package_ort(FIXTURE / "tiny_fp32.onnx", tmp_path / "unit")
    assert manifest.contract_version == 1
    with Engine.load(tmp_path / "unit") as engine:
        y, ids, weights = engine.run(recordings["fp32/x"], routing=True)
    assert_recorded([y, ids, weights], recordings, "fp32", cpu_recording(), issue28_changes)
