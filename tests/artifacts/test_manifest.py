"""Units as untrusted input: verify() checks every artefact of every backend against the unit's own file hashes,
refuses a manifest that leaves out an artefact its backend needs or misdescribes the ONNX it ships (names swapped
between two outputs of one dtype, a dtype, a dimension), and the ONNX Runtime Engine registers the op library the
unit ships, not one found elsewhere.

References are independent of the package: hashlib over the files, the ONNX graph's own inputs and outputs, and the
process's memory map (/proc/self/maps) for the library ONNX Runtime loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from pimoe_export.artifacts.manifest import REQUIRED_ROLES, Artifact, Manifest, read_manifest, verify
from pimoe_export.build.units import package_ort
from pimoe_export.errors import ArtifactError, PluginLoadError
from pimoe_export.interface import INT32_LIMIT, Profile
from pimoe_export.runtime.engine import Engine

ENGINE_BACKENDS = ("tensorrt", "tensorrt-rtx")
#: the file each role has in a unit (build.units writes these names)
FILES = {"onnx": "model.onnx", "ort_library": "libpimoe_ort.so", "engine": "model.engine",
         "plugin_library": "libpimoe_trt_plugins.so"}


@pytest.fixture(scope="module")
def ort_unit_template(exported_layer, tmp_path_factory) -> Path:
    _, onnx_path = exported_layer("tiny", 5)
    unit = tmp_path_factory.mktemp("units") / "ort"
    try:
        package_ort(onnx_path, unit, profile=Profile((1, 1), (1, 8), (4, 64)))
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")
    return unit


def make_unit(template: Path, where: Path, backend: str) -> Path:
    """A copy of the ONNX Runtime unit, or an engine unit made from it: the same ONNX, an engine and a plugin
    library of arbitrary bytes (verify never loads them: it checks containment and hashes)."""
    unit = where / backend
    shutil.copytree(template, unit)
    if backend != "onnxruntime":
        (unit / "libpimoe_ort.so").unlink()
        (unit / FILES["engine"]).write_bytes(os.urandom(4096))
        (unit / FILES["plugin_library"]).write_bytes(os.urandom(3000))
        manifest = read_manifest(unit)
        manifest.backend = backend
        manifest.backend_version = "11.4.0"
        manifest.artifacts = [Artifact.of(role, unit / FILES[role]) for role in REQUIRED_ROLES[backend]]
        manifest.write(unit)
    return unit


def edit_manifest(unit: Path, change) -> None:
    data = json.loads((unit / "manifest.json").read_text())
    change(data)
    (unit / "manifest.json").write_text(json.dumps(data))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


BACKEND_ROLES = [(backend, role) for backend in ("onnxruntime", *ENGINE_BACKENDS) for role in REQUIRED_ROLES[backend]]


# ------------------------------------------------------------------------------------------ hashes
@pytest.mark.parametrize("backend", ["onnxruntime", *ENGINE_BACKENDS])
def test_verify_returns_each_artifact_with_the_hash_of_its_own_file(ort_unit_template, tmp_path, backend) -> None:
    unit = make_unit(ort_unit_template, tmp_path, backend)
    verified = verify(unit)
    assert set(verified.files) == set(REQUIRED_ROLES[backend])
    recorded = {a["role"]: a for a in json.loads((unit / "manifest.json").read_text())["artifacts"]}
    for role, path in verified.files.items():
        assert path == (unit / FILES[role]).resolve()
        assert recorded[role]["sha256"] == sha256(path) and recorded[role]["bytes"] == path.stat().st_size


@pytest.mark.parametrize(("backend", "role"), BACKEND_ROLES)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_one_changed_byte_in_any_artifact_is_refused(ort_unit_template, tmp_path, backend, role, where) -> None:
    """Same size, one bit different, at the start, the middle or the end: only the hash can tell."""
    unit = make_unit(ort_unit_template, tmp_path, backend)
    path = unit / FILES[role]
    data = bytearray(path.read_bytes())
    data[{"first": 0, "middle": len(data) // 2, "last": -1}[where]] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{FILES[role]} does not match its manifest sha256 \({role}"):
        verify(unit)


@pytest.mark.parametrize(("backend", "role"), BACKEND_ROLES)
def test_a_recorded_hash_or_size_that_is_not_the_files_is_refused(ort_unit_template, tmp_path, backend,
                                                                  role) -> None:
    """The file is intact; the manifest's record of it is not (another sha256 of the right form, or one byte off
    in the size): the file does not match its record."""
    unit = make_unit(ort_unit_template, tmp_path, backend)
    for change in ("sha256", "bytes"):
        copy = tmp_path / f"{backend}-{role}-{change}"
        shutil.copytree(unit, copy)

        def wrong(data, change=change):
            entry = next(a for a in data["artifacts"] if a["role"] == role)
            entry[change] = hashlib.sha256(b"another file").hexdigest() if change == "sha256" else entry[change] + 1
        edit_manifest(copy, wrong)
        with pytest.raises(ArtifactError, match="does not match its manifest sha256"):
            verify(copy)


# ------------------------------------------------------------------------------------------ required artefacts
@pytest.mark.parametrize(("backend", "role"), BACKEND_ROLES)
def test_a_manifest_that_omits_an_artifact_its_backend_needs_is_refused(ort_unit_template, tmp_path, backend,
                                                                         role) -> None:
    unit = make_unit(ort_unit_template, tmp_path, backend)
    edit_manifest(unit, lambda data: data.update(artifacts=[a for a in data["artifacts"] if a["role"] != role]))
    with pytest.raises(ArtifactError, match=rf"this {backend} unit lists no \['{role}'\] artefact"):
        verify(unit)
    if backend == "onnxruntime":
        with pytest.raises(ArtifactError, match=rf"lists no \['{role}'\] artefact"):
            Engine.load(unit)


def test_the_required_artifacts_of_each_backend() -> None:
    """What each backend loads: ONNX Runtime the graph and its op library; TensorRT the engine, the plugins and the
    source graph (the manifest is checked against it)."""
    assert {k: set(v) for k, v in REQUIRED_ROLES.items()} == {
        "onnxruntime": {"onnx", "ort_library"},
        "tensorrt": {"engine", "plugin_library", "onnx"},
        "tensorrt-rtx": {"engine", "plugin_library", "onnx"},
    }


def test_an_artifact_listed_twice_is_refused(ort_unit_template, tmp_path) -> None:
    unit = make_unit(ort_unit_template, tmp_path, "onnxruntime")
    edit_manifest(unit, lambda data: data["artifacts"].append(dict(data["artifacts"][0])))
    with pytest.raises(ArtifactError, match="an artefact role is listed twice"):
        verify(unit)


# ------------------------------------------------------------------------------------------ manifest vs ONNX
def swap_names(entries: list, a: str, b: str) -> None:
    for entry in entries:
        entry[0] = {a: b, b: a}.get(entry[0], entry[0])


def test_the_manifest_interface_is_the_onnx_graphs(ort_unit_template) -> None:
    import onnx

    manifest = read_manifest(ort_unit_template)
    proto = onnx.load(str(ort_unit_template / "model.onnx"))
    graph_inputs = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    assert list(manifest.interface.input_names) == graph_inputs
    assert list(manifest.interface.output_names) == [o.name for o in proto.graph.output]


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_swapped_names_of_two_float32_outputs_are_refused(ort_unit_template, tmp_path, backend) -> None:
    """output and expert_weights are both float32: swapping their names keeps every dtype right, and only the
    order of the names against the ONNX's outputs tells."""
    unit = make_unit(ort_unit_template, tmp_path, backend)
    outputs = json.loads((unit / "manifest.json").read_text())["io"]["outputs"]
    assert {e[1] for e in outputs if e[0] in ("output", "expert_weights")} == {"float32"}
    edit_manifest(unit, lambda data: swap_names(data["io"]["outputs"], "output", "expert_weights"))
    with pytest.raises(ArtifactError, match=r"does not describe the ONNX it ships: its I/O .*differs"):
        verify(unit)


@pytest.mark.parametrize(("side", "index", "dtype"), [("inputs", 0, "float16"), ("outputs", 1, "int64"),
                                                      ("outputs", 2, "float16")])
def test_a_wrong_io_dtype_is_refused(ort_unit_template, tmp_path, side, index, dtype) -> None:
    unit = make_unit(ort_unit_template, tmp_path, "onnxruntime")
    edit_manifest(unit, lambda data: data["io"][side][index].__setitem__(1, dtype))
    with pytest.raises(ArtifactError, match="its I/O dtypes differ from the ONNX's"):
        verify(unit)


@pytest.mark.parametrize(("side", "index", "dims"), [("inputs", 0, ["batch", "sequence", 17]),
                                                     ("outputs", 0, ["batch", "sequence", 2]),
                                                     ("outputs", 2, ["batch", "sequence", 16]),
                                                     ("inputs", 0, ["sequence", "batch", 16])])
def test_wrong_io_dims_are_refused(ort_unit_template, tmp_path, side, index, dims) -> None:
    """The Engine checks inputs against the manifest's dims and Triton declares them: a manifest whose dims are not
    the ONNX's would refuse right inputs and accept wrong ones."""
    unit = make_unit(ort_unit_template, tmp_path, "onnxruntime")
    edit_manifest(unit, lambda data: data["io"][side][index].__setitem__(2, dims))
    with pytest.raises(ArtifactError, match="its I/O dims differ from the ONNX's"):
        verify(unit)


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("precision", "fp16", "its precision 'fp16' differs from the ONNX's 'fp32'"),
    ("config", {"hidden_size": 16}, "its config differs from the ONNX's pimoe.config"),
])
def test_a_manifest_that_misdescribes_the_graph_is_refused(ort_unit_template, tmp_path, key, value, fragment) -> None:
    unit = make_unit(ort_unit_template, tmp_path, "onnxruntime")
    edit_manifest(unit, lambda data: data.update({key: value}))
    with pytest.raises(ArtifactError) as info:
        verify(unit)
    # the one problem, whole, between the message's fixed parts
    assert f"{unit}: the manifest does not describe the ONNX it ships: {fragment}: " in str(info.value)


def test_the_token_limit_of_a_unit_follows_from_its_ops(exported_layer, ort_unit_template) -> None:
    """The most tokens one call may hold: every element count an op indexes stays below 2^31. tiny: E = 4, k = 2 and
    the widest expert layer 64 (the computation expert's 16 -> 64 -> 32 -> 16), so k x 64 = 128 elements a token."""
    model, _ = exported_layer("tiny", 5)
    widest = max(max(layer.in_features, layer.out_features) for expert in model.experts for layer in expert.layers)
    per_token = max(model.config.num_experts, model.config.top_k * widest)
    assert (widest, per_token) == (64, 128)
    assert verify(ort_unit_template).max_tokens == (INT32_LIMIT - 1) // per_token


# ------------------------------------------------------------------------------------------ versions
def test_onnxruntime_units_run_on_any_onnxruntime_version(ort_unit_template, tmp_path) -> None:
    """Engines are tied to the TensorRT that built them; an ONNX Runtime unit is not tied to the ORT version it was
    packaged with (the op library checks the C API itself)."""
    unit = make_unit(ort_unit_template, tmp_path, "onnxruntime")
    assert verify(unit, backend_version="0.0.1").backend == "onnxruntime"
    for backend in ENGINE_BACKENDS:
        engine_unit = make_unit(ort_unit_template, tmp_path / "e", backend)
        with pytest.raises(ArtifactError, match=rf"built with {backend} 11\.4\.0, this machine has 11\.4\.1"):
            verify(engine_unit, backend_version="11.4.1")
        assert verify(engine_unit, backend_version="11.4.0").backend == backend
        assert verify(engine_unit).backend == backend  # no version to compare against: nothing refused


# ------------------------------------------------------------------------------------------ the library loaded
def _mapped_libraries() -> set[str]:
    return {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
            if line.split()[-1].endswith(".so")}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc to see the libraries loaded")
def test_the_engine_registers_the_op_library_the_unit_ships(ort_unit_template, tmp_path, monkeypatch) -> None:
    """With $PIMOE_ORT_LIBRARY naming nothing, an Engine that looked for a library anywhere but in its unit fails;
    the unit's own copy is the library mapped into this process, and the results are the graph's."""
    unit = make_unit(ort_unit_template, tmp_path, "onnxruntime")
    shipped = str((unit / "libpimoe_ort.so").resolve())
    assert shipped not in _mapped_libraries()
    monkeypatch.setenv("PIMOE_ORT_LIBRARY", str(tmp_path / "no-such-library.so"))
    x = np.random.default_rng(3).standard_normal((2, 5, 16)).astype(np.float32)
    with Engine.load(unit) as engine:
        y, ids, weights = engine.run(x, routing=True)
    assert shipped in _mapped_libraries()
    assert y.shape == x.shape and ids.shape == weights.shape == (2, 5, 2)


def test_a_unit_whose_library_is_not_an_op_library_is_refused(ort_unit_template, tmp_path) -> None:
    """The library is the unit's: a unit shipping another shared object (its manifest rewritten to match) is
    refused when it is loaded, even though an intact op library exists in the build tree."""
    import ctypes.util

    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to stand in for a foreign library")
    found = next((Path(d) / libm for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64")
                  if (Path(d) / libm).is_file()), None)
    if found is None:
        pytest.skip(f"{libm} not found in the usual library folders")
    unit = make_unit(ort_unit_template, tmp_path, "onnxruntime")
    shutil.copyfile(found, unit / "libpimoe_ort.so")
    manifest = read_manifest(unit)
    manifest.artifacts = [a if a.role != "ort_library" else Artifact.of("ort_library", unit / "libpimoe_ort.so")
                          for a in manifest.artifacts]
    manifest.write(unit)
    assert verify(unit).files["ort_library"].stat().st_size == found.stat().st_size
    with pytest.raises(PluginLoadError, match="not a pimoe ONNX Runtime op library"):
        Engine.load(unit)


def test_manifest_round_trip_keeps_every_field(ort_unit_template) -> None:
    manifest = read_manifest(ort_unit_template)
    again = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert again == manifest


# ------------------------------------------------------------------------------------------ messages
# A refused unit's message names the unit, what is wrong and the command that rebuilds it (the user's fix).
def ort_hint(unit: Path) -> str:
    return f"re-create the unit: `pimoe-export package MODEL.onnx -o {unit} --force` (or `pimoe-export pipeline`)"


def engine_hint(unit: Path) -> str:
    return f"rebuild it: `pimoe-export build MODEL.onnx -o {unit} --force` on the target machine"


@pytest.mark.parametrize("backend", ["onnxruntime", *ENGINE_BACKENDS])
def test_every_refusal_ends_with_the_backends_rebuild_command(ort_unit_template, tmp_path, backend) -> None:
    unit = make_unit(ort_unit_template, tmp_path, backend)
    hint = ort_hint(unit) if backend == "onnxruntime" else engine_hint(unit)
    edit_manifest(unit, lambda data: data.update(precision="fp16"))
    with pytest.raises(ArtifactError) as info:
        verify(unit)
    assert str(info.value) == (f"{unit}: the manifest does not describe the ONNX it ships: its precision 'fp16' "
                               f"differs from the ONNX's 'fp32': {hint}")
    edit_manifest(unit, lambda data: data["artifacts"][0].update(file="../outside.bin"))
    (tmp_path / "outside.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError) as info:
        verify(unit)
    role = json.loads((unit / "manifest.json").read_text())["artifacts"][0]["role"]
    assert str(info.value).startswith(f"{unit}: manifest artefact {role!r} ('../outside.bin') resolves to ")
    assert str(info.value).endswith(f"outside the unit; a unit may only name files inside itself (no '..', no "
                                    f"symlinks to elsewhere): {hint}")


def test_the_messages_of_a_malformed_manifest(ort_unit_template, tmp_path) -> None:
    unit = make_unit(ort_unit_template, tmp_path, "onnxruntime")
    data = json.loads((unit / "manifest.json").read_text())
    cases = [
        ({**data, "colour": "red"}, "malformed manifest (unknown fields ['colour'], missing []); rebuild the unit"),
        ({k: v for k, v in data.items() if k not in ("backend", "config")},
         "malformed manifest (unknown fields [], missing ['backend', 'config']); rebuild the unit"),
        ({**data, "target_sms": "sm_89"}, "malformed manifest: target_sms must be a list of strings; rebuild the unit"),
        ({**data, "target_sms": [89]}, "malformed manifest: target_sms must be a list of strings; rebuild the unit"),
        ({**data, "host": [], "io": "x"},
         "malformed manifest: io must be an object; host must be an object; rebuild the unit"),
        ({**data, "backend": "tvm", "precision": "int4", "contract_version": "1", "created": 3},
         "malformed manifest: backend 'tvm' is not one of ('onnxruntime', 'tensorrt', 'tensorrt-rtx'); precision "
         "'int4' is not one of ('fp32', 'fp16', 'w8a8', 'w8a8_dynamic'); contract_version must be an integer; created "
         "must be a string; rebuild the unit"),
        ({**data, "artifacts": {}},
         "malformed manifest (artifacts must be a list, config an object); rebuild the unit"),
    ]
    for payload, message in cases:
        (unit / "manifest.json").write_text(json.dumps(payload))
        with pytest.raises(ArtifactError) as info:
            read_manifest(unit)
        assert str(info.value) == message, payload
    (unit / "manifest.json").write_text("{")
    with pytest.raises(ArtifactError) as info:
        read_manifest(unit)
    assert str(info.value).startswith(f"{unit / 'manifest.json'} is not valid JSON (")
    assert str(info.value).endswith("); the manifest is corrupt, rebuild the unit")
    (unit / "manifest.json").write_text(json.dumps({**data, "format": "other/2"}))
    with pytest.raises(ArtifactError) as info:
        read_manifest(unit)
    assert str(info.value) == (f"{unit / 'manifest.json'}: expected format 'pimoe-export-unit/1', found 'other/2'; "
                               "rebuild the unit")


def test_a_directory_that_is_no_unit(tmp_path) -> None:
    with pytest.raises(ArtifactError) as info:
        read_manifest(tmp_path)
    assert str(info.value) == (
        f"{tmp_path} is not a pimoe-export unit: manifest.json is missing. Create one with `pimoe-export build "
        f"MODEL.onnx -o {tmp_path}`, `pimoe-export package MODEL.onnx -o {tmp_path}` or `pimoe-export pipeline`")


def test_dims_of_unknown_size_are_shown_as_such(ort_unit_template, tmp_path) -> None:
    """A graph dimension with neither a size nor a name is shown as '?' when the manifest's rank differs."""
    import onnx

    unit = make_unit(ort_unit_template, tmp_path, "onnxruntime")
    proto = onnx.load(str(unit / "model.onnx"))
    proto.graph.output[2].type.tensor_type.shape.dim[1].Clear()
    onnx.save(proto, str(unit / "model.onnx"))
    manifest = read_manifest(unit)
    manifest.artifacts = [Artifact.of(a.role, unit / a.file) for a in manifest.artifacts]
    manifest.io["outputs"][2][2] = ["batch", "sequence"]
    manifest.write(unit)
    with pytest.raises(ArtifactError, match=re.escape("its I/O dims differ from the ONNX's (expert_weights: "
                                                      "['batch', 'sequence'] vs ['batch', '?', 2])")):
        verify(unit)
    manifest.io["outputs"][2][2] = ["batch", "sequence", 2]  # an unknown graph dim takes any named axis
    manifest.write(unit)
    assert verify(unit).interface.outputs[2].dims == ("batch", "sequence", 2)


def test_a_manifest_symlinked_to_elsewhere_is_refused(ort_unit_template, tmp_path) -> None:
    """The manifest itself is one of the unit's files: a manifest.json that links out of the unit (to a manifest
    that would verify) is refused, by read_manifest and so by every loader."""
    unit = make_unit(ort_unit_template, tmp_path, "onnxruntime")
    elsewhere = tmp_path / "elsewhere.json"
    shutil.move(unit / "manifest.json", elsewhere)
    (unit / "manifest.json").symlink_to(elsewhere)
    with pytest.raises(ArtifactError, match=r"the manifest \('manifest.json'\) resolves to .*outside the unit"):
        read_manifest(unit)
    with pytest.raises(ArtifactError, match="outside the unit"):
        Engine.load(unit)
    (unit / "manifest.json").unlink()
    shutil.copy(elsewhere, unit / "manifest.json")
    verify(unit)  # the same manifest inside the unit is fine
