"""Where the compiled libraries are and whether they are ours: libpimoe_ort (ONNX Runtime custom ops),
libpimoe_trt_plugins (TensorRT plugins), libpimoe_trt_harness[_emu] (the plugin objects without TensorRT).

Each is found through an environment variable, a packaged copy, or the build tree of scripts/setup.sh, and
checked with ctypes (no ONNX Runtime or TensorRT needed) against this package's op-contract version.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import warnings
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from pimoe_export.errors import BackendUnavailableError, PluginLoadError
from pimoe_export.ops.schema import CONTRACT_VERSION

ORT_LIBRARY_ENV = "PIMOE_ORT_LIBRARY"
ORT_LIBRARY_NAME = "libpimoe_ort.so"
ORT_CUDA_LIBRARY_ENV = "PIMOE_ORT_CUDA_LIBRARY"
ORT_CUDA_LIBRARY_NAME = "libpimoe_ort_cuda.so"  # libpimoe_ort + CUDA execution-provider kernels (built with nvcc)
ORT_CUDA_EMU_LIBRARY_ENV = "PIMOE_ORT_CUDA_EMU_LIBRARY"
ORT_CUDA_EMU_LIBRARY_NAME = "libpimoe_ort_cuda_emu.so"
PLUGIN_LIBRARY_ENV = "PIMOE_TRT_PLUGINS"
PLUGIN_LIBRARY_NAME = "libpimoe_trt_plugins.so"
HARNESS_LIBRARY_ENV = "PIMOE_TRT_HARNESS"
HARNESS_LIBRARY_NAME = "libpimoe_trt_harness.so"
EMU_HARNESS_LIBRARY_ENV = "PIMOE_TRT_HARNESS_EMU"
EMU_HARNESS_LIBRARY_NAME = "libpimoe_trt_harness_emu.so"

_PACKAGED = Path(__file__).resolve().parents[1] / "_lib"  # a wheel/packaged install
BUILD_TREE = Path(__file__).resolve().parents[2] / "build" / "plugins"  # scripts/setup.sh


def _find(env: str, name: str, subdir: str, how: str) -> Path:
    override = os.environ.get(env)
    if override:
        path = Path(override)
        if not path.is_file():
            raise PluginLoadError(f"{env}={override} does not exist; point it at a built {name} or unset it")
        return path
    for path in (_PACKAGED / name, BUILD_TREE / subdir / name):
        if path.is_file():
            return path
    raise PluginLoadError(f"{name} was not found in {BUILD_TREE / subdir}; build it with scripts/setup.sh ({how}), "
                          f"or set {env} to its path")


def find_ort_library() -> Path:
    """``$PIMOE_ORT_LIBRARY`` if set, else the packaged or build-tree libpimoe_ort.so."""
    return _find(ORT_LIBRARY_ENV, ORT_LIBRARY_NAME, "", "it builds the ONNX Runtime op library with any C++17 "
                 "compiler")


def find_ort_cuda_library(emulated: bool = False) -> Path:
    """``$PIMOE_ORT_CUDA_LIBRARY`` if set, else the packaged or build-tree libpimoe_ort_cuda.so (the CPU ops and
    CUDA execution-provider kernels of the four ops: for onnxruntime-gpu sessions with the CUDA provider); with
    ``emulated``, ``$PIMOE_ORT_CUDA_EMU_LIBRARY`` or ``build/plugins/emu/libpimoe_ort_cuda_emu.so`` (those kernels on
    the CPU CUDA emulator, registered for the CPU provider: tests only)."""
    if emulated:
        return _find(ORT_CUDA_EMU_LIBRARY_ENV, ORT_CUDA_EMU_LIBRARY_NAME, "emu", "it builds it with the emulated "
                     "harness: needs g++, python and the TensorRT and ONNX Runtime headers")
    return _find(ORT_CUDA_LIBRARY_ENV, ORT_CUDA_LIBRARY_NAME, "", "needs nvcc: the TensorRT section of setup.sh "
                 "builds it when CUDA is installed")


def find_plugin_library() -> Path:
    """``$PIMOE_TRT_PLUGINS`` if set, else ``build/plugins/trt/libpimoe_trt_plugins.so``."""
    return _find(PLUGIN_LIBRARY_ENV, PLUGIN_LIBRARY_NAME, "trt", "needs nvcc: the TensorRT section of setup.sh "
                 "builds the plugins when CUDA is installed")


def find_harness_library(emulated: bool = False) -> Path:
    """``$PIMOE_TRT_HARNESS`` if set, else ``build/plugins/harness/libpimoe_trt_harness.so`` (GPU tests); with
    ``emulated``, ``$PIMOE_TRT_HARNESS_EMU`` or ``build/plugins/emu/libpimoe_trt_harness_emu.so`` (the CPU CUDA
    emulator build of the same kernels, plugins and harness)."""
    if emulated:
        return _find(EMU_HARNESS_LIBRARY_ENV, EMU_HARNESS_LIBRARY_NAME, "emu",
                     "it builds the emulated harness by default: needs g++, python and the TensorRT headers")
    return _find(HARNESS_LIBRARY_ENV, HARNESS_LIBRARY_NAME, "harness", "needs nvcc")


#: the two distributions that install the ``onnxruntime`` module (pyproject extras ``cpu`` and ``gpu``)
ORT_DISTRIBUTIONS = {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu"}
ORT_MISSING = ("ONNX Runtime is not installed, and pimoe-export does not pull it in (the CPU and GPU packages would "
               "overwrite each other). Install exactly one: pip install 'pimoe-export[cpu]' (onnxruntime, CPU) or "
               "pip install 'pimoe-export[gpu]' (onnxruntime-gpu, CUDA provider); scripts/setup.sh installs the CPU "
               "one, PIMOE_SETUP_ORT=gpu the GPU one")


def installed_ort_distributions() -> list[str]:
    """Which of ``onnxruntime`` / ``onnxruntime-gpu`` pip has installed (both: their files overwrote each other)."""
    found = []
    for name in ORT_DISTRIBUTIONS.values():
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


@lru_cache(maxsize=1)
def import_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or one BackendUnavailableError naming both packages that provide it."""
    try:
        module = importlib.import_module("onnxruntime")
    except ImportError:
        raise BackendUnavailableError(ORT_MISSING) from None
    both = installed_ort_distributions()
    if len(both) > 1:
        warnings.warn(f"both {both[0]} and {both[1]} are installed: they share the onnxruntime module, so whichever "
                      f"was installed last won (onnxruntime {module.__version__}); uninstall both and reinstall one "
                      f"(pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'pimoe-export[gpu]')",
                      RuntimeWarning, stacklevel=2)
    return module


def _load(path: str, fix: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(path)
    except OSError as exc:
        raise PluginLoadError(f"cannot load {path}: {exc}; {fix}") from None


def _check_contract(path: str, version: int, needs: int) -> None:
    """A library implements op contract ``version``; the artefact it runs needs ``needs`` (a unit of an older release
    ships the library it was built with: contracts only grow, so any version from ``needs`` up to this package's runs
    it)."""
    if version > CONTRACT_VERSION:
        raise PluginLoadError(f"{path} implements op contract v{version}, newer than this package's "
                              f"v{CONTRACT_VERSION}; upgrade pimoe-export")
    if version < needs:
        what = "this package needs" if needs == CONTRACT_VERSION else "the unit needs"
        raise PluginLoadError(f"{path} implements op contract v{version}, {what} v{needs}; rebuild it with "
                              f"scripts/setup.sh")


@lru_cache(maxsize=8)
def check_ort_library(path: str, needs: int = CONTRACT_VERSION) -> dict[str, Any]:
    """Load the library once with ctypes and verify it implements op contract ``needs`` (default: this package's; an
    older unit names its own, which its bundled library may implement)."""
    lib = _load(path, "rebuild it with scripts/setup.sh")
    try:
        version = int(lib.pimoe_ort_contract_version())
        lib.pimoe_ort_cpu_isa.restype = ctypes.c_char_p
        isa = lib.pimoe_ort_cpu_isa().decode()
        providers = ["CPUExecutionProvider"]
        if hasattr(lib, "pimoe_ort_providers"):  # libraries built before it existed have CPU kernels only
            lib.pimoe_ort_providers.restype = ctypes.c_char_p
            providers = lib.pimoe_ort_providers().decode().split(",")
    except AttributeError:
        raise PluginLoadError(f"{path} is not a pimoe ONNX Runtime op library (no pimoe_ort_contract_version "
                              f"symbol); rebuild it with scripts/setup.sh") from None
    _check_contract(path, version, needs)
    return {"path": path, "contract_version": version, "cpu_isa": isa, "providers": providers}


@lru_cache(maxsize=8)
def check_plugin_library(path: str, needs: int = CONTRACT_VERSION) -> dict[str, Any]:
    """Load ``path`` with ctypes (no TensorRT needed) and check that it is our plugin library for op contract ``needs``
    (default: this package's; a unit names its own).

    Returns ``{"path", "contract_version", "tensorrt_header_version"}``.
    """
    lib = _load(path, "rebuild it with scripts/setup.sh")
    missing = [s for s in ("getCreators", "setLoggerFinder", "pimoe_trt_contract_version") if not hasattr(lib, s)]
    if missing:
        raise PluginLoadError(f"{path} does not export {missing}: it is not a pimoe TensorRT plugin library; "
                              f"rebuild it with scripts/setup.sh")
    version = int(lib.pimoe_trt_contract_version())
    _check_contract(path, version, needs)
    return {"path": path, "contract_version": version, "tensorrt_header_version": int(lib.pimoe_trt_header_version())}


def plugin_last_error(path: str | Path) -> str:
    """The last error our plugin library recorded on this thread ("" if none); TensorRT only says a call failed."""
    try:
        lib = ctypes.CDLL(str(path))
        lib.pimoe_trt_last_error.restype = ctypes.c_char_p
        return (lib.pimoe_trt_last_error() or b"").decode(errors="replace")
    except (OSError, AttributeError):
        return ""
