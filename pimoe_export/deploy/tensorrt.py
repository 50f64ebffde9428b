"""TensorRT-side Python: locate and load ``libpimoe_trt_plugins.so``, build engines from the exported ONNX.

Three TensorRT flavours, each imported lazily (importing this module needs neither TensorRT nor CUDA, and it
never imports torch):

- ``tensorrt`` -- full TensorRT 10/11 (builder + runtime); a GPU machine or the docker/ image.
- ``rtx`` -- TensorRT-RTX 1.7 (``tensorrt_rtx_bindings``): a builder with an ONNX parser that builds engines
  *ahead of time* on a CPU-only machine for chosen compute capabilities (SM75..SM121; there is no SM90 target).
  It is the CPU-side proof that TensorRT's parser and builder accept our ONNX and plugins (CI).
- ``lean`` -- the TensorRT 11.4 lean runtime (``tensorrt_lean_bindings``): a plugin registry that works without a
  GPU (CI loads the plugin library there). Never create a lean ``Runtime`` without a GPU (it logs a CUDA failure
  and crashes at interpreter exit).

Errors: a missing TensorRT module raises :class:`~pimoe_export.errors.BackendUnavailableError`, a missing or
unloadable plugin library :class:`~pimoe_export.errors.PluginLoadError`, a parser/builder failure
:class:`EngineBuildError`; every message says what to do.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

from pimoe_export.errors import BackendUnavailableError, PiMoEError, PluginLoadError
from pimoe_export.ops import schema

PLUGIN_LIBRARY_ENV = "PIMOE_TRT_PLUGINS"
PLUGIN_LIBRARY_NAME = "libpimoe_trt_plugins.so"
HARNESS_LIBRARY_ENV = "PIMOE_TRT_HARNESS"
HARNESS_LIBRARY_NAME = "libpimoe_trt_harness.so"
EMU_HARNESS_LIBRARY_ENV = "PIMOE_TRT_HARNESS_EMU"
EMU_HARNESS_LIBRARY_NAME = "libpimoe_trt_harness_emu.so"
PLUGIN_NAMES = (schema.ROUTE, schema.DISPATCH, schema.EXPERT_MLP, schema.COMBINE)

_REPO_ROOT = Path(__file__).resolve().parents[2]
_BUILD_TREE = _REPO_ROOT / "build" / "plugins"

#: flavour -> (module, pip requirement that provides it)
FLAVOURS: dict[str, tuple[str, str]] = {
    "tensorrt": ("tensorrt", "TensorRT 10/11 (the docker/ image, or NVIDIA's tensorrt wheels on a GPU machine)"),
    "rtx": ("tensorrt_rtx_bindings", "tensorrt-rtx-cu13-libs==1.7.1.116 tensorrt-rtx-cu13-bindings==1.7.1.116"),
    "lean": ("tensorrt_lean_bindings", "tensorrt-lean-cu13-libs==11.4.0.106 tensorrt-lean-cu13-bindings==11.4.0.106"),
}


class EngineBuildError(PiMoEError, RuntimeError):
    """TensorRT's ONNX parser or builder rejected the network (the message carries TensorRT's own errors)."""


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


def ensure_rtx_parser_symlink() -> Path:
    """Create ``libtensorrt_rtx.so -> libtensorrt_rtx.so.1`` next to the TensorRT-RTX libraries.

    TensorRT-RTX 1.7's ONNX parser ``dlopen()``s the unversioned name when it adds a plugin layer; without it the
    process aborts ("terminate called without an active exception"). The parser's RPATH is ``$ORIGIN``, so a
    symlink in the wheel's library folder, created any time before parsing, is enough.
    """
    try:
        libs = importlib.import_module("tensorrt_rtx_libs")
    except ImportError as exc:
        raise BackendUnavailableError(
            f"tensorrt_rtx_libs is not installed ({exc}); install {FLAVOURS['rtx'][1]}"
        ) from None
    folder = Path(libs.__file__).resolve().parent
    link = folder / "libtensorrt_rtx.so"
    if link.exists():
        return link
    if not (folder / "libtensorrt_rtx.so.1").exists():
        raise BackendUnavailableError(f"{folder} holds no libtensorrt_rtx.so.1; reinstall {FLAVOURS['rtx'][1]}")
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


# ------------------------------------------------------------------------------------------ libraries
def _find(env: str, name: str, subdir: str, how: str = "needs nvcc: the TensorRT section of setup.sh builds the "
          "plugins when CUDA is installed") -> Path:
    override = os.environ.get(env)
    if override:
        path = Path(override)
        if not path.is_file():
            raise PluginLoadError(f"{env}={override} does not exist; point it at a built {name} or unset it")
        return path
    for path in (Path(__file__).resolve().parents[1] / "_lib" / name, _BUILD_TREE / subdir / name):
        if path.is_file():
            return path
    raise PluginLoadError(
        f"{name} was not found in {_BUILD_TREE / subdir}; build it with scripts/setup.sh ({how}), or set {env} to "
        "its path"
    )


def find_plugin_library() -> Path:
    """``$PIMOE_TRT_PLUGINS`` if set, else ``build/plugins/trt/libpimoe_trt_plugins.so``."""
    return _find(PLUGIN_LIBRARY_ENV, PLUGIN_LIBRARY_NAME, "trt")


def find_harness_library(emulated: bool = False) -> Path:
    """``$PIMOE_TRT_HARNESS`` if set, else ``build/plugins/harness/libpimoe_trt_harness.so`` (GPU tests); with
    ``emulated``, ``$PIMOE_TRT_HARNESS_EMU`` or ``build/plugins/emu/libpimoe_trt_harness_emu.so`` (the CPU CUDA
    emulator build of the same kernels, plugins and harness)."""
    if emulated:
        return _find(EMU_HARNESS_LIBRARY_ENV, EMU_HARNESS_LIBRARY_NAME, "emu",
                     "it builds the emulated harness by default: needs g++, python and the TensorRT headers")
    return _find(HARNESS_LIBRARY_ENV, HARNESS_LIBRARY_NAME, "harness")


@lru_cache(maxsize=8)
def check_plugin_library(path: str) -> dict[str, Any]:
    """Load ``path`` with ctypes (no TensorRT needed) and check that it is our plugin library for this contract.

    Returns ``{"path", "contract_version", "tensorrt_header_version"}``.
    """
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise PluginLoadError(f"cannot load {path}: {exc}; rebuild it with scripts/setup.sh") from None
    missing = [s for s in ("getCreators", "setLoggerFinder", "pimoe_trt_contract_version") if not hasattr(lib, s)]
    if missing:
        raise PluginLoadError(f"{path} does not export {missing}: it is not a pimoe TensorRT plugin library; "
                              f"rebuild it with scripts/setup.sh")
    version = int(lib.pimoe_trt_contract_version())
    if version != schema.CONTRACT_VERSION:
        raise PluginLoadError(f"{path} implements op contract v{version}, this package needs "
                              f"v{schema.CONTRACT_VERSION}; rebuild it with scripts/setup.sh")
    return {"path": path, "contract_version": version, "tensorrt_header_version": int(lib.pimoe_trt_header_version())}


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


def plugin_last_error(path: str | Path) -> str:
    """The last error our plugin library recorded on this thread ("" if none); TensorRT only says a call failed."""
    try:
        lib = ctypes.CDLL(str(path))
        lib.pimoe_trt_last_error.restype = ctypes.c_char_p
        return (lib.pimoe_trt_last_error() or b"").decode(errors="replace")
    except (OSError, AttributeError):
        return ""


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
                        logger: Any = None) -> Any:
    """Register our four creators with ``registry`` (default: the flavour's global registry) via ``load_library``.

    Create the TensorRT logger (and builder) before calling this, so TensorRT can report why a load fails. When
    all four creators are already registered (an earlier call in this process), nothing is loaded again and None
    is returned; otherwise the library handle.
    """
    path = Path(path) if path is not None else find_plugin_library()
    if not path.is_file():
        raise PluginLoadError(f"plugin library {path} does not exist; build it with scripts/setup.sh")
    check_plugin_library(str(path))
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


# ------------------------------------------------------------------------------------------ engine build
@dataclass
class PluginLayer:
    name: str
    plugin: str
    num_inputs: int


@dataclass
class LayerSummary:
    """What the parsed network holds: layer counts by type, our plugin layers, inputs and outputs."""

    num_layers: int
    layer_types: dict[str, int]
    plugin_layers: list[PluginLayer] = field(default_factory=list)
    inputs: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)
    outputs: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)

    def plugin_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.plugin_layers:
            counts[layer.plugin] = counts.get(layer.plugin, 0) + 1
        return counts


def _plugin_name(trt: ModuleType, layer: Any) -> str:
    try:
        layer.__class__ = trt.IPluginV3Layer
        core = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
        return str(core.plugin_name)
    except Exception:  # bindings without IPluginV3Layer: fall back to the layer name
        return str(layer.name)


def summarize_network(trt: ModuleType, network: Any) -> LayerSummary:
    types: dict[str, int] = {}
    plugins: list[PluginLayer] = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = str(layer.type).split(".")[-1]
        types[kind] = types.get(kind, 0) + 1
        if layer.type == trt.LayerType.PLUGIN_V3:
            name, count = str(layer.name), int(layer.num_inputs)
            plugins.append(PluginLayer(name, _plugin_name(trt, layer), count))

    def tensors(count: int, get) -> list[tuple[str, str, tuple[int, ...]]]:
        return [(t.name, str(t.dtype).split(".")[-1], tuple(t.shape)) for t in (get(i) for i in range(count))]

    return LayerSummary(network.num_layers, types, plugins, tensors(network.num_inputs, network.get_input),
                        tensors(network.num_outputs, network.get_output))


ShapeRange = tuple[Sequence[int], Sequence[int], Sequence[int]]


def hidden_states_profile(hidden_size: int, min_tokens: tuple[int, int] = (1, 1),
                          opt_tokens: tuple[int, int] = (1, 64),
                          max_tokens: tuple[int, int] = (8, 512)) -> dict[str, ShapeRange]:
    """Optimisation profile for ``hidden_states`` [batch, sequence, H] of an exported graph."""
    return {"hidden_states": ((*min_tokens, hidden_size), (*opt_tokens, hidden_size), (*max_tokens, hidden_size))}


def build_engine(
    onnx_path: str | Path,
    plugin_path: str | Path | None = None,
    profile: Mapping[str, ShapeRange] | None = None,
    compute_capabilities: Sequence[str] = ("SM89",),
    strongly_typed: bool = True,
    flavour: str = "rtx",
    configure: Any = None,
) -> tuple[bytes, LayerSummary]:
    """Parse ``onnx_path`` with TensorRT's ONNX parser (our plugins registered) and build a serialized engine.

    ``compute_capabilities`` names ``trt.ComputeCapability`` members ("SM80", "SM89", ...): TensorRT-RTX builds
    for them ahead of time, no GPU needed (ignored by flavours without that API). Returns the plan bytes and a
    summary of the parsed network (its PLUGIN_V3 layers show which of our plugins the parser created).
    ``configure(trt, builder, config)``, when given, sets further builder options (optimisation level, timing
    cache, compatibility flags) before the build.
    """
    trt = import_tensorrt(flavour)
    logger = process_logger(trt)
    builder = trt.Builder(logger)  # created before loading, so TensorRT can report load failures
    logger.mark()
    load_plugin_library(trt, plugin_path, registry=builder.get_plugin_registry(), logger=logger)
    library = Path(plugin_path) if plugin_path is not None else find_plugin_library()
    _clear_plugin_error(library)

    def failure(what: str) -> str:
        plugin = plugin_last_error(library)
        return f"{what}{'; our plugin said: ' + plugin if plugin else ''}\n{logger.errors()}".rstrip()

    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [f"{parser.get_error(i).node_operator()}: {parser.get_error(i).desc()}"
                  for i in range(parser.num_errors)]
        raise EngineBuildError(failure(f"TensorRT's ONNX parser rejected {onnx_path}: {'; '.join(errors)}"))
    summary = summarize_network(trt, network)
    config = builder.create_builder_config()
    if compute_capabilities and hasattr(config, "set_compute_capability"):
        config.num_compute_capabilities = len(compute_capabilities)
        for index, name in enumerate(compute_capabilities):
            try:
                capability = getattr(trt.ComputeCapability, name)
            except AttributeError:
                known = [n for n in dir(trt.ComputeCapability) if n.startswith("SM")]
                raise ValueError(f"unknown compute capability {name!r}; this TensorRT knows {known}") from None
            config.set_compute_capability(capability, index)
    if profile:
        optimization = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.items():
            optimization.set_shape(name, tuple(low), tuple(opt), tuple(high))
        config.add_optimization_profile(optimization)
    if configure is not None:
        configure(trt, builder, config)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(failure(f"TensorRT could not build an engine from {onnx_path}"))
    return bytes(memoryview(plan)), summary


def _clear_plugin_error(path: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(str(path)).pimoe_trt_clear_last_error()
