"""Loading TensorRT and our plugin library into it (no building here: pimoe_export.build.engine_builder builds).

Three TensorRT flavours, each imported lazily (importing this module needs neither TensorRT nor CUDA, and it
never imports torch):

- ``tensorrt`` -- full TensorRT 10/11 (builder + runtime); a GPU machine or the docker/ image.
- ``rtx`` -- TensorRT-RTX 1.7 (``tensorrt_rtx_bindings``): a builder with an ONNX parser that builds engines
  *ahead of time* on a CPU-only machine for chosen compute capabilities (SM75..SM121; there is no SM90 target).
- ``lean`` -- the TensorRT 11.4 lean runtime (``tensorrt_lean_bindings``): a plugin registry that works without a
  GPU. Never create a lean ``Runtime`` without a GPU (it logs a CUDA failure and crashes at interpreter exit).

A missing TensorRT module raises :class:`~pimoe_export.errors.BackendUnavailableError`, a missing or unloadable
plugin library :class:`~pimoe_export.errors.PluginLoadError`; every message says what to do.
"""

from __future__ import annotations

import importlib
import os
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from pimoe_export.errors import BackendUnavailableError, PluginLoadError
from pimoe_export.native.libraries import check_plugin_library, find_plugin_library
from pimoe_export.ops import schema

PLUGIN_NAMES = (schema.ROUTE, schema.DISPATCH, schema.EXPERT_MLP, schema.COMBINE)

#: flavour -> (module, pip requirement that provides it)
FLAVOURS: dict[str, tuple[str, str]] = {
    "tensorrt": ("tensorrt", "TensorRT 10/11 (the docker/ image, or NVIDIA's tensorrt wheels on a GPU machine)"),
    "rtx": ("tensorrt_rtx_bindings", "tensorrt-rtx-cu13-libs==1.7.1.116 tensorrt-rtx-cu13-bindings==1.7.1.116"),
    "lean": ("tensorrt_lean_bindings", "tensorrt-lean-cu13-libs==11.4.0.106 tensorrt-lean-cu13-bindings==11.4.0.106"),
}


# ------------------------------------------------------------------------------------------ modules
def import_tensorrt(flavour: str = "rtx") -> ModuleType:
    """The TensorRT Python module of ``flavour`` ("tensorrt", "rtx" or "lean"), imported on first use.

    For "rtx" this also creates the ``libtensorrt_rtx.so`` symlink its ONNX parser needs (see
    :func:`ensure_rtx_parser_symlink`).
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown TensorRT flavour {flavour!r}; expected one of {sorted(FLAVOURS)}")
    module_name, requirement = FLAVOURS[flavour]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the TensorRT module {module_name!r} is not importable here ({exc}); install {requirement} "
            f"(scripts/setup.sh installs the CPU-usable ones through the `tensorrt-cpu` extra)"
        ) from None
    if flavour == "rtx":
        ensure_rtx_parser_symlink()
    return module


def rtx_library() -> Path:
    """``libtensorrt_rtx.so.1`` of the installed TensorRT-RTX wheel (``tensorrt_rtx_libs``)."""
    try:
        libs = importlib.import_module("tensorrt_rtx_libs")
    except ImportError as exc:
        raise BackendUnavailableError(
            f"tensorrt_rtx_libs is not installed ({exc}); install {FLAVOURS['rtx'][1]}"
        ) from None
    library = Path(libs.__file__).resolve().parent / "libtensorrt_rtx.so.1"
    if not library.exists():
        raise BackendUnavailableError(f"{library.parent} holds no libtensorrt_rtx.so.1; reinstall {FLAVOURS['rtx'][1]}")
    return library


def ensure_rtx_parser_symlink() -> Path:
    """Create ``libtensorrt_rtx.so -> libtensorrt_rtx.so.1`` next to the TensorRT-RTX libraries.

    TensorRT-RTX 1.7's ONNX parser ``dlopen()``s the unversioned name when it adds a plugin layer; without it the
    process aborts ("terminate called without an active exception"). The parser's RPATH is ``$ORIGIN``, so a
    symlink in the wheel's library folder, created any time before parsing, is enough.
    """
    folder = rtx_library().parent
    link = folder / "libtensorrt_rtx.so"
    if link.exists():
        return link
    try:
        link.symlink_to("libtensorrt_rtx.so.1")
    except FileExistsError:  # created concurrently
        pass
    except OSError as exc:
        raise BackendUnavailableError(
            f"cannot create {link} ({exc}); TensorRT-RTX's ONNX parser needs it to add plugin layers. Create it once: "
            f"ln -s libtensorrt_rtx.so.1 {link}"
        ) from None
    return link


class CaptureLogger:
    """A TensorRT logger (of the given module) that keeps warnings and errors for error messages.

    TensorRT keeps the first logger a process passes to a Builder/Runtime and ignores later ones, so
    :func:`process_logger` hands out one instance per TensorRT module; ``mark()`` + ``errors()`` return what was
    logged since the mark.
    """

    def __new__(cls, trt: ModuleType, echo_severity: Any = None):
        class _Logger(trt.ILogger):  # type: ignore[name-defined,misc]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.messages: list[str] = []
                self._start = 0
                self._lock = threading.Lock()

            def log(self, severity, msg):  # TensorRT callback
                if severity <= trt.ILogger.Severity.WARNING:
                    with self._lock:
                        self.messages.append(f"{severity.name}: {msg}")
                        del self.messages[:-200]
                        self._start = min(self._start, len(self.messages))
                if echo_severity is not None and severity <= echo_severity:
                    print(f"[TensorRT] {severity.name}: {msg}", flush=True)

            def mark(self) -> None:
                with self._lock:
                    self._start = len(self.messages)

            def errors(self) -> str:
                # without a GPU every builder logs a CUDA driver error that is expected (ahead-of-time builds)
                with self._lock:
                    kept = [m for m in self.messages[self._start:] if "catchCudaError" not in m]
                return "\n".join(kept[-20:])

        return _Logger()


_LOGGERS: dict[str, Any] = {}


def process_logger(trt: ModuleType) -> Any:
    """The one CaptureLogger this process uses with the TensorRT module ``trt``."""
    key = trt.__name__
    if key not in _LOGGERS:
        _LOGGERS[key] = CaptureLogger(trt)
    return _LOGGERS[key]


def _registered(registry: Any) -> list[str]:
    """Which of our creators ``registry`` holds (read from its creator list: get_creator logs an error per miss)."""
    try:
        creators = list(registry.all_creators)
    except AttributeError:  # a registry without the listing: ask for each name
        return [n for n in PLUGIN_NAMES
                if registry.get_creator(n, schema.PLUGIN_VERSION, schema.PLUGIN_NAMESPACE) is not None]
    present = {(c.name, c.plugin_version, c.plugin_namespace) for c in creators}
    return [n for n in PLUGIN_NAMES if (n, schema.PLUGIN_VERSION, schema.PLUGIN_NAMESPACE) in present]


def load_plugin_library(trt: ModuleType, path: str | Path | None = None, *, registry: Any = None,
                        logger: Any = None, needs: int | None = None) -> Any:
    """Register our four creators with ``registry`` (default: the flavour's global registry) via ``load_library``.

    Create the TensorRT logger (and builder) before calling this, so TensorRT can report why a load fails. When
    all four creators are already registered (an earlier call in this process), nothing is loaded again and None
    is returned; otherwise the library handle. ``needs``: the op contract the engine was built for (default: this
    package's).
    """
    path = Path(path) if path is not None else find_plugin_library()
    if not path.is_file():
        raise PluginLoadError(f"plugin library {path} does not exist; build it with scripts/setup.sh")
    check_plugin_library(str(path), *(() if needs is None else (needs,)))
    if registry is None:
        registry = trt.get_plugin_registry()
    present = _registered(registry)
    if len(present) == len(PLUGIN_NAMES):
        return None
    handle = registry.load_library(str(path))
    details = logger.errors() if logger is not None and hasattr(logger, "errors") else ""
    if handle is None:
        hint = (" PIMOE_TRT_STATIC_REGISTRATION=1 is set: the library registered itself when it was loaded, and "
                "load_library refuses creators that are already registered; unset it for dynamic loading."
                if os.environ.get("PIMOE_TRT_STATIC_REGISTRATION") == "1" else "")
        raise PluginLoadError(
            f"TensorRT did not register the plugins of {path} (load_library returned nothing). The library must "
            f"export getCreators and setLoggerFinder (check with `nm -D {path}`), and its creators must not be "
            f"registered already.{hint} TensorRT said: {details or '(nothing)'}"
        )
    missing = [n for n in PLUGIN_NAMES if n not in _registered(registry)]
    if missing:
        raise PluginLoadError(f"{path} loaded, but the creators {missing} (version {schema.PLUGIN_VERSION!r}, "
                              f"namespace {schema.PLUGIN_NAMESPACE!r}) are not registered. TensorRT said: {details}")
    return handle
