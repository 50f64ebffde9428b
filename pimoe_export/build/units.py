"""Create deployable units: ONNX Runtime units (CPU) and TensorRT / TensorRT-RTX engine units.

Engine units are built through the TensorRT Python API from the custom-op ONNX with our plugin library
(:func:`pimoe_export.build.engine_builder.build_engine`): strongly typed network, an optimisation profile over
``hidden_states`` [batch, sequence, H], builder optimisation level, a timing cache that is loaded and saved,
and version/hardware-compatibility options. With TensorRT-RTX the same code builds ahead of time for chosen
compute capabilities on a machine without a GPU; with full TensorRT it builds for the local GPU.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pimoe_export._files import OutputDir, resolve_inside
from pimoe_export.artifacts.manifest import CLIENT_FILES, MANIFEST_FILE, Artifact, Manifest, copy_artifact, copy_onnx
from pimoe_export.build.clients import genai_config, genai_refusal, read_generation_config
from pimoe_export.errors import ArtifactError, BackendUnavailableError
from pimoe_export.interface import (
    CUDA_ARCHITECTURES,
    DEFAULT_ENGINE_PROFILE,
    DEFAULT_ORT_PROFILE,
    DEFAULT_RTX_TARGETS,
    OnnxMetadata,
    Profile,
    decoder_profiles,
    external_data_files,
    parse_metadata,
    profile_shapes,
    read_onnx,
    sm_names,
)
from pimoe_export.native.devices import local_gpu_sm
from pimoe_export.native.libraries import (
    check_ort_library,
    check_plugin_library,
    find_ort_library,
    find_plugin_library,
    import_onnxruntime,
)
from pimoe_export.ops.schema import CONTRACT_VERSION
from pimoe_export.ops.validation import check_graph


@dataclass(frozen=True)
class _Graph:
    """The exported ONNX a unit is made from: its path, metadata and external-data file names."""

    path: Path
    meta: OnnxMetadata
    data_files: list[str]


def _source(onnx_path: str | Path) -> _Graph:
    """The exported ONNX a unit is made from, its pimoe nodes checked against the contract. Parsed once (metadata,
    contract check and external-data names from one proto): a graph that keeps its weights inside takes seconds to
    parse near 2 GB."""
    path = Path(onnx_path)
    proto = read_onnx(path)
    meta = parse_metadata({p.key: p.value for p in proto.metadata_props}, str(path))
    if meta.graph != "custom-ops":
        raise ArtifactError(f"{path} is a {meta.graph} graph; units are made from the custom-op export "
                            "(`pimoe-export export` without --standard-ops, or `pimoe-export quantize`)")
    check_graph(proto, name=str(path))
    return _Graph(path, meta, external_data_files(proto))


def _interface(meta: OnnxMetadata):
    return meta.interface


def package_ort(
    onnx_path: str | Path,
    unit_dir: str | Path,
    *,
    library: str | Path | None = None,
    profile: Profile | None = None,
    move: bool = False,
    force: bool = False,
    client_dir: str | Path | None = None,
) -> Manifest:
    """An ONNX Runtime unit: the ONNX (copied, or moved with ``move``) + libpimoe_ort + manifest.

    A decoder graph (``pimoe.decoder`` metadata) also gets the files its clients read (build/clients.py): the
    tokenizer, config.json and generation_config.json found in ``client_dir`` (default: the ONNX's directory), and
    a genai_config.json written for the unit. ``unit_dir`` is an output directory (see
    :class:`~pimoe_export._files.OutputDir`): files in it that pimoe-export did not write are not replaced unless
    ``force``."""
    source = _source(onnx_path)
    onnx_path, meta = source.path, source.meta
    client_sources = _decoder_sources(meta, onnx_path, client_dir)
    lib = Path(library or find_ort_library())
    info = check_ort_library(str(lib))
    out = OutputDir(unit_dir, force=force, command="package")
    out.refuse_foreign(_unit_entries(source, ["libpimoe_ort.so"], client_sources, genai=True))
    lib_copy = out.claim("libpimoe_ort.so")
    manifest_path = out.claim(MANIFEST_FILE)
    if move and not source.data_files:  # a graph with external data is copied
        target = out.claim("model.onnx")
        if onnx_path.resolve() != target.resolve():
            onnx_path.replace(target)
        graph = [Artifact.of("onnx", target)]
    else:
        graph = copy_onnx(onnx_path, out, data_files=source.data_files)
    copy_artifact(lib, lib_copy)
    client_artifacts = _write_client_files(out, meta, client_sources, graph[0].file, lib_copy.name)
    genai_note = genai_refusal(meta.decoder) if meta.decoder else None
    ort = import_onnxruntime()
    onnx_art = graph[0]
    manifest = Manifest(
        backend="onnxruntime",
        contract_version=meta.contract_version or CONTRACT_VERSION,  # what the graph needs (a v1 graph: 1)
        precision=meta.precision,
        profile=profile or DEFAULT_ORT_PROFILE,
        config=meta.config,
        artifacts=[*graph, Artifact.of("ort_library", lib_copy), *client_artifacts],
        backend_version=ort.__version__,
        # a decoder GenAI cannot describe: the reason it has no genai_config.json
        build_options={"cpu_isa": info["cpu_isa"], **({"genai_config": genai_note} if genai_note else {})},
        io=_interface(meta).to_dict(),
        decoder=meta.decoder.to_dict() if meta.decoder else {},
        source_onnx_sha256=onnx_art.sha256,
    )
    manifest.write(manifest_path.parent)
    return manifest


def _unit_entries(source: _Graph, own: list[str], sources: dict[str, Path], genai: bool) -> list[str]:
    """Every entry a unit command claims in the unit folder, so that a user's file among them is refused before
    anything is written (OutputDir.refuse_foreign): its own files, the manifest, the graph and its external data, the
    decoder's client files (and genai_config.json where ``genai`` and GenAI can describe the decoder)."""
    meta = source.meta
    entries = [*own, MANIFEST_FILE, "model.onnx", *source.data_files, *(CLIENT_FILES[role] for role in sources)]
    if genai and meta.decoder is not None and genai_refusal(meta.decoder) is None:
        entries.append(CLIENT_FILES["genai_config"])
    return entries


def _decoder_sources(meta: OnnxMetadata, onnx_path: Path, client_dir: str | Path | None) -> dict[str, Path]:
    """The client files a decoder graph's unit gets, from ``client_dir`` (default: the ONNX's directory); none for
    another graph."""
    if client_dir is not None and not Path(client_dir).is_dir():
        raise ArtifactError(f"{client_dir} is not a directory (the tokenizer and config files of the decoder)")
    return _client_sources(Path(client_dir) if client_dir else onnx_path.parent) if meta.decoder else {}


def _client_sources(directory: Path) -> dict[str, Path]:
    """The client files (manifest.CLIENT_FILES) a decoder's source directory holds, by role (genai_config.json is
    always written for the unit, never copied); each must be a file inside the directory (a symlink to elsewhere is
    refused, not copied into the unit)."""
    return {role: resolve_inside(directory, name, f"client file {name}", "copy the file itself into the directory",
                                 holder="model directory")
            for role, name in CLIENT_FILES.items()
            if role != "genai_config" and ((directory / name).is_file() or (directory / name).is_symlink())}


def _write_client_files(out: OutputDir, meta: OnnxMetadata, sources: dict[str, Path], onnx_file: str,
                        library_file: str) -> list[Artifact]:
    if meta.decoder is None:
        return []
    written = [Artifact.of(role, copy_artifact(path, out.claim(CLIENT_FILES[role]))) for role, path in sources.items()]
    if genai_refusal(meta.decoder) is not None:  # GenAI cannot describe it: no config rather than a wrong one
        return written
    config = genai_config(meta.decoder, onnx_file, library_file, read_generation_config(sources.get(
        "generation_config")))
    genai = out.claim(CLIENT_FILES["genai_config"])
    genai.write_text(json.dumps(config, indent=2) + "\n")
    return [*written, Artifact.of("genai_config", genai)]


@dataclass
class BuildOptions:
    flavour: str = "auto"  # "auto" (tensorrt if installed, else TensorRT-RTX), "tensorrt" or "rtx"
    compute_capabilities: tuple[str, ...] = DEFAULT_RTX_TARGETS  # TensorRT-RTX ahead-of-time targets
    profile: Profile = DEFAULT_ENGINE_PROFILE
    optimization_level: int | None = None  # builder optimisation level 0..5 (None: TensorRT's default, 3)
    timing_cache: str | None = None  # full TensorRT: loaded when it exists, saved after the build
    version_compatible: bool = False  # full TensorRT: engine runs on later TensorRT versions (lean runtime)
    hardware_compatible: bool = False  # full TensorRT: Ampere-and-newer compatible engine

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["profile"] = self.profile.to_dict()
        return data


def detect_flavour(preferred: str = "auto") -> str:
    """"tensorrt" when full TensorRT imports, else "rtx" when TensorRT-RTX does; BackendUnavailableError otherwise."""
    from pimoe_export.native.tensorrt_loader import import_tensorrt

    if preferred not in ("auto", "tensorrt", "rtx"):
        raise ArtifactError(f"unknown TensorRT flavour {preferred!r}; expected auto, tensorrt or rtx")
    candidates = ("tensorrt", "rtx") if preferred == "auto" else (preferred,)
    problems = []
    for flavour in candidates:
        try:
            import_tensorrt(flavour)
            return flavour
        except BackendUnavailableError as exc:
            problems.append(str(exc))
    raise BackendUnavailableError("no TensorRT builder is installed: " + " | ".join(problems))


def _configure(options: BuildOptions, flavour: str, cache_holder: dict[str, Any]):
    def configure(trt: Any, builder: Any, config: Any) -> None:
        if options.optimization_level is not None and hasattr(config, "builder_optimization_level"):
            config.builder_optimization_level = int(options.optimization_level)
        # TensorRT-RTX documents timing-cache operations as no-ops (it has no tactic timing): full TensorRT only
        if options.timing_cache and flavour == "tensorrt" and hasattr(config, "create_timing_cache"):
            path = Path(options.timing_cache)
            cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
            config.set_timing_cache(cache, ignore_mismatch=False)
            cache_holder["cache"] = cache
        if flavour == "tensorrt":
            if options.version_compatible:
                config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
            if options.hardware_compatible:
                config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS

    return configure


def _targets(flavour: str, options: BuildOptions, capabilities: tuple[str, ...]) -> list[str]:
    if flavour == "rtx":
        return [c.lower().replace("sm", "sm_") for c in capabilities]
    if options.hardware_compatible:
        return sm_names(CUDA_ARCHITECTURES)
    return [s for s in (local_gpu_sm(),) if s]


def build_unit(
    onnx_path: str | Path,
    unit_dir: str | Path,
    *,
    plugin_path: str | Path | None = None,
    options: BuildOptions | None = None,
    force: bool = False,
    client_dir: str | Path | None = None,
) -> Manifest:
    """Build a TensorRT (or TensorRT-RTX) engine unit from a custom-op ONNX. Needs a TensorRT builder.

    A decoder graph (``pimoe.decoder`` metadata) gets the two optimisation profiles of
    :func:`~pimoe_export.interface.decoder_profiles` (prefill and decode, up to the options' profile's batch and
    sequence), recorded with its DecoderSpec in the manifest, and its tokenizer and config files from ``client_dir``
    (default: the ONNX's directory; no genai_config.json: GenAI runs ONNX Runtime units).
    The engine is built before anything is written; ``unit_dir`` is an output directory (files in it that
    pimoe-export did not write are not replaced unless ``force``)."""
    from pimoe_export.build.engine_builder import build_engine, compute_capability
    from pimoe_export.native.tensorrt_loader import import_tensorrt

    options = options or BuildOptions()
    source = _source(onnx_path)
    onnx_path, meta = source.path, source.meta
    interface = _interface(meta)
    flavour = detect_flavour(options.flavour)
    trt = import_tensorrt(flavour)
    capabilities = options.compute_capabilities if flavour == "rtx" else ()
    for name in capabilities:  # before the (long) build
        compute_capability(trt, name)
    plugin = Path(plugin_path or find_plugin_library())
    check_plugin_library(str(plugin))
    out = OutputDir(unit_dir, force=force, command="build")
    holder: dict[str, Any] = {}
    decoder = meta.decoder
    sources = _decoder_sources(meta, onnx_path, client_dir)
    # every entry checked before the (long) build and before any is written: a refusal leaves nothing behind
    out.refuse_foreign(_unit_entries(source, ["model.engine", "libpimoe_trt_plugins.so"], sources, genai=False))
    if decoder is not None:
        profiles = decoder_profiles(decoder, options.profile.max_shape[0], options.profile.max_shape[1])
        plan, summary = build_engine(onnx_path, plugin, None, capabilities, strongly_typed=True, flavour=flavour,
                                     configure=_configure(options, flavour, holder),
                                     profiles=[p.shapes for p in profiles])
    else:
        profiles = ()
        plan, summary = build_engine(onnx_path, plugin, profile_shapes(options.profile, interface), capabilities,
                                     strongly_typed=True, flavour=flavour,
                                     configure=_configure(options, flavour, holder))
    if options.timing_cache and "cache" in holder:
        Path(options.timing_cache).write_bytes(bytes(memoryview(holder["cache"].serialize())))
    engine_path = out.claim("model.engine")
    engine_path.write_bytes(plan)
    graph = copy_onnx(onnx_path, out, data_files=source.data_files)
    plugin_copy = copy_artifact(plugin, out.claim("libpimoe_trt_plugins.so"))
    manifest_path = out.claim(MANIFEST_FILE)
    clients = [Artifact.of(role, copy_artifact(path, out.claim(CLIENT_FILES[role]))) for role, path in sources.items()]
    onnx_art = graph[0]
    manifest = Manifest(
        backend="tensorrt-rtx" if flavour == "rtx" else "tensorrt",
        contract_version=meta.contract_version or CONTRACT_VERSION,  # what the graph needs (a v1 graph: 1)
        precision=meta.precision,
        profile=options.profile,
        config=meta.config,
        artifacts=[Artifact.of("engine", engine_path), *graph, Artifact.of("plugin_library", plugin_copy),
                   *clients],
        backend_version=str(getattr(trt, "__version__", "")),
        target_sms=_targets(flavour, options, capabilities),
        build_options={**options.to_dict(), "flavour": flavour,
                       "timing_cache_used": "cache" in holder,
                       "plugin_layers": summary.plugin_counts(), "layers": summary.num_layers,
                       "strongly_typed": True, "build_host_gpu": local_gpu_sm()},
        io=interface.to_dict(),
        decoder=decoder.to_dict() if decoder is not None else {},
        profiles=[p.to_dict() for p in profiles],
        source_onnx_sha256=onnx_art.sha256,
    )
    manifest.write(manifest_path.parent)
    return manifest
