"""`pimoe-export build`: a TensorRT / TensorRT-RTX engine unit (engine + plugins + ONNX + manifest)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pimoe_export.cli._common import add_force, integer, shape

NAME = "build"
HELP = "build a TensorRT / TensorRT-RTX engine unit (engine + plugins + manifest)"


def configure(p: argparse.ArgumentParser) -> None:
    from pimoe_export.interface import DEFAULT_ENGINE_PROFILE, DEFAULT_RTX_TARGETS

    p.add_argument("onnx", type=Path, help="custom-op ONNX (pimoe-export export / quantize)")
    p.add_argument("-o", "--output", required=True, type=Path, help="unit directory to write, e.g. engines/NAME/trt")
    p.add_argument("--plugins", type=Path,
                   help="libpimoe_trt_plugins.so (default: $PIMOE_TRT_PLUGINS or the build tree)")
    p.add_argument("--flavour", choices=("auto", "tensorrt", "rtx"), default="auto",
                   help="auto: TensorRT if installed, else TensorRT-RTX (ahead of time, no GPU needed)")
    p.add_argument("--sm", default=",".join(DEFAULT_RTX_TARGETS),
                   help="TensorRT-RTX targets, comma-separated SM names (default: %(default)s)")
    p.add_argument("--min-tokens", type=shape, default=DEFAULT_ENGINE_PROFILE.min_shape, help="profile minimum, BxS")
    p.add_argument("--opt-tokens", type=shape, default=DEFAULT_ENGINE_PROFILE.opt_shape, help="profile optimum, BxS")
    p.add_argument("--max-tokens", type=shape, default=DEFAULT_ENGINE_PROFILE.max_shape, help="profile maximum, BxS")
    p.add_argument("--opt-level", type=integer(0, 5), default=None, help="builder optimisation level 0..5")
    p.add_argument("--timing-cache", type=Path, help="timing cache file: loaded if present, saved after the build")
    p.add_argument("--version-compatible", action="store_true", help="(TensorRT) version-compatible engine")
    p.add_argument("--hardware-compatible", action="store_true", help="(TensorRT) Ampere+ compatible engine")
    add_force(p)


def run(args: argparse.Namespace) -> int:
    from pimoe_export.build.units import BuildOptions, build_unit
    from pimoe_export.interface import Profile

    options = BuildOptions(
        flavour=args.flavour, compute_capabilities=tuple(s.strip().upper() for s in args.sm.split(",") if s.strip()),
        profile=Profile(tuple(args.min_tokens), tuple(args.opt_tokens), tuple(args.max_tokens)),
        optimization_level=args.opt_level, timing_cache=str(args.timing_cache) if args.timing_cache else None,
        version_compatible=args.version_compatible, hardware_compatible=args.hardware_compatible,
    )
    manifest = build_unit(args.onnx, args.output, plugin_path=args.plugins, options=options, force=args.force)
    engine = manifest.artifact("engine")
    print(f"built {manifest.backend} {manifest.backend_version} engine ({manifest.precision}, targets "
          f"{manifest.target_sms or 'this GPU'}) in {args.output}: {engine.file}, {engine.bytes / 2**20:.1f} MiB; "
          f"plugin layers {manifest.build_options['plugin_layers']}")
    return 0
