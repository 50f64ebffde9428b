"""Create deployable units: ONNX Runtime units (CPU) and TensorRT / TensorRT-RTX engine units.

Engine units are built through the TensorRT Python API from the custom-op ONNX with our plugin library
(:func:`pimoe_export.build.tensorrt.build_engine`): strongly typed network, an optimisation profile over
``hidden_states`` [batch, sequence, H], builder optimisation level, a timing cache that is loaded and saved,
and version/hardware-compatibility options. With TensorRT-RTX the same code builds ahead of time for chosen
compute capabilities on a machine without a GPU; with full TensorRT it builds for the local GPU.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pimoe_export.build.manifest import Artifact, Manifest, Profile, copy_artifact
from pimoe_export.errors import ArtifactError, BackendUnavailableError

DEFAULT_PROFILE = Profile(min_shape=(1, 1), opt_shape=(1, 64), max_shape=(8, 512))
#: TensorRT-RTX ahead-of-time targets among the project's architectures (RTX has no SM90 target; Hopper engines
#: come from full TensorRT in the docker/ image). SM87 (Jetson Orin) is not an RTX target either.
DEFAULT_RTX_TARGETS = ("SM80", "SM86", "SM89")


def onnx_metadata(onnx_path: str | Path) -> dict[str, str]:
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def _config_from_meta(meta: dict[str, str], onnx_path: Path) -> dict[str, Any]:
    if "pimoe.config" not in meta:
        raise ArtifactError(f"{onnx_path} carries no pimoe.config metadata: export it with `pimoe-export export`")
    return json.loads(meta["pimoe.config"])


def package_ort(
    onnx_path: str | Path,
    unit_dir: str | Path,
    *,
    library: str | Path | None = None,
    profile: Profile | None = None,
    move: bool = False,
) -> Manifest:
    """An ONNX Runtime unit: the ONNX (copied, or moved with ``move``) + libpimoe_ort + manifest."""
    from pimoe_export.runtime.ort import check_ort_library, find_ort_library

    onnx_path = Path(onnx_path)
    unit_dir = Path(unit_dir)
    unit_dir.mkdir(parents=True, exist_ok=True)
    meta = onnx_metadata(onnx_path)
    config = _config_from_meta(meta, onnx_path)
    lib = Path(library or find_ort_library())
    info = check_ort_library(str(lib))
    target = unit_dir / "model.onnx"
    if move and onnx_path.resolve() != target.resolve():
        onnx_path.replace(target)
    else:
        copy_artifact(onnx_path, unit_dir, "model.onnx")
    lib_copy = copy_artifact(lib, unit_dir, "libpimoe_ort.so")
    import onnxruntime as ort

    manifest = Manifest(
        backend="onnxruntime",
        precision=meta.get("pimoe.precision", "fp32"),
        profile=profile or Profile((1, 1), (1, 64), (256, 8192)),
        config=config,
        artifacts=[Artifact.of(unit_dir, "onnx", target), Artifact.of(unit_dir, "ort_library", lib_copy)],
        backend_version=ort.__version__,
        build_options={"cpu_isa": info["cpu_isa"]},
        io={"inputs": [["hidden_states", "float16" if meta.get("pimoe.precision") == "fp16" else "float32",
                        ["batch", "sequence", config["hidden_size"]]]],
            "outputs": [["output", "", ["batch", "sequence", config["hidden_size"]]],
                        ["expert_ids", "int32", ["batch", "sequence", config["top_k"]]],
                        ["expert_weights", "float32", ["batch", "sequence", config["top_k"]]]]},
        source_onnx_sha256=Artifact.of(unit_dir, "onnx", target).sha256,
    )
    manifest.write(unit_dir)
    return manifest


@dataclass
class BuildOptions:
    flavour: str = "auto"  # "auto" (tensorrt if installed, else TensorRT-RTX), "tensorrt" or "rtx"
    compute_capabilities: tuple[str, ...] = DEFAULT_RTX_TARGETS  # TensorRT-RTX ahead-of-time targets
    profile: Profile = DEFAULT_PROFILE
    optimization_level: int | None = None  # builder optimisation level 0..5 (None: TensorRT's default, 3)
    timing_cache: str | None = None  # full TensorRT: loaded when it exists, saved after the build
    version_compatible: bool = False  # full TensorRT: engine runs on later TensorRT versions (lean runtime)
    hardware_compatible: bool = False  # full TensorRT: Ampere-and-newer compatible engine

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["profile"] = asdict(self.profile)
        return data


def detect_flavour(preferred: str = "auto") -> str:
    """"tensorrt" when full TensorRT imports, else "rtx" when TensorRT-RTX does; BackendUnavailableError otherwise."""
    from pimoe_export.build.tensorrt import import_tensorrt

    candidates = ("tensorrt", "rtx") if preferred == "auto" else (preferred,)
    problems = []
    for flavour in candidates:
        try:
            import_tensorrt(flavour)
            return flavour
        except BackendUnavailableError as exc:
            problems.append(str(exc))
    raise BackendUnavailableError("no TensorRT builder is installed: " + " | ".join(problems))


def local_gpu_sm() -> str | None:
    """The first GPU's compute capability as "sm_XY" (nvidia-smi), or None without a GPU/driver."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    major, _, minor = out[0].strip().partition(".")
    return f"sm_{major}{minor}" if major.isdigit() else None


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


def build_unit(
    onnx_path: str | Path,
    unit_dir: str | Path,
    *,
    plugin_path: str | Path | None = None,
    options: BuildOptions | None = None,
) -> Manifest:
    """Build a TensorRT (or TensorRT-RTX) engine unit from a custom-op ONNX. Needs a TensorRT builder."""
    from pimoe_export.build.tensorrt import build_engine, check_plugin_library, find_plugin_library, import_tensorrt

    options = options or BuildOptions()
    onnx_path = Path(onnx_path)
    unit_dir = Path(unit_dir)
    if not onnx_path.is_file():
        raise ArtifactError(f"{onnx_path} does not exist; export it with `pimoe-export export`")
    meta = onnx_metadata(onnx_path)
    config = _config_from_meta(meta, onnx_path)
    flavour = detect_flavour(options.flavour)
    trt = import_tensorrt(flavour)
    plugin = Path(plugin_path or find_plugin_library())
    check_plugin_library(str(plugin))
    hidden = int(config["hidden_size"])
    p = options.profile
    profile = {"hidden_states": ((*p.min_shape, hidden), (*p.opt_shape, hidden), (*p.max_shape, hidden))}
    holder: dict[str, Any] = {}
    capabilities = options.compute_capabilities if flavour == "rtx" else ()
    plan, summary = build_engine(onnx_path, plugin, profile, capabilities, strongly_typed=True, flavour=flavour,
                                 configure=_configure(options, flavour, holder))
    if options.timing_cache and "cache" in holder:
        Path(options.timing_cache).write_bytes(bytes(memoryview(holder["cache"].serialize())))
    unit_dir.mkdir(parents=True, exist_ok=True)
    engine_path = unit_dir / "model.engine"
    engine_path.write_bytes(plan)
    onnx_copy = copy_artifact(onnx_path, unit_dir, "model.onnx")
    plugin_copy = copy_artifact(plugin, unit_dir, "libpimoe_trt_plugins.so")
    if flavour == "rtx":
        targets = [c.lower().replace("sm", "sm_") for c in capabilities]
    elif options.hardware_compatible:
        targets = ["sm_80", "sm_86", "sm_87", "sm_89", "sm_90"]
    else:
        targets = [s for s in (local_gpu_sm(),) if s]
    manifest = Manifest(
        backend="tensorrt-rtx" if flavour == "rtx" else "tensorrt",
        precision=meta.get("pimoe.precision", "fp32"),
        profile=p,
        config=config,
        artifacts=[Artifact.of(unit_dir, "engine", engine_path), Artifact.of(unit_dir, "onnx", onnx_copy),
                   Artifact.of(unit_dir, "plugin_library", plugin_copy)],
        backend_version=str(getattr(trt, "__version__", "")),
        target_sms=targets,
        build_options={**options.to_dict(), "flavour": flavour,
                       "timing_cache_used": "cache" in holder,
                       "plugin_layers": summary.plugin_counts(), "layers": summary.num_layers,
                       "strongly_typed": True, "build_host_gpu": local_gpu_sm()},
        io={"inputs": [list(t) for t in summary.inputs], "outputs": [list(t) for t in summary.outputs]},
        source_onnx_sha256=Artifact.of(unit_dir, "onnx", onnx_copy).sha256,
    )
    manifest.write(unit_dir)
    return manifest
