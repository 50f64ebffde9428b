"""ONNX Runtime units as build.units.package_ort writes them (no TensorRT needed): what the manifest records of its
source, moving instead of copying the ONNX, and --force, which alone lets it replace files pimoe-export did not
write; and the environment Polygraphy gets for TensorRT-RTX."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from pimoe_export.artifacts.manifest import verify
from pimoe_export.build.polygraphy_rtx import polygraphy_environment
from pimoe_export.build.units import package_ort
from pimoe_export.errors import OutputError, PluginLoadError


@pytest.fixture
def onnx_copy(exported_layer, tmp_path) -> Path:
    _, path = exported_layer("tiny", 0)
    copy = tmp_path / "src" / "model.onnx"
    copy.parent.mkdir()
    shutil.copyfile(path, copy)
    return copy


def package(*args, **kwargs):
    try:
        return package_ort(*args, **kwargs)
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")


def test_the_manifest_records_its_source_and_the_unit_verifies(onnx_copy, tmp_path) -> None:
    source_hash = hashlib.sha256(onnx_copy.read_bytes()).hexdigest()
    manifest = package(onnx_copy, tmp_path / "unit")
    assert manifest.source_onnx_sha256 == source_hash
    saved = json.loads((tmp_path / "unit" / "manifest.json").read_text())
    assert saved["source_onnx_sha256"] == source_hash and saved["backend"] == "onnxruntime"
    assert saved["build_options"]["cpu_isa"] in ("avx2", "generic", "avx512")
    assert onnx_copy.exists()  # copied, not moved
    assert verify(tmp_path / "unit").files["onnx"].read_bytes() == onnx_copy.read_bytes()


def test_move_takes_the_onnx_instead_of_copying_it(onnx_copy, tmp_path) -> None:
    data = onnx_copy.read_bytes()
    package(onnx_copy, tmp_path / "unit", move=True)
    assert not onnx_copy.exists()
    assert (tmp_path / "unit" / "model.onnx").read_bytes() == data
    verify(tmp_path / "unit")


def test_only_force_replaces_the_users_files(onnx_copy, tmp_path) -> None:
    unit = tmp_path / "unit"
    unit.mkdir()
    (unit / "model.onnx").write_text("the user's own")
    with pytest.raises(OutputError, match=r"model\.onnx exists and was not written by pimoe-export"):
        package(onnx_copy, unit)
    assert (unit / "model.onnx").read_text() == "the user's own" and not (unit / "manifest.json").exists()
    package(onnx_copy, unit, force=True)
    verify(unit)
    package(onnx_copy, unit)  # its own files now: replaced without --force


def _written_entries(unit: Path) -> list[str]:
    from pimoe_export._files import OWNERSHIP_FILE

    return sorted(p.name for p in unit.iterdir() if p.name != OWNERSHIP_FILE)


def _refused_leaving_only_the_users_file(write, reference: Path, tmp_path: Path) -> None:
    """For each entry the unit command wrote in ``reference`` (the independent list: what a run into an empty folder
    writes), a folder holding only the user's file of that name is refused by ``write(folder)`` naming it, and is
    left holding only that file, unchanged: every entry is checked before any is claimed or written."""
    entries = _written_entries(reference)
    assert "manifest.json" in entries and "model.onnx" in entries
    for name in entries:
        folder = tmp_path / f"users-{name}"
        folder.mkdir()
        (folder / name).write_text("the user's own")
        with pytest.raises(OutputError, match=rf"{name.replace('.', '[.]')} exists and was not written by pimoe"):
            write(folder)
        assert [p.name for p in folder.iterdir()] == [name], name
        assert (folder / name).read_text() == "the user's own"


def test_package_checks_every_entry_before_writing_any(onnx_copy, tmp_path) -> None:
    package(onnx_copy, tmp_path / "reference")
    _refused_leaving_only_the_users_file(lambda folder: package(onnx_copy, folder), tmp_path / "reference", tmp_path)


def test_package_of_a_decoder_checks_its_client_files_before_writing_any(decoder_cases, tmp_path) -> None:
    """A decoder unit also gets the tokenizer and config files and genai_config.json: a user's file of any of those
    names is refused before anything is written too."""
    case = decoder_cases("mixtral")
    source = case.unit.parent / "model.onnx"

    def write(folder: Path) -> None:
        package(source, folder, client_dir=case.hf_dir)

    write(tmp_path / "reference")
    assert {"tokenizer.json", "genai_config.json", "config.json"} <= set(_written_entries(tmp_path / "reference"))
    _refused_leaving_only_the_users_file(write, tmp_path / "reference", tmp_path)


def test_polygraphy_gets_the_rtx_switches_and_the_folder_first(tmp_path) -> None:
    folder = tmp_path / "rtx"
    env = polygraphy_environment(folder, {"PYTHONPATH": "/a", "LD_LIBRARY_PATH": "/b:/c", "KEEP": "x"})
    assert env == {"PYTHONPATH": f"{folder}{os.pathsep}/a", "LD_LIBRARY_PATH": f"{folder}{os.pathsep}/b:/c",
                   "KEEP": "x", "POLYGRAPHY_USE_TENSORRT_RTX": "1", "PIMOE_TRT_STATIC_REGISTRATION": "1"}
    env = polygraphy_environment(folder, {"LD_LIBRARY_PATH": ""})
    assert env["PYTHONPATH"] == str(folder) and env["LD_LIBRARY_PATH"] == str(folder)
    assert polygraphy_environment(folder)["PATH"] == os.environ["PATH"]  # this process's environment by default


def test_a_unit_records_package_as_the_writer_of_its_files(onnx_copy, tmp_path) -> None:
    """README: the files pimoe-export writes are recorded in .pimoe-export-outputs.json with the command that wrote
    them; a unit's are the package command's."""
    from pimoe_export._files import OWNERSHIP_FILE

    package(onnx_copy, tmp_path / "unit")
    entries = json.loads((tmp_path / "unit" / OWNERSHIP_FILE).read_text())["entries"]
    assert set(entries) >= {"model.onnx", "libpimoe_ort.so", "manifest.json"}
    assert {entry["command"] for entry in entries.values()} == {"package"}


def test_rtx_targets_are_the_capabilities_as_sm_names() -> None:
    """TensorRT-RTX's ahead-of-time targets: SM89 / sm120 / Sm75 are sm_89 / sm_120 / sm_75, in the given order."""
    from pimoe_export.build.units import BuildOptions, _targets

    assert _targets("rtx", BuildOptions(), ("SM89", "sm120", "Sm75")) == ["sm_89", "sm_120", "sm_75"]


def test_no_builder_names_every_reason(monkeypatch) -> None:
    """With neither TensorRT nor TensorRT-RTX importable, the error carries both import problems."""
    from pimoe_export.build import units
    from pimoe_export.errors import BackendUnavailableError
    from pimoe_export.native import tensorrt_loader

    def missing(flavour: str):
        raise BackendUnavailableError(f"{flavour} is missing here")
    monkeypatch.setattr(tensorrt_loader, "import_tensorrt", missing)
    with pytest.raises(BackendUnavailableError) as info:
        units.detect_flavour()
    assert str(info.value) == ("no TensorRT builder is installed: tensorrt is missing here | rtx is missing here")
    with pytest.raises(BackendUnavailableError, match=r"^no TensorRT builder is installed: rtx is missing here$"):
        units.detect_flavour("rtx")


class _FakeConfig:
    """What _configure touches of TensorRT's IBuilderConfig (set_timing_cache takes ignore_mismatch, no default)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def create_timing_cache(self, data: bytes):
        self.calls.append(("create", data))
        return _FakeCache()

    def set_timing_cache(self, cache, ignore_mismatch) -> bool:
        self.calls.append(("set", ignore_mismatch))
        return True


class _FakeCache:
    def serialize(self) -> bytes:
        return b"timing"


@pytest.mark.parametrize(("flavour", "backend"), [("rtx", "tensorrt-rtx"), ("tensorrt", "tensorrt")])
def test_an_engine_unit_records_its_backend_artifacts_and_build(flavour, backend, onnx_copy, tmp_path,
                                                                monkeypatch) -> None:
    """build_unit around a stand-in engine builder (no TensorRT build here): the manifest names the flavour's
    backend and the engine, ONNX and plugin library by role; the build is strongly typed; a full-TensorRT timing
    cache is loaded strictly (ignore_mismatch False), saved, and recorded as used."""
    import types

    from pimoe_export.build import engine_builder, units
    from pimoe_export.native import libraries, tensorrt_loader

    try:
        libraries.check_plugin_library(str(libraries.find_plugin_library()))
    except PluginLoadError as exc:
        pytest.skip(f"the TensorRT plugin library is not built: {exc}")
    seen: dict = {}
    config = _FakeConfig()

    def build_engine(onnx_path, plugin, profile, capabilities, *, strongly_typed, flavour, configure):
        seen.update(strongly_typed=strongly_typed, flavour=flavour, capabilities=list(capabilities))
        configure(None, None, config)
        return b"plan", types.SimpleNamespace(plugin_counts=lambda: {"PiMoERoute": 1}, num_layers=7)

    monkeypatch.setattr(tensorrt_loader, "import_tensorrt", lambda f: types.SimpleNamespace(__version__="10.0"))
    monkeypatch.setattr(engine_builder, "build_engine", build_engine)
    monkeypatch.setattr(engine_builder, "compute_capability", lambda trt, name: (8, 9))
    cache = tmp_path / "timing.cache"
    options = units.BuildOptions(flavour=flavour, compute_capabilities=("SM89",), timing_cache=str(cache))
    manifest = units.build_unit(onnx_copy, tmp_path / "unit", options=options)
    assert manifest.backend == backend
    assert [(a.role, a.file) for a in manifest.artifacts] == [("engine", "model.engine"), ("onnx", "model.onnx"),
                                                          ("plugin_library", "libpimoe_trt_plugins.so")]
    assert (tmp_path / "unit" / "model.engine").read_bytes() == b"plan"
    assert seen["strongly_typed"] is True and manifest.build_options["strongly_typed"] is True
    assert seen["flavour"] == flavour and manifest.build_options["layers"] == 7
    # the model config is the graph's own (its pimoe.config metadata); one profile, so no list of several
    import json

    import onnx

    from pimoe_export.artifacts.manifest import read_manifest
    from pimoe_export.interface import META_CONFIG

    graph_config = json.loads({p.key: p.value for p in onnx.load(onnx_copy).metadata_props}[META_CONFIG])
    saved = read_manifest(tmp_path / "unit")
    assert manifest.config == graph_config == saved.config and graph_config["num_experts"] > 0
    assert manifest.profiles == [] == saved.profiles and saved.profile == options.profile
    # provenance: the ONNX it was built from (its own bytes' hash), and the build command as the files' writer
    from pimoe_export._files import OWNERSHIP_FILE

    assert saved.source_onnx_sha256 == hashlib.sha256(onnx_copy.read_bytes()).hexdigest()
    entries = json.loads((tmp_path / "unit" / OWNERSHIP_FILE).read_text())["entries"]
    assert set(entries) >= {"model.engine", "model.onnx", "manifest.json"}
    assert {entry["command"] for entry in entries.values()} == {"build"}
    if flavour == "tensorrt":
        assert config.calls == [("create", b""), ("set", False)]
        assert manifest.build_options["timing_cache_used"] is True and cache.read_bytes() == b"timing"
    else:  # TensorRT-RTX has no tactic timing: the cache is left alone
        assert config.calls == [] and manifest.build_options["timing_cache_used"] is False and not cache.exists()
        assert manifest.target_sms == ["sm_89"] and seen["capabilities"] == ["SM89"]


def test_build_checks_every_entry_before_the_build_and_before_writing_any(onnx_copy, tmp_path,
                                                                           monkeypatch) -> None:
    """build_unit (stand-in builder): a user's file of any name the unit gets (engine, graph, plugin library,
    manifest) is refused before the engine is built and before anything is written."""
    import types

    from pimoe_export.build import engine_builder, units
    from pimoe_export.native import libraries, tensorrt_loader

    try:
        libraries.check_plugin_library(str(libraries.find_plugin_library()))
    except PluginLoadError as exc:
        pytest.skip(f"the TensorRT plugin library is not built: {exc}")
    builds: list[Path] = []

    def build_engine(onnx_path, plugin, profile, capabilities, *, strongly_typed, flavour, configure):
        builds.append(onnx_path)
        return b"plan", types.SimpleNamespace(plugin_counts=lambda: {"PiMoERoute": 1}, num_layers=7)

    monkeypatch.setattr(tensorrt_loader, "import_tensorrt", lambda f: types.SimpleNamespace(__version__="10.0"))
    monkeypatch.setattr(engine_builder, "build_engine", build_engine)
    monkeypatch.setattr(engine_builder, "compute_capability", lambda trt, name: (8, 9))
    options = units.BuildOptions(flavour="rtx", compute_capabilities=("SM89",))
    units.build_unit(onnx_copy, tmp_path / "reference", options=options)
    assert "model.engine" in _written_entries(tmp_path / "reference") and len(builds) == 1
    _refused_leaving_only_the_users_file(lambda folder: units.build_unit(onnx_copy, folder, options=options),
                                         tmp_path / "reference", tmp_path)
    assert len(builds) == 1  # no refused run built an engine


def test_an_unknown_rtx_target_lists_the_ones_this_builder_has() -> None:
    import types

    from pimoe_export.build.engine_builder import compute_capability
    from pimoe_export.errors import PiMoEInputError

    trt = types.SimpleNamespace(ComputeCapability=types.SimpleNamespace(SM89=89, SM120=120, SM75=75, CURRENT=0))
    assert compute_capability(trt, "SM120") == 120
    with pytest.raises(PiMoEInputError) as info:
        compute_capability(trt, "SM90")
    assert str(info.value) == ("unknown compute capability 'SM90'; this TensorRT-RTX builds for ['SM120', 'SM75', "
                               "'SM89'] (choose from them with --sm)")


class _RecordingConfig(_FakeConfig):
    """_FakeConfig with the builder-config fields `pimoe-export build`'s flags set: TensorRT's defaults until set,
    and every set_flag call recorded."""

    builder_optimization_level = 3  # TensorRT's default
    hardware_compatibility_level = "NONE"

    def set_flag(self, flag) -> None:
        self.calls.append(("flag", flag))


#: the TensorRT names _configure reads (sentinels: each is only ever passed on)
_FAKE_TRT = SimpleNamespace(BuilderFlag=SimpleNamespace(VERSION_COMPATIBLE="VERSION_COMPATIBLE"),
                            HardwareCompatibilityLevel=SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS"))


def test_the_build_flags_reach_tensorrts_builder_config(tmp_path) -> None:
    """build --help: "--opt-level  builder optimisation level 0..5", "--timing-cache  timing cache file: loaded if
    present, saved after the build", "--version-compatible  (TensorRT) version-compatible engine",
    "--hardware-compatible  (TensorRT) Ampere+ compatible engine": each one reaches the builder config."""
    from pimoe_export.build.units import BuildOptions, _configure

    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")  # an existing cache: its bytes are loaded
    options = BuildOptions(optimization_level=4, timing_cache=str(cache), version_compatible=True,
                           hardware_compatible=True)
    config, holder = _RecordingConfig(), {}
    _configure(options, "tensorrt", holder)(_FAKE_TRT, None, config)
    assert config.builder_optimization_level == 4
    assert config.calls[:2] == [("create", b"old"), ("set", False)] and "cache" in holder
    assert [call for call in config.calls if call[0] == "flag"] == [("flag", "VERSION_COMPATIBLE")]
    assert config.hardware_compatibility_level == "AMPERE_PLUS"
    # each flag alone sets only its own field
    config = _RecordingConfig()
    _configure(BuildOptions(hardware_compatible=True), "tensorrt", {})(_FAKE_TRT, None, config)
    assert config.calls == [] and config.hardware_compatibility_level == "AMPERE_PLUS"
    assert config.builder_optimization_level == 3
    config = _RecordingConfig()
    _configure(BuildOptions(version_compatible=True, optimization_level=0), "tensorrt", {})(_FAKE_TRT, None, config)
    assert config.calls == [("flag", "VERSION_COMPATIBLE")] and config.hardware_compatibility_level == "NONE"
    assert config.builder_optimization_level == 0


@pytest.mark.parametrize("flavour", ["tensorrt", "rtx"])
def test_without_the_build_flags_the_builder_config_keeps_tensorrts_defaults(flavour, tmp_path) -> None:
    """No flag: TensorRT's defaults stay. TensorRT-RTX: the optimisation level is set, the full-TensorRT options are
    not (RTX has no timing cache, version or hardware compatibility)."""
    from pimoe_export.build.units import BuildOptions, _configure

    config = _RecordingConfig()
    _configure(BuildOptions(), flavour, {})(_FAKE_TRT, None, config)
    assert config.calls == [] and config.builder_optimization_level == 3
    assert config.hardware_compatibility_level == "NONE"
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    options = BuildOptions(optimization_level=5, timing_cache=str(cache), version_compatible=True,
                           hardware_compatible=True)
    config = _RecordingConfig()
    _configure(options, "rtx", {})(_FAKE_TRT, None, config)
    assert config.calls == [] and config.hardware_compatibility_level == "NONE"
    assert config.builder_optimization_level == 5


def test_a_hardware_compatible_engine_targets_every_architecture_the_plugins_are_built_for(monkeypatch) -> None:
    """An Ampere+ compatible engine runs on any GPU the plugin library has code for: the architectures CMake builds
    it for by default (plugins/cmake/cuda_architectures.txt). Without the flag, only this machine's GPU (none: no
    target)."""
    from pimoe_export.build import units

    listed = (Path(__file__).parents[2] / "plugins" / "cmake" / "cuda_architectures.txt").read_text().strip()
    monkeypatch.setattr(units, "local_gpu_sm", lambda: "sm_89")
    assert units._targets("tensorrt", units.BuildOptions(hardware_compatible=True), ()) == [
        f"sm_{a}" for a in listed.split(";")]
    assert units._targets("tensorrt", units.BuildOptions(version_compatible=True), ()) == ["sm_89"]
    monkeypatch.setattr(units, "local_gpu_sm", lambda: None)
    assert units._targets("tensorrt", units.BuildOptions(), ()) == []


# ------------------------------------------------------------------------------------------ polygraphy_rtx
LIBRARY = "/built/libpimoe_trt_plugins.so"


@pytest.fixture
def plugin_library(monkeypatch) -> str:
    """polygraphy_rtx finds the built plugin library at LIBRARY (none need be built here)."""
    from pimoe_export.build import polygraphy_rtx

    monkeypatch.setattr(polygraphy_rtx, "find_plugin_library", lambda: Path(LIBRARY))
    monkeypatch.setattr(polygraphy_rtx, "check_plugin_library", lambda path: {"path": path})
    return LIBRARY


@pytest.mark.parametrize("base", [{"PYTHONPATH": "/elsewhere"}, {"LD_LIBRARY_PATH": "/a:/b"}],
                         ids=["pythonpath", "ld_library_path"])
def test_print_env_gives_shell_lines_that_set_up_polygraphys_environment(plugin_library, base, tmp_path) -> None:
    """docs/trt_plugins.md: `--print-env [FOLDER]` prints "the same set-up as shell lines, to run polygraphy
    yourself": run by bash over a user's environment, they set the two switches and put FOLDER first on PYTHONPATH
    and LD_LIBRARY_PATH (the user's entries kept after it, none added when the variable was unset), and the last
    line names the plugin library to pass."""
    import subprocess

    from pimoe_export.build.polygraphy_rtx import print_env

    folder = tmp_path / "rtx"
    lines = print_env(folder)
    assert lines[-1] == f"# and add: --plugins {plugin_library}"
    keys = ("POLYGRAPHY_USE_TENSORRT_RTX", "PIMOE_TRT_STATIC_REGISTRATION", "PYTHONPATH", "LD_LIBRARY_PATH")
    script = "\n".join([*lines, *(f'echo "{key}=${{{key}-unset}}"' for key in keys)])
    result = subprocess.run(["bash", "-c", script], env={"PATH": os.environ["PATH"], **base}, capture_output=True,
                            text=True, check=True, timeout=30)
    got = dict(line.split("=", 1) for line in result.stdout.splitlines())
    expected = {"POLYGRAPHY_USE_TENSORRT_RTX": "1", "PIMOE_TRT_STATIC_REGISTRATION": "1",
                "PYTHONPATH": f"{folder}:/elsewhere" if "PYTHONPATH" in base else str(folder),
                "LD_LIBRARY_PATH": f"{folder}:/a:/b" if "LD_LIBRARY_PATH" in base else str(folder)}
    assert got == expected
    assert {key: polygraphy_environment(folder, base)[key] for key in keys} == expected  # what the helper runs with


def test_print_env_uses_the_folder_it_is_given(plugin_library, monkeypatch, tmp_path, capsys) -> None:
    """`python -m pimoe_export.build.polygraphy_rtx --print-env FOLDER`: the set-up is made in FOLDER, and the lines
    name it."""
    from pimoe_export.build import polygraphy_rtx

    prepared: list[Path] = []
    monkeypatch.setattr(polygraphy_rtx, "prepare_folder", lambda folder: prepared.append(folder) or folder)
    folder = tmp_path / "mine"
    assert polygraphy_rtx.main(["--print-env", str(folder)]) == 0
    assert prepared == [folder]
    out = capsys.readouterr().out.splitlines()
    assert f"export PYTHONPATH={folder}${{PYTHONPATH:+:$PYTHONPATH}}" in out
    assert f"export LD_LIBRARY_PATH={folder}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}" in out
    assert out[-1] == f"# and add: --plugins {plugin_library}"


def test_polygraphy_gets_the_plugin_library_unless_the_arguments_name_one(plugin_library) -> None:
    """docs/trt_plugins.md: the helper "adds --plugins with the built libpimoe_trt_plugins.so, and runs Polygraphy
    with the remaining arguments": after them, for the commands that load a model (convert, run, inspect); a
    user's own --plugins is left alone (not doubled), and other commands (--version) get none."""
    from pimoe_export.build.polygraphy_rtx import polygraphy_command

    for command in ("convert", "run", "inspect"):
        argv = [command, "m.onnx", "-o", "m.engine"]
        assert polygraphy_command(argv)[1:] == [*argv, "--plugins", plugin_library]
    mine = ["convert", "m.onnx", "--plugins", "mine.so"]
    assert polygraphy_command(mine)[1:] == mine
    assert polygraphy_command(["--version"])[1:] == ["--version"]
    assert Path(polygraphy_command(["--version"])[0]).name == "polygraphy"


def _counting_parses(monkeypatch) -> list[str]:
    """Every onnx.load of the package from here on, by path."""
    import onnx

    parses: list[str] = []
    load = onnx.load

    def counted(f, *args, **kwargs):
        parses.append(str(f))
        return load(f, *args, **kwargs)

    monkeypatch.setattr(onnx, "load", counted)
    return parses


@pytest.mark.parametrize("move", [False, True])
def test_package_parses_the_source_graph_once(onnx_copy, tmp_path, monkeypatch, move) -> None:
    """Metadata, the contract check, the unit's entries, the move check and the copy all come from one parse of the
    source ONNX (a graph that keeps its weights inside takes seconds per parse near 2 GB)."""
    parses = _counting_parses(monkeypatch)
    package(onnx_copy, tmp_path / "unit", move=move)
    assert parses == [str(onnx_copy)]
    verify(tmp_path / "unit")


def test_build_parses_the_source_graph_once(onnx_copy, tmp_path, monkeypatch) -> None:
    import types

    from pimoe_export.build import engine_builder, units
    from pimoe_export.native import libraries, tensorrt_loader

    try:
        libraries.check_plugin_library(str(libraries.find_plugin_library()))
    except PluginLoadError as exc:
        pytest.skip(f"the TensorRT plugin library is not built: {exc}")
    monkeypatch.setattr(tensorrt_loader, "import_tensorrt", lambda f: types.SimpleNamespace(__version__="10.0"))
    monkeypatch.setattr(engine_builder, "build_engine", lambda *a, **k: (
        b"plan", types.SimpleNamespace(plugin_counts=lambda: {"PiMoERoute": 1}, num_layers=7)))
    monkeypatch.setattr(engine_builder, "compute_capability", lambda trt, name: (8, 9))
    parses = _counting_parses(monkeypatch)
    units.build_unit(onnx_copy, tmp_path / "unit", options=units.BuildOptions(flavour="rtx",
                                                                               compute_capabilities=("SM89",)))
    assert parses == [str(onnx_copy)]  # the (stand-in) builder parses it its own way
    assert (tmp_path / "unit" / "model.onnx").read_bytes() == onnx_copy.read_bytes()
