"""TensorRT engine builds: parse the exported ONNX with TensorRT's parser (our plugins registered through
:mod:`pimoe_export.native.tensorrt_loader`) and build a serialized engine, ahead of time with TensorRT-RTX on a machine
without a GPU, or with full TensorRT for the local GPU. Parser/builder failures raise :class:`EngineBuildError`
with TensorRT's and our plugin's own messages.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from pimoe_export.errors import PiMoEError, PiMoEInputError
from pimoe_export.native.libraries import find_plugin_library, plugin_last_error
from pimoe_export.native.tensorrt_loader import import_tensorrt, load_plugin_library, process_logger


class EngineBuildError(PiMoEError, RuntimeError):
    """TensorRT's ONNX parser or builder rejected the network (the message carries TensorRT's own errors)."""


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


def compute_capability(trt: ModuleType, name: str) -> Any:
    """TensorRT-RTX's ComputeCapability of an ahead-of-time target name ("SM89"); PiMoEInputError if it has none."""
    try:
        return getattr(trt.ComputeCapability, name)
    except AttributeError:
        known = sorted(n for n in dir(trt.ComputeCapability) if n.startswith("SM"))
        raise PiMoEInputError(f"unknown compute capability {name!r}; this TensorRT-RTX builds for {known} (choose "
                              "from them with --sm)") from None


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


def build_engine(
    onnx_path: str | Path,
    plugin_path: str | Path | None = None,
    profile: Mapping[str, ShapeRange] | None = None,
    compute_capabilities: Sequence[str] = ("SM89",),
    strongly_typed: bool = True,
    flavour: str = "rtx",
    configure: Any = None,
    profiles: Sequence[Mapping[str, ShapeRange]] = (),
) -> tuple[bytes, LayerSummary]:
    """Parse ``onnx_path`` with TensorRT's ONNX parser (our plugins registered) and build a serialized engine.

    ``compute_capabilities`` names ``trt.ComputeCapability`` members ("SM80", "SM89", ...): TensorRT-RTX builds
    for them ahead of time, no GPU needed (ignored by flavours without that API). Returns the plan bytes and a
    summary of the parsed network (its PLUGIN_V3 layers show which of our plugins the parser created).
    ``configure(trt, builder, config)``, when given, sets further builder options (optimisation level, timing
    cache, compatibility flags) before the build. ``profiles``: further optimisation profiles after ``profile`` (a
    decoder engine has a prefill and a decode one: :func:`pimoe_export.interface.decoder_profiles`).
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
            capability = compute_capability(trt, name)
            config.set_compute_capability(capability, index)
    for shapes in ([profile] if profile else []) + list(profiles):
        optimization = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
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
