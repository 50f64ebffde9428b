"""Which compiled library pimoe-export finds, and whether it takes it: the environment variable first (a path that
does not exist is an error, never a silent fallback), then a packaged copy, then the build tree; each library is
checked with ctypes against this package's op-contract version. Also the GPU name parsing and the plugin registry
bookkeeping, with stand-ins for nvidia-smi and TensorRT's registry."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from pimoe_export.errors import BackendUnavailableError, PluginLoadError
from pimoe_export.native import devices, libraries, tensorrt_loader
from pimoe_export.ops import schema

BUILT = libraries.BUILD_TREE / libraries.ORT_LIBRARY_NAME


@pytest.fixture
def no_overrides(monkeypatch):
    for env in (libraries.ORT_LIBRARY_ENV, libraries.ORT_CUDA_LIBRARY_ENV, libraries.ORT_CUDA_EMU_LIBRARY_ENV,
                libraries.PLUGIN_LIBRARY_ENV, libraries.HARNESS_LIBRARY_ENV, libraries.EMU_HARNESS_LIBRARY_ENV):
        monkeypatch.delenv(env, raising=False)


def test_the_environment_variable_wins_and_must_name_a_file(monkeypatch, tmp_path, no_overrides) -> None:
    lib = tmp_path / "mine.so"
    lib.write_bytes(b"x")
    monkeypatch.setenv("PIMOE_ORT_LIBRARY", str(lib))
    assert libraries.find_ort_library() == lib
    monkeypatch.setenv("PIMOE_ORT_LIBRARY", str(tmp_path / "missing.so"))
    with pytest.raises(PluginLoadError, match=r"^PIMOE_ORT_LIBRARY=.*missing\.so does not exist; point it at a built "
                                              r"libpimoe_ort\.so or unset it$"):
        libraries.find_ort_library()
    tree = tmp_path / "tree"
    (tree / "build" / "plugins").mkdir(parents=True)
    (tree / "build" / "plugins" / "libpimoe_ort.so").write_bytes(b"built")
    monkeypatch.setattr(libraries, "_PACKAGED", tree / "_lib")
    monkeypatch.setattr(libraries, "BUILD_TREE", tree / "build" / "plugins")
    monkeypatch.setenv("PIMOE_ORT_LIBRARY", "")  # empty: as if unset
    assert libraries.find_ort_library() == tree / "build" / "plugins" / "libpimoe_ort.so"


NVCC = "needs nvcc: the TensorRT section of setup.sh builds"


@pytest.mark.parametrize(("find", "env", "name", "subdir", "how"), [
    (lambda: libraries.find_ort_library(), "PIMOE_ORT_LIBRARY", "libpimoe_ort.so", "",
     "it builds the ONNX Runtime op library with any C++17 compiler"),
    (lambda: libraries.find_ort_cuda_library(), "PIMOE_ORT_CUDA_LIBRARY", "libpimoe_ort_cuda.so", "",
     f"{NVCC} it when CUDA is installed"),
    (lambda: libraries.find_ort_cuda_library(emulated=True), "PIMOE_ORT_CUDA_EMU_LIBRARY",
     "libpimoe_ort_cuda_emu.so", "emu",
     "it builds it with the emulated harness: needs g++, python and the TensorRT and ONNX Runtime headers"),
    (lambda: libraries.find_plugin_library(), "PIMOE_TRT_PLUGINS", "libpimoe_trt_plugins.so", "trt",
     f"{NVCC} the plugins when CUDA is installed"),
    (lambda: libraries.find_harness_library(), "PIMOE_TRT_HARNESS", "libpimoe_trt_harness.so", "harness",
     "needs nvcc"),
    (lambda: libraries.find_harness_library(emulated=True), "PIMOE_TRT_HARNESS_EMU", "libpimoe_trt_harness_emu.so",
     "emu", "it builds the emulated harness by default: needs g++, python and the TensorRT headers"),
])
def test_each_library_is_looked_for_packaged_first_then_in_the_build_tree(monkeypatch, tmp_path, no_overrides,
                                                                          find, env, name, subdir, how) -> None:
    """Not found: the message says where it looked, what builds the library (each its own way) and the variable."""
    packaged, tree = tmp_path / "_lib", tmp_path / "build" / "plugins"
    monkeypatch.setattr(libraries, "_PACKAGED", packaged)
    monkeypatch.setattr(libraries, "BUILD_TREE", tree)
    with pytest.raises(PluginLoadError) as info:
        find()
    assert str(info.value) == (f"{name} was not found in {tree / subdir}; build it with scripts/setup.sh ({how}), "
                               f"or set {env} to its path")
    (tree / subdir).mkdir(parents=True, exist_ok=True)
    (tree / subdir / name).write_bytes(b"built")
    assert find() == tree / subdir / name
    packaged.mkdir()
    (packaged / name).write_bytes(b"packaged")
    assert find() == packaged / name
    override = tmp_path / "override.so"
    override.write_bytes(b"o")
    monkeypatch.setenv(env, str(override))
    assert find() == override


def test_the_cuda_op_library_is_chosen_only_for_the_cuda_provider(monkeypatch, tmp_path, no_overrides) -> None:
    from pimoe_export.runtime.ort import op_library_for

    cuda = tmp_path / "libpimoe_ort_cuda.so"
    cuda.write_bytes(b"cuda")
    cpu = tmp_path / "libpimoe_ort.so"
    cpu.write_bytes(b"cpu")
    monkeypatch.setenv("PIMOE_ORT_LIBRARY", str(cpu))
    monkeypatch.setenv("PIMOE_ORT_CUDA_LIBRARY", str(cuda))
    assert op_library_for(["CUDAExecutionProvider", "CPUExecutionProvider"]) == cuda
    assert op_library_for(["CPUExecutionProvider"]) == cpu
    assert op_library_for(None) == cpu and op_library_for([]) == cpu
    monkeypatch.setenv("PIMOE_ORT_CUDA_LIBRARY", str(tmp_path / "absent.so"))  # not built: the CPU ops
    monkeypatch.setattr(libraries, "_PACKAGED", tmp_path / "none")
    monkeypatch.setattr(libraries, "BUILD_TREE", tmp_path / "none")
    monkeypatch.delenv("PIMOE_ORT_CUDA_LIBRARY")
    assert op_library_for(["CUDAExecutionProvider"]) == cpu


@pytest.mark.skipif(not BUILT.is_file(), reason="libpimoe_ort is not built")
def test_the_built_op_library_reports_its_contract_isa_and_providers() -> None:
    info = libraries.check_ort_library(str(BUILT))
    assert info["path"] == str(BUILT) and info["contract_version"] == schema.CONTRACT_VERSION
    assert info["cpu_isa"] in ("avx2", "generic", "avx512") and info["providers"][0] == "CPUExecutionProvider"


@pytest.mark.skipif(not BUILT.is_file(), reason="libpimoe_ort is not built")
def test_an_op_library_of_another_contract_is_refused(monkeypatch, tmp_path) -> None:
    copy = tmp_path / "other-contract.so"
    shutil.copyfile(BUILT, copy)
    monkeypatch.setattr(libraries, "CONTRACT_VERSION", schema.CONTRACT_VERSION + 1)
    with pytest.raises(PluginLoadError, match=rf"implements op contract v{schema.CONTRACT_VERSION}, this package "
                                              rf"needs v{schema.CONTRACT_VERSION + 1}; rebuild it"):
        libraries.check_ort_library(str(copy), needs=schema.CONTRACT_VERSION + 1)


def test_a_file_that_is_no_shared_library_is_refused(tmp_path) -> None:
    fake = tmp_path / "fake.so"
    fake.write_text("not an ELF file")
    with pytest.raises(PluginLoadError, match=rf"^cannot load {fake}: .*; rebuild it with scripts/setup.sh$"):
        libraries.check_ort_library(str(fake))
    with pytest.raises(PluginLoadError, match=rf"^cannot load {fake}"):
        libraries.check_plugin_library(str(fake))


def test_a_plugin_library_without_our_entry_points_is_refused() -> None:
    import ctypes.util

    libm = ctypes.util.find_library("m")
    with pytest.raises(PluginLoadError, match=r"does not export \['getCreators', 'setLoggerFinder', "
                                              r"'pimoe_trt_contract_version'\]: it is not a pimoe TensorRT plugin"):
        libraries.check_plugin_library(libm)
    assert libraries.plugin_last_error(libm) == ""  # no such symbol: nothing recorded
    assert libraries.plugin_last_error("/no/such/library.so") == ""


def test_both_onnxruntime_packages_installed_is_warned_about(monkeypatch) -> None:
    versions = {"onnxruntime": "1.22.0", "onnxruntime-gpu": "1.22.0"}

    def version(name):
        if name not in versions:
            raise libraries.metadata.PackageNotFoundError(name)
        return versions[name]
    monkeypatch.setattr(libraries.metadata, "version", version)
    assert libraries.installed_ort_distributions() == ["onnxruntime", "onnxruntime-gpu"]
    libraries.import_onnxruntime.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"both onnxruntime and onnxruntime-gpu are installed: .*pip "
                                                r"uninstall -y onnxruntime onnxruntime-gpu"):
            libraries.import_onnxruntime()
        del versions["onnxruntime-gpu"]
        libraries.import_onnxruntime.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            libraries.import_onnxruntime()
        assert libraries.installed_ort_distributions() == ["onnxruntime"]
    finally:
        libraries.import_onnxruntime.cache_clear()


def test_onnxruntime_missing_names_both_packages(monkeypatch) -> None:
    real = libraries.importlib.import_module

    def no_ort(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(libraries.importlib, "import_module", no_ort)
    libraries.import_onnxruntime.cache_clear()
    try:
        with pytest.raises(BackendUnavailableError) as info:
            libraries.import_onnxruntime()
    finally:
        libraries.import_onnxruntime.cache_clear()
    assert str(info.value) == libraries.ORT_MISSING
    assert "pimoe-export[cpu]" in str(info.value) and "pimoe-export[gpu]" in str(info.value)


# ------------------------------------------------------------------------------------------ GPU name
@pytest.mark.parametrize(("stdout", "expected"), [
    ("8.9\n", "sm_89"), ("9.0\n8.6\n", "sm_90"), ("12.0", "sm_120"), ("", None), ("N/A\n", None),
    ("  8.0  \n", "sm_80"),
])
def test_the_gpu_is_named_from_nvidia_smi(monkeypatch, stdout, expected) -> None:
    def run(argv, **kwargs):  # as subprocess.run does: text only when asked for
        assert argv == ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"]
        assert kwargs["check"] is True and kwargs["timeout"] > 0
        text = kwargs.get("text") or kwargs.get("universal_newlines")
        return subprocess.CompletedProcess(argv, 0, stdout=stdout if text else stdout.encode())
    monkeypatch.setattr(devices.subprocess, "run", run)
    assert devices.local_gpu_sm() == expected


@pytest.mark.parametrize("error", [FileNotFoundError("nvidia-smi"), subprocess.CalledProcessError(9, "nvidia-smi"),
                                   subprocess.TimeoutExpired("nvidia-smi", 20)])
def test_no_gpu_when_nvidia_smi_fails(monkeypatch, error) -> None:
    def run(argv, **kwargs):
        raise error
    monkeypatch.setattr(devices.subprocess, "run", run)
    assert devices.local_gpu_sm() is None


# ------------------------------------------------------------------------------------------ plugin registry
class Creator:
    def __init__(self, name, version=schema.PLUGIN_VERSION, namespace=schema.PLUGIN_NAMESPACE) -> None:
        self.name, self.plugin_version, self.plugin_namespace = name, version, namespace


class Registry:
    """TensorRT's plugin registry as load_plugin_library uses it."""

    def __init__(self, creators=(), loads=(), listing=True) -> None:
        self.creators, self.loads, self.loaded = list(creators), list(loads), []
        if listing:
            self.all_creators = self.creators

    def get_creator(self, name, version, namespace):
        return next((c for c in self.creators if (c.name, c.plugin_version, c.plugin_namespace) ==
                     (name, version, namespace)), None)

    def load_library(self, path):
        self.loaded.append(path)
        added = self.loads.pop(0) if self.loads else []
        self.creators.extend(added)
        if self.__dict__.get("all_creators") is not None:
            self.all_creators = self.creators
        return "handle" if added else None


@pytest.fixture
def plugin_library(monkeypatch, tmp_path) -> Path:
    path = tmp_path / "libpimoe_trt_plugins.so"
    path.write_bytes(b"x")
    monkeypatch.setattr(tensorrt_loader, "check_plugin_library", lambda p: {"path": p})
    return path


@pytest.mark.parametrize("listing", [True, False])
def test_the_four_creators_are_registered_once(plugin_library, listing) -> None:
    names = tensorrt_loader.PLUGIN_NAMES
    registry = Registry(loads=[[Creator(n) for n in names]], listing=listing)
    assert tensorrt_loader.load_plugin_library(None, plugin_library, registry=registry) == "handle"
    assert registry.loaded == [str(plugin_library)]
    assert tensorrt_loader.load_plugin_library(None, plugin_library, registry=registry) is None  # already there
    assert registry.loaded == [str(plugin_library)]


def test_a_registry_holding_only_some_of_our_creators_still_loads_the_library(plugin_library) -> None:
    """Nothing is loaded only when all four creators are there: with one already registered (another library of
    ours, an older load) the library is loaded for the other three, and a load that adds none of them is an
    error, not a silent success."""
    names = tensorrt_loader.PLUGIN_NAMES
    registry = Registry([Creator(names[0])], loads=[[Creator(n) for n in names[1:]]])
    assert tensorrt_loader.load_plugin_library(None, plugin_library, registry=registry) == "handle"
    assert registry.loaded == [str(plugin_library)]
    with pytest.raises(PluginLoadError, match="did not register the plugins"):
        tensorrt_loader.load_plugin_library(None, plugin_library, registry=Registry([Creator(names[0])]))


def test_creators_of_another_version_or_namespace_do_not_count(plugin_library) -> None:
    names = tensorrt_loader.PLUGIN_NAMES
    registry = Registry([Creator(n, version="2") for n in names] + [Creator(n, namespace="x") for n in names],
                        loads=[[Creator(n) for n in names[:3]]])
    with pytest.raises(PluginLoadError, match=r"loaded, but the creators \['PiMoECombine'\] \(version '1', "
                                              r"namespace ''\) are not registered"):
        tensorrt_loader.load_plugin_library(None, plugin_library, registry=registry)


def test_a_library_tensorrt_refuses_is_reported_with_its_log(plugin_library, monkeypatch) -> None:
    class Logger:
        def errors(self):
            return "ERROR: getCreators not found"
    registry = Registry(loads=[[]])
    with pytest.raises(PluginLoadError, match=r"did not register the plugins .*TensorRT said: ERROR: getCreators not "
                                              r"found$"):
        tensorrt_loader.load_plugin_library(None, plugin_library, registry=registry, logger=Logger())
    monkeypatch.setenv("PIMOE_TRT_STATIC_REGISTRATION", "1")
    with pytest.raises(PluginLoadError, match=r"registered already\. PIMOE_TRT_STATIC_REGISTRATION=1 is set: the "
                                              r"library registered itself when it was loaded, and load_library "
                                              r"refuses creators that are already registered; unset it for dynamic "
                                              r"loading\. TensorRT said: \(nothing\)$"):
        tensorrt_loader.load_plugin_library(None, plugin_library, registry=Registry(loads=[[]]))


def test_without_a_path_the_library_of_the_environment_is_loaded(plugin_library, monkeypatch) -> None:
    """No path: the library find_plugin_library names ($PIMOE_TRT_PLUGINS here) is checked and loaded."""
    monkeypatch.setenv(libraries.PLUGIN_LIBRARY_ENV, str(plugin_library))
    registry = Registry(loads=[[Creator(n) for n in tensorrt_loader.PLUGIN_NAMES]])
    assert tensorrt_loader.load_plugin_library(None, registry=registry) == "handle"
    assert registry.loaded == [str(plugin_library)]


def test_a_missing_plugin_library_file(tmp_path) -> None:
    with pytest.raises(PluginLoadError, match=r"plugin library .*absent\.so does not exist; build it with "
                                              r"scripts/setup\.sh"):
        tensorrt_loader.load_plugin_library(None, tmp_path / "absent.so", registry=Registry())


def test_unknown_flavour_and_missing_modules(monkeypatch) -> None:
    with pytest.raises(ValueError, match=r"unknown TensorRT flavour 'trt'; expected one of \['lean', 'rtx', "
                                         r"'tensorrt'\]"):
        tensorrt_loader.import_tensorrt("trt")
    real = tensorrt_loader.importlib.import_module

    def missing(name, *args, **kwargs):
        if name in ("tensorrt_lean_bindings", "tensorrt_rtx_libs"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(tensorrt_loader.importlib, "import_module", missing)
    with pytest.raises(BackendUnavailableError, match=r"the TensorRT module 'tensorrt_lean_bindings' is not "
                                                      r"importable here .*tensorrt-lean-cu13-libs==11\.4\.0\.106"):
        tensorrt_loader.import_tensorrt("lean")
    with pytest.raises(BackendUnavailableError, match=r"tensorrt_rtx_libs is not installed .*install "
                                                      r"tensorrt-rtx-cu13-libs"):
        tensorrt_loader.rtx_library()


def test_the_rtx_flavour_makes_its_parser_link_first(monkeypatch) -> None:
    made = []
    monkeypatch.setattr(tensorrt_loader, "ensure_rtx_parser_symlink", lambda: made.append(1))
    monkeypatch.setattr(tensorrt_loader.importlib, "import_module", lambda name: name)
    assert tensorrt_loader.import_tensorrt("rtx") == "tensorrt_rtx_bindings" and made == [1]
    assert tensorrt_loader.import_tensorrt("lean") == "tensorrt_lean_bindings" and made == [1]
    assert tensorrt_loader.import_tensorrt("tensorrt") == "tensorrt" and made == [1]


def test_the_parser_link_points_at_the_versioned_library(monkeypatch, tmp_path) -> None:
    library = tmp_path / "libtensorrt_rtx.so.1"
    library.write_bytes(b"elf")
    monkeypatch.setattr(tensorrt_loader, "rtx_library", lambda: library)
    link = tensorrt_loader.ensure_rtx_parser_symlink()
    assert link == tmp_path / "libtensorrt_rtx.so" and link.is_symlink()
    assert str(link.readlink()) == "libtensorrt_rtx.so.1" and link.resolve() == library.resolve()
    assert tensorrt_loader.ensure_rtx_parser_symlink() == link  # there already: kept


def test_a_logger_that_keeps_no_errors_is_not_asked_for_them(plugin_library) -> None:
    class Quiet:
        pass
    with pytest.raises(PluginLoadError, match=r"TensorRT said: \(nothing\)$"):
        tensorrt_loader.load_plugin_library(None, plugin_library, registry=Registry(loads=[[]]), logger=Quiet())


def test_an_older_unit_library_names_what_the_unit_needs() -> None:
    """A unit built by an older release ships its own library: the message says the unit (not this package) needs
    the newer contract, and contracts only grow (a newer library runs an older unit)."""
    libraries._check_contract("unit.so", 1, 1)
    libraries._check_contract("unit.so", schema.CONTRACT_VERSION, 1)
    with pytest.raises(PluginLoadError) as info:
        libraries._check_contract("unit.so", 0, 1)
    assert str(info.value) == "unit.so implements op contract v0, the unit needs v1; rebuild it with scripts/setup.sh"
    with pytest.raises(PluginLoadError) as info:
        libraries._check_contract("lib.so", schema.CONTRACT_VERSION - 1, schema.CONTRACT_VERSION)
    assert f"this package needs v{schema.CONTRACT_VERSION};" in str(info.value)


def test_the_plugin_library_reports_no_error_before_a_call_failed() -> None:
    """pimoe_trt_last_error returns NULL while nothing failed on this thread: plugin_last_error gives ""."""
    try:
        plugin = libraries.find_plugin_library()
    except PluginLoadError:
        pytest.skip("the TensorRT plugin library was not built (build/plugins/trt)")
    assert libraries.plugin_last_error(plugin) == ""


def test_the_rtx_library_is_the_wheels_own_file(monkeypatch, tmp_path) -> None:
    """rtx_library() returns the wheel's libtensorrt_rtx.so.1 when it is there and refuses a wheel without it."""
    import types

    package = tmp_path / "tensorrt_rtx_libs"
    package.mkdir()
    fake = types.ModuleType("tensorrt_rtx_libs")
    fake.__file__ = str(package / "__init__.py")
    real = tensorrt_loader.importlib.import_module
    monkeypatch.setattr(tensorrt_loader.importlib, "import_module",
                        lambda name, *a, **k: fake if name == "tensorrt_rtx_libs" else real(name, *a, **k))
    with pytest.raises(BackendUnavailableError, match=r"holds no libtensorrt_rtx\.so\.1; reinstall "):
        tensorrt_loader.rtx_library()
    (package / "libtensorrt_rtx.so.1").write_bytes(b"")
    assert tensorrt_loader.rtx_library() == (package / "libtensorrt_rtx.so.1").resolve()
