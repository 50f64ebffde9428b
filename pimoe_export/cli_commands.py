"""`pimoe-export export | check | pipeline` (registered into pimoe_export.cli)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pimoe_export.cli import register_command


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for part in text.split(","):
        b, _, s = part.strip().partition("x")
        try:
            shapes.append((int(b), int(s)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"shapes must look like 1x1,2x16 (batch x sequence), got {text!r}"
            ) from None
    return shapes


# ---------------------------------------------------------------------------------------------- export
def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", type=Path, help="checkpoint directory (pimoe-export create / save_pretrained)")
    p.add_argument("-o", "--output", required=True, type=Path, help="ONNX file to write")
    p.add_argument("--standard-ops", action="store_true", help="plugin-free graph (standard ONNX ops only)")
    p.add_argument("--fp16", action="store_true", help="fp16 inputs/outputs and expert weights (router stays fp32)")


def _export(args: argparse.Namespace) -> int:
    from pimoe_export.export.onnx_export import export_onnx
    from pimoe_export.model.io import load_pretrained

    model = load_pretrained(args.model_dir)
    result = export_onnx(model, args.output, precision="fp16" if args.fp16 else "fp32",
                         standard_ops=args.standard_ops)
    pimoe_nodes = {k: v for k, v in result.node_counts.items() if k.startswith("pimoe::")}
    print(f"exported {result.graph} {result.precision} graph to {result.path} in {result.seconds:.1f} s")
    print(f"  pimoe nodes: {pimoe_nodes or 'none (standard ops)'}; {sum(result.node_counts.values())} nodes in all")
    return 0


# ---------------------------------------------------------------------------------------------- check
def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", type=Path, help="checkpoint directory holding the PyTorch reference")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--onnx", type=Path, help="exported (or quantised) ONNX to check on ONNX Runtime")
    target.add_argument("--unit", type=Path, help="a deployable unit (ONNX Runtime or TensorRT, see `inspect`)")
    p.add_argument("-o", "--output", type=Path, help="report directory (default: <onnx stem>_report next to it)")
    p.add_argument("--shapes", type=_parse_shapes, default=None, help="batch x sequence list, e.g. 1x1,2x16,4x64")
    p.add_argument("--seed", type=int, default=1234, help="input data seed")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("-v", "--verbose", action="store_true", help="show Polygraphy's comparison tables")


def _check(args: argparse.Namespace) -> int:
    from pimoe_export.model.io import load_pretrained
    from pimoe_export.validate.check import DEFAULT_SHAPES, check_onnx

    model = load_pretrained(args.model_dir)
    shapes = args.shapes or DEFAULT_SHAPES
    if args.unit is not None:
        from pimoe_export.validate.check import check_unit

        target = args.unit
        out_dir = args.output or args.unit / "report"
        report = check_unit(model, args.unit, out_dir, shapes=shapes, seed=args.seed, plots=not args.no_plots,
                            verbose=args.verbose)
    else:
        target = args.onnx
        out_dir = args.output or args.onnx.with_name(args.onnx.stem + "_report")
        report = check_onnx(model, args.onnx, out_dir, shapes=shapes, seed=args.seed, plots=not args.no_plots,
                            verbose=args.verbose)
    s = report.output_stats["output"]
    print(f"{'PASSED' if report.passed else 'FAILED'}: {target} ({report.precision}) vs PyTorch on {report.backend}")
    print(f"  output: max abs {s.max_abs:.3e}, mean abs {s.mean_abs:.3e}, rel L2 {s.rel_l2:.3e}, cosine {s.cosine:.8f}")
    verdict = "passed" if report.polygraphy_passed else "failed"
    print(f"  routing agreement {report.routing_agreement:.4%}; Polygraphy {verdict}")
    for failure in report.failures:
        print(f"  - {failure}")
    print(f"  report: {report.files['markdown']}")
    return 0 if report.passed else 1


# ---------------------------------------------------------------------------------------------- quantize
def _quantize_args(p: argparse.ArgumentParser) -> None:
    from pimoe_export.quantize.calibrate import METHODS

    p.add_argument("model_dir", type=Path, help="checkpoint directory")
    p.add_argument("-o", "--output", required=True, type=Path, help="INT8 ONNX to write (e.g. model.int8.onnx)")
    p.add_argument("--calib", default=None,
                   help="calibration data: .npz/.npy/.safetensors of [N, H] or [B, S, H] hidden states "
                        "(default: 4096 seeded standard-normal tokens)")
    p.add_argument("--method", choices=METHODS, default="entropy", help="activation threshold method")
    p.add_argument("--percentile", type=float, default=99.99, help="for --method percentile")
    p.add_argument("--dynamic", action="store_true", help="dynamic per-row activation scales")
    p.add_argument("--smooth-alpha", type=float, default=0.5,
                   help="SmoothQuant migration strength (0 disables; needs calibration data)")
    p.add_argument("--onnx", type=Path, help="reuse this fp32 custom-op export of the same checkpoint")
    p.add_argument("--calib-tokens", type=int, default=65536, help="use at most this many calibration tokens")


def _quantize(args: argparse.Namespace) -> int:
    from pimoe_export.model.io import load_pretrained
    from pimoe_export.quantize import quantize_model

    model = load_pretrained(args.model_dir)
    result = quantize_model(model, args.output, calibration=args.calib, method=args.method,
                            mode="w8a8_dynamic" if args.dynamic else "w8a8", percentile=args.percentile,
                            smooth_alpha=args.smooth_alpha,
                            fp32_onnx=args.onnx, max_tokens=args.calib_tokens, progress=True)
    info = result.params.info
    print(f"wrote {result.onnx_path} ({info['mode']}, activations: {info['method']}, "
          f"{info['calibration_tokens']} calibration tokens; router fp32)")
    if info["uncalibrated_experts"]:
        print(f"  warning: experts {info['uncalibrated_experts']} received no calibration token; they use their "
              f"group's widest range. Calibrate with more (or more varied) data.")
    print(f"  check it: pimoe-export check {args.model_dir} --onnx {result.onnx_path}")
    return 0


# ---------------------------------------------------------------------------------------------- build
def _build_args(p: argparse.ArgumentParser) -> None:
    from pimoe_export.build.units import DEFAULT_PROFILE, DEFAULT_RTX_TARGETS

    p.add_argument("onnx", type=Path, help="custom-op ONNX (pimoe-export export / quantize)")
    p.add_argument("-o", "--output", required=True, type=Path, help="unit directory to write, e.g. engines/NAME/trt")
    p.add_argument("--plugins", type=Path,
                   help="libpimoe_trt_plugins.so (default: $PIMOE_TRT_PLUGINS or the build tree)")
    p.add_argument("--flavour", choices=("auto", "tensorrt", "rtx"), default="auto",
                   help="auto: TensorRT if installed, else TensorRT-RTX (ahead of time, no GPU needed)")
    p.add_argument("--sm", default=",".join(DEFAULT_RTX_TARGETS), help="TensorRT-RTX targets, e.g. SM80,SM86,SM89")
    shape = lambda text: _parse_shapes(text)[0]  # noqa: E731
    p.add_argument("--min-tokens", type=shape, default=DEFAULT_PROFILE.min_shape, help="profile minimum, BxS")
    p.add_argument("--opt-tokens", type=shape, default=DEFAULT_PROFILE.opt_shape, help="profile optimum, BxS")
    p.add_argument("--max-tokens", type=shape, default=DEFAULT_PROFILE.max_shape, help="profile maximum, BxS")
    p.add_argument("--opt-level", type=int, choices=range(6), default=None, help="builder optimisation level")
    p.add_argument("--timing-cache", type=Path, help="timing cache file: loaded if present, saved after the build")
    p.add_argument("--version-compatible", action="store_true", help="(TensorRT) version-compatible engine")
    p.add_argument("--hardware-compatible", action="store_true", help="(TensorRT) Ampere+ compatible engine")


def _build(args: argparse.Namespace) -> int:
    from pimoe_export.build.manifest import Profile
    from pimoe_export.build.units import BuildOptions, build_unit

    options = BuildOptions(
        flavour=args.flavour, compute_capabilities=tuple(s.strip().upper() for s in args.sm.split(",") if s.strip()),
        profile=Profile(tuple(args.min_tokens), tuple(args.opt_tokens), tuple(args.max_tokens)),
        optimization_level=args.opt_level, timing_cache=str(args.timing_cache) if args.timing_cache else None,
        version_compatible=args.version_compatible, hardware_compatible=args.hardware_compatible,
    )
    manifest = build_unit(args.onnx, args.output, plugin_path=args.plugins, options=options)
    engine = manifest.artifact("engine")
    print(f"built {manifest.backend} {manifest.backend_version} engine ({manifest.precision}, targets "
          f"{manifest.target_sms or 'this GPU'}) in {args.output}: {engine.file}, {engine.bytes / 2**20:.1f} MiB; "
          f"plugin layers {manifest.build_options['plugin_layers']}")
    return 0


# ---------------------------------------------------------------------------------------------- inspect
def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("unit_dir", type=Path, help="a unit directory (holding manifest.json)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")


def _inspect(args: argparse.Namespace) -> int:
    from pimoe_export.build.manifest import read_manifest, verify
    from pimoe_export.errors import ArtifactError

    manifest = read_manifest(args.unit_dir)
    try:
        verify(args.unit_dir)
        status = "verified: every artefact matches its sha256"
    except ArtifactError as exc:
        status = f"NOT VALID: {exc}"
    if args.json:
        print(json.dumps({**manifest.to_dict(), "verification": status}, indent=2))
        return 0 if status.startswith("verified") else 1
    m = manifest
    print(f"{args.unit_dir}: {m.backend} {m.backend_version}, {m.precision}, op contract v{m.contract_version}")
    print(f"  targets: {m.target_sms or 'any CPU'}; profile [batch, seq] min {m.profile.min_shape} "
          f"opt {m.profile.opt_shape} max {m.profile.max_shape}")
    print(f"  model: H={m.config['hidden_size']}, E={m.config['num_experts']}, k={m.config['top_k']}")
    for art in m.artifacts:
        print(f"  {art.role:15s} {art.file:28s} {art.bytes / 2**20:8.2f} MiB  sha256 {art.sha256[:16]}…")
    for kind in ("inputs", "outputs"):
        for name, dtype, shape in m.io.get(kind, []):
            print(f"  {kind[:-1]:6s} {name:16s} {dtype or '(as input)':10s} {shape}")
    print(f"  {status}")
    return 0 if status.startswith("verified") else 1


# ---------------------------------------------------------------------------------------------- pipeline
def _pipeline_args(p: argparse.ArgumentParser) -> None:
    from pimoe_export.model.factory import PRESETS

    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS), help="create the model from a preset")
    source.add_argument("--model", type=Path, help="use an existing checkpoint directory")
    p.add_argument("-o", "--output", required=True, type=Path, help="output directory, e.g. engines/seed-512")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed for --preset")
    p.add_argument("--bench-repeats", type=int, default=20, help="timed runs per benchmark point (median)")
    p.add_argument("--quiet", action="store_true", help="no progress display")


def _pipeline(args: argparse.Namespace) -> int:
    from pimoe_export.pipeline import run_pipeline

    summary = run_pipeline(
        output=args.output, preset=args.preset, model_dir=args.model, seed=args.seed,
        bench_repeats=args.bench_repeats, progress=not args.quiet,
    )
    print(json.dumps({"passed": summary["passed"], "summary": str(args.output / "pipeline.json")}))
    return 0 if summary["passed"] else 1


register_command("export", "export a checkpoint to ONNX (pimoe custom ops, or --standard-ops)", _export_args, _export)
register_command("check", "compare an ONNX graph with the PyTorch reference (Polygraphy) and write a report",
                 _check_args, _check)
register_command("quantize", "calibrate and write the W8A8 INT8 ONNX (experts int8, router fp32)",
                 _quantize_args, _quantize)
register_command("build", "build a TensorRT / TensorRT-RTX engine unit (engine + plugins + manifest)",
                 _build_args, _build)
register_command("inspect", "show and verify a unit's manifest and I/O", _inspect_args, _inspect)
register_command("pipeline", "the whole job: model -> ONNX -> (INT8) -> engines/runtime -> parity report -> benchmark",
                 _pipeline_args, _pipeline)
