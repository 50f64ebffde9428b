"""Bad input, every kind, from the outside: each case runs the command line in a subprocess (a crash is a failure,
not a lost run) and must end in its documented exit code with one message naming the problem, no traceback, and
nothing written outside the output directory.

Kinds: units and manifests (paths out of the unit, symlinks, missing artefacts, tampering, malformed or lying
manifests), checkpoints, ONNX files, calibration data, CLI arguments, outputs that would replace the user's files,
and interruption. Runtime inputs through the Python API are at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from pimoe_export._files import sha256_file
from pimoe_export.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, ArtifactError, PiMoEInputError
from pimoe_export.quantize import default_fp32_path

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@dataclass
class World:
    """A tiny checkpoint, its exports and an ONNX Runtime unit, copied fresh into each case's folder."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / "tiny"

    @property
    def onnx(self) -> Path:
        return self.root / "tiny.onnx"

    @property
    def unit(self) -> Path:
        return self.root / "unit"


def cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pimoe_export.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    for args in (["create", "--preset", "tiny", "-o", "tiny"], ["export", "tiny", "-o", "tiny.onnx"],
                 ["package", "tiny.onnx", "-o", "unit"]):
        result = cli(*args, cwd=root)
        assert result.returncode == 0, result.stderr
    return root


@pytest.fixture
def world(template, tmp_path) -> World:
    root = tmp_path / "w"
    shutil.copytree(template, root)
    (tmp_path / "victim.txt").write_text("user data")  # outside everything: must survive every case
    return World(root)


def edit_manifest(unit: Path, change: Callable[[dict], None]) -> None:
    data = json.loads((unit / "manifest.json").read_text())
    change(data)
    (unit / "manifest.json").write_text(json.dumps(data))


def artifact(data: dict, role: str) -> dict:
    return next(a for a in data["artifacts"] if a["role"] == role)


# ------------------------------------------------------------------------------------------ units and manifests
def move_library_out(w: World) -> None:
    """The manifest names ../elsewhere/libpimoe_ort.so (a real copy with the right sha256)."""
    (w.root / "elsewhere").mkdir()
    shutil.copy(w.unit / "libpimoe_ort.so", w.root / "elsewhere" / "libpimoe_ort.so")
    edit_manifest(w.unit, lambda d: artifact(d, "ort_library").update(file="../elsewhere/libpimoe_ort.so"))


def absolute_library(w: World) -> None:
    path = str((w.unit / "libpimoe_ort.so").resolve())
    edit_manifest(w.unit, lambda d: artifact(d, "ort_library").update(file=path))


def symlinked_library(w: World) -> None:
    outside = w.root / "outside.so"
    shutil.move(w.unit / "libpimoe_ort.so", outside)
    (w.unit / "libpimoe_ort.so").symlink_to(outside)


def no_artifacts(w: World) -> None:
    edit_manifest(w.unit, lambda d: d.update(artifacts=[]))


def garbage_library(w: World) -> None:
    (w.unit / "libpimoe_ort.so").write_bytes(b"\x7fELF garbage")


def tampered_onnx(w: World) -> None:
    data = bytearray((w.unit / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (w.unit / "model.onnx").write_bytes(bytes(data))


def lying_config(w: World) -> None:
    """The manifest's config says another model than the ONNX it ships."""
    edit_manifest(w.unit, lambda d: d["config"].update(top_k=3))


def lying_precision(w: World) -> None:
    edit_manifest(w.unit, lambda d: d.update(precision="fp16"))


def lying_io(w: World) -> None:
    edit_manifest(w.unit, lambda d: d["io"]["inputs"][0].__setitem__(1, "float16"))


def manifest_not_utf8(w: World) -> None:
    (w.unit / "manifest.json").write_bytes(b"\xff\xfe{\x00")


def manifest_deeply_nested(w: World) -> None:
    (w.unit / "manifest.json").write_text("[" * 100000 + "]" * 100000)


def manifest_bad_types(w: World) -> None:
    edit_manifest(w.unit, lambda d: d.update(profile={"min_shape": "x", "opt_shape": [1], "max_shape": None}))


def manifest_unknown_backend(w: World) -> None:
    edit_manifest(w.unit, lambda d: d.update(backend="openvino"))


def manifest_symlink_out(w: World) -> None:
    shutil.move(w.unit / "manifest.json", w.root / "manifest.json")
    (w.unit / "manifest.json").symlink_to(w.root / "manifest.json")


UNIT_CASES = {
    "artefact path leaves the unit": (move_library_out, "outside the unit"),
    "absolute artefact path": (absolute_library, "absolute path"),
    "artefact symlinked to elsewhere": (symlinked_library, "outside the unit"),
    "manifest with no artefacts": (no_artifacts, "lists no"),
    "library replaced with garbage": (garbage_library, "does not match its manifest sha256"),
    "ONNX tampered with": (tampered_onnx, "does not match its manifest sha256"),
    "manifest config differs from the ONNX": (lying_config, "config differs"),
    "manifest precision differs from the ONNX": (lying_precision, "precision"),
    "manifest I/O dtype differs from the ONNX": (lying_io, "dtypes differ"),
    "manifest not UTF-8": (manifest_not_utf8, "not UTF-8"),
    "manifest nested 100000 deep": (manifest_deeply_nested, "nests deeper"),
    "manifest with malformed fields": (manifest_bad_types, "malformed profile"),
    "manifest with an unknown backend": (manifest_unknown_backend, "backend 'openvino'"),
    "manifest symlinked to elsewhere": (manifest_symlink_out, "outside the unit"),
}


def assert_clean_failure(result: subprocess.CompletedProcess, code: int, fragment: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr[-3000:]
    assert fragment in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("pimoe-export")]
    assert len(errors) == 1, result.stderr[-2000:]


@pytest.mark.parametrize("case", list(UNIT_CASES))
def test_bad_units_are_refused_by_every_reader(world, case) -> None:
    corrupt, fragment = UNIT_CASES[case]
    corrupt(world)
    unit = str(world.unit)
    assert_clean_failure(cli("check", "tiny", "--unit", unit, "--no-plots", cwd=world.root), EXIT_BAD_INPUT, fragment)
    assert_clean_failure(cli("triton", unit, "-o", "repo", cwd=world.root), EXIT_BAD_INPUT, fragment)
    assert not (world.root / "repo" / "w_unit").exists()  # nothing half-written
    inspect = cli("inspect", unit, cwd=world.root)
    assert inspect.returncode == EXIT_BAD_INPUT and "Traceback" not in inspect.stderr
    assert fragment in inspect.stdout + inspect.stderr
    with pytest.raises(ArtifactError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        from pimoe_export.runtime.engine import Engine

        Engine.load(world.unit)
    assert (world.root.parent / "victim.txt").read_text() == "user data"


def test_check_unit_runs_what_the_unit_ships(world) -> None:
    """A valid unit passes; its own library is the one that ran (the report names it)."""
    result = cli("check", "tiny", "--unit", str(world.unit), "--no-plots", cwd=world.root)
    assert result.returncode == 0, result.stderr
    report = json.loads((world.unit / "report" / "report.json").read_text())
    assert report["passed"] and Path(report["environment"]["library"]).resolve() == \
        (world.unit / "libpimoe_ort.so").resolve()


def test_triton_never_writes_outside_its_repository(world) -> None:
    victim = world.root.parent / "victim.txt"
    edit_manifest(world.unit, lambda d: artifact(d, "ort_library").update(file="../../victim.txt"))
    assert_clean_failure(cli("triton", str(world.unit), "-o", "repo", cwd=world.root), EXIT_BAD_INPUT,
                         "outside the unit")
    assert victim.read_text() == "user data" and not os.access(victim, os.X_OK)


# ------------------------------------------------------------------------------------------ checkpoints, ONNX, data
def checkpoint_scalar_bias(w: World) -> None:
    from safetensors.torch import load_file, save_file

    weights = w.model / "model.safetensors"
    state = load_file(str(weights))
    state["router.selection_bias"] = torch.tensor(0.5)
    save_file(state, str(weights))
    config = json.loads((w.model / "config.json").read_text())
    config["weights_sha256"] = sha256_file(weights)
    (w.model / "config.json").write_text(json.dumps(config))


def checkpoint_huge(w: World) -> None:
    config = json.loads((w.model / "config.json").read_text())
    config["config"].update(hidden_size=1_000_000, intermediate_size=4_000_000)
    (w.model / "config.json").write_text(json.dumps(config))


def checkpoint_not_json(w: World) -> None:
    (w.model / "config.json").write_text("{ not json")


def onnx_k_zero(w: World) -> None:
    import onnx

    proto = onnx.load(str(w.onnx))
    for node in proto.graph.node:
        if node.op_type == "PiMoERoute":
            next(a for a in node.attribute if a.name == "k").i = 0
    onnx.save(proto, str(w.onnx))


def onnx_foreign_domain(w: World) -> None:
    import onnx

    proto = onnx.load(str(w.onnx))
    next(n for n in proto.graph.node if n.op_type == "PiMoERoute").domain = "com.example"
    proto.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    onnx.save(proto, str(w.onnx))


def _edit_graph(w: World, change: Callable) -> None:
    import onnx

    proto = onnx.load(str(w.onnx))
    change(proto)
    onnx.save(proto, str(w.onnx))


def onnx_v2_attribute_in_v1_graph(w: World) -> None:
    """A contract-v2 attribute in a graph that imports pimoe opset 1."""
    import onnx

    def change(proto) -> None:
        next(o for o in proto.opset_import if o.domain == "pimoe").version = 1
        combine = next(n for n in proto.graph.node if n.op_type == "PiMoECombine")
        combine.attribute.append(onnx.helper.make_attribute("order", "expert"))
    _edit_graph(w, change)


def onnx_future_opset(w: World) -> None:
    _edit_graph(w, lambda proto: setattr(next(o for o in proto.opset_import if o.domain == "pimoe"), "version", 3))


def onnx_groups_not_dividing_e(w: World) -> None:
    import onnx

    def change(proto) -> None:
        route = next(n for n in proto.graph.node if n.op_type == "PiMoERoute")
        route.attribute.extend([onnx.helper.make_attribute("num_groups", 3),
                                onnx.helper.make_attribute("groups_kept", 2)])
    _edit_graph(w, change)


def onnx_garbage(w: World) -> None:
    w.onnx.write_bytes(os.urandom(4096))


def calibration(name: str, make: Callable[[Path], None]) -> Callable[[World], None]:
    def write(w: World) -> None:
        make(w.root / name)
    return write


def npy_strings(path: Path) -> None:
    np.save(path, np.array([["a", "b"]]))


def npz_corrupt(path: Path) -> None:
    path.write_bytes(b"PK\x03\x04 not a zip")


def npy_nan(path: Path) -> None:
    x = np.zeros((4, 16), np.float32)
    x[1, 2] = np.nan
    np.save(path, x)


def npy_wrong_width(path: Path) -> None:
    np.save(path, np.zeros((4, 7), np.float32))


def nothing(w: World) -> None:
    pass


def user_file(name: str) -> Callable[[World], None]:
    def write(w: World) -> None:
        (w.root / "mywork").mkdir(exist_ok=True)
        (w.root / "mywork" / name).write_text("the user's own")
    return write


#: where `quantize -o mywork/model.int8.onnx` (no --onnx) writes the fp32 export it needs: next to the output
FP32_COMPANION = default_fp32_path(Path("model.int8.onnx")).name

CLI_CASES = [
    # (id, setup, arguments, exit code, message fragment)
    ("scalar selection_bias in a checkpoint", checkpoint_scalar_bias, ["export", "tiny", "-o", "x.onnx"],
     EXIT_BAD_INPUT, "router.selection_bias ()"),
    ("config of a multi-TB model", checkpoint_huge, ["export", "tiny", "-o", "x.onnx"], EXIT_BAD_INPUT,
     "beyond the op contract"),
    ("checkpoint config not JSON", checkpoint_not_json, ["info", "tiny"], EXIT_BAD_INPUT, "not valid JSON"),
    ("graph with k = 0", onnx_k_zero, ["check", "tiny", "--onnx", "tiny.onnx"], EXIT_BAD_INPUT,
     "attribute k must be >= 1"),
    ("PiMoERoute in an unknown domain", onnx_foreign_domain, ["build", "tiny.onnx", "-o", "engine"], EXIT_BAD_INPUT,
     "not 'pimoe'"),
    ("PiMoERoute in an unknown domain (package)", onnx_foreign_domain, ["package", "tiny.onnx", "-o", "u2"],
     EXIT_BAD_INPUT, "not 'pimoe'"),
    ("ONNX file of random bytes", onnx_garbage, ["check", "tiny", "--onnx", "tiny.onnx"], EXIT_BAD_INPUT,
     "not a readable ONNX model"),
    ("contract-v2 attribute in a pimoe-opset-1 graph", onnx_v2_attribute_in_v1_graph,
     ["check", "tiny", "--onnx", "tiny.onnx"], EXIT_BAD_INPUT, "needs pimoe opset 2"),
    ("graph of a newer pimoe opset", onnx_future_opset, ["package", "tiny.onnx", "-o", "u2"], EXIT_BAD_INPUT,
     "newer than this package"),
    ("route groups that do not divide E", onnx_groups_not_dividing_e, ["build", "tiny.onnx", "-o", "engine"],
     EXIT_BAD_INPUT, "does not divide"),
    ("calibration array of strings", calibration("c.npy", npy_strings),
     ["quantize", "tiny", "-o", "q.onnx", "--calib", "c.npy"], EXIT_BAD_INPUT, "must hold numbers"),
    ("calibration .npz that is no zip", calibration("c.npz", npz_corrupt),
     ["quantize", "tiny", "-o", "q.onnx", "--calib", "c.npz"], EXIT_BAD_INPUT, "cannot be read as .npz"),
    ("calibration data with NaN", calibration("c.npy", npy_nan),
     ["quantize", "tiny", "-o", "q.onnx", "--calib", "c.npy"], EXIT_BAD_INPUT, "NaN or Inf"),
    ("calibration data of the wrong width", calibration("c.npy", npy_wrong_width),
     ["quantize", "tiny", "-o", "q.onnx", "--calib", "c.npy"], EXIT_BAD_INPUT, "must be [N, 16]"),
    ("negative percentile", nothing, ["quantize", "tiny", "-o", "q.onnx", "--method", "percentile",
                                      "--percentile", "-5"], EXIT_BAD_INPUT, "--percentile"),
    ("smooth-alpha nan", nothing, ["quantize", "tiny", "-o", "q.onnx", "--smooth-alpha", "nan"], EXIT_BAD_INPUT,
     "--smooth-alpha"),
    ("shapes 0x4", nothing, ["check", "tiny", "--onnx", "tiny.onnx", "--shapes", "0x4"], EXIT_BAD_INPUT,
     "--shapes"),
    ("negative seed", nothing, ["create", "--preset", "tiny", "-o", "t2", "--seed", "-1"], EXIT_BAD_INPUT, "--seed"),
    ("zero Triton instances", nothing, ["triton", "unit", "-o", "repo", "--instances", "0"], EXIT_BAD_INPUT,
     "--instances"),
    ("output path under a file", nothing, ["export", "tiny", "-o", "tiny.onnx/inner.onnx"], EXIT_BAD_INPUT,
     "not a directory"),
    ("output in an unwritable place", nothing, ["export", "tiny", "-o", "/proc/pimoe/x.onnx"], EXIT_BAD_INPUT,
     "cannot create the output directory"),
    ("export over the user's file", user_file("model.onnx"), ["export", "tiny", "-o", "mywork/model.onnx"],
     EXIT_BAD_INPUT, "was not written by pimoe-export"),
    ("export over the user's model.onnx.data", user_file("model.onnx.data"),
     ["export", "tiny", "-o", "mywork/model.onnx"], EXIT_BAD_INPUT,
     "model.onnx.data exists and was not written by pimoe-export"),
    ("quantize over the user's file where its fp32 export goes", user_file(FP32_COMPANION),
     ["quantize", "tiny", "-o", "mywork/model.int8.onnx"], EXIT_BAD_INPUT,
     f"{FP32_COMPANION} exists and was not written by pimoe-export"),
    ("pipeline over the user's model.onnx", user_file("model.onnx"),
     ["pipeline", "--model", "tiny", "-o", "mywork", "--quiet"], EXIT_BAD_INPUT, "was not written by pimoe-export"),
    ("check report over the user's report", user_file("report.md"),
     ["check", "tiny", "--onnx", "tiny.onnx", "-o", "mywork", "--no-plots"], EXIT_BAD_INPUT,
     "was not written by pimoe-export"),
    ("missing checkpoint", nothing, ["pipeline", "--model", "nope", "-o", "out", "--quiet"], EXIT_BAD_INPUT,
     "config.json is missing"),
]


@pytest.mark.parametrize(("setup", "args", "code", "fragment"), [c[1:] for c in CLI_CASES],
                         ids=[c[0] for c in CLI_CASES])
def test_bad_input_gives_one_clear_error(world, setup, args, code, fragment) -> None:
    setup(world)
    before = {p: p.stat().st_mtime_ns for p in world.root.parent.rglob("*") if p.is_file()}
    result = cli(*args, cwd=world.root)
    if result.returncode == 2 and fragment.startswith("--"):  # argparse: usage line + one error line
        assert fragment in result.stderr and "Traceback" not in result.stderr, result.stderr
        return
    assert_clean_failure(result, code, fragment)
    changed = [p for p, mtime in before.items() if p.exists() and p.stat().st_mtime_ns != mtime
               and ".pimoe-export-outputs" not in p.name]
    assert not changed, changed  # a refused command changed no existing file
    user = world.root / "mywork"
    for path in user.glob("*") if user.is_dir() else []:
        if not path.name.startswith("."):
            assert path.read_text() == "the user's own"


def test_force_replaces_the_users_file(world) -> None:
    user_file("model.onnx")(world)
    result = cli("export", "tiny", "-o", "mywork/model.onnx", "--force", cwd=world.root)
    assert result.returncode == 0, result.stderr
    assert (world.root / "mywork" / "model.onnx").read_bytes()[:4] != b"the "


# ------------------------------------------------------------------------------------------ interruption
def test_interrupted_pipeline_is_never_reported_as_passed_and_reruns(world) -> None:
    out = world.root / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pimoe_export.cli", "pipeline", "--model", "tiny", "-o", str(out),
                             "--bench-repeats", "2"], cwd=world.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 240
    assert proc.stdout is not None
    for line in proc.stdout:  # stop it in the middle: during the INT8 step
        if "[3/8] int8" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert "Traceback" not in err
    record = json.loads((out / "pipeline.json").read_text())
    assert record["status"] == "interrupted" and record["passed"] is False
    rerun = cli("pipeline", "--model", "tiny", "-o", str(out), "--bench-repeats", "2", "--quiet", cwd=world.root)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    record = json.loads((out / "pipeline.json").read_text())
    assert record["status"] == "finished" and record["passed"] is True


# ------------------------------------------------------------------------------------------ runtime inputs (API)
def test_runtime_inputs_are_checked_before_anything_is_copied(world) -> None:
    from pimoe_export.runtime.engine import Engine

    with Engine.load(world.unit) as engine:
        huge = np.broadcast_to(np.zeros(1, np.float32), (300_000, 9000, 16))  # 172 GB if it were copied
        with pytest.raises(PiMoEInputError, match="outside this unit's profile"):
            engine.run(huge)
        with pytest.raises(PiMoEInputError, match="must be"):
            engine.run(np.zeros((2, 3, 15), np.float32))
        with pytest.raises(PiMoEInputError, match="takes float32 input, got float64"):
            engine.run(np.zeros((2, 3, 16)))
        with pytest.raises(PiMoEInputError, match="takes the inputs"):
            engine.run_named({"x": np.zeros((2, 3, 16), np.float32)})
