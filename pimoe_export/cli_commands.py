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
    p.add_argument("--onnx", required=True, type=Path, help="exported (or quantised) ONNX to check")
    p.add_argument("-o", "--output", type=Path, help="report directory (default: <onnx stem>_report next to it)")
    p.add_argument("--shapes", type=_parse_shapes, default=None, help="batch x sequence list, e.g. 1x1,2x16,4x64")
    p.add_argument("--seed", type=int, default=1234, help="input data seed")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("-v", "--verbose", action="store_true", help="show Polygraphy's comparison tables")


def _check(args: argparse.Namespace) -> int:
    from pimoe_export.model.io import load_pretrained
    from pimoe_export.validate.check import DEFAULT_SHAPES, check_onnx

    model = load_pretrained(args.model_dir)
    out_dir = args.output or args.onnx.with_name(args.onnx.stem + "_report")
    report = check_onnx(model, args.onnx, out_dir, shapes=args.shapes or DEFAULT_SHAPES, seed=args.seed,
                        plots=not args.no_plots, verbose=args.verbose)
    s = report.output_stats["output"]
    print(f"{'PASSED' if report.passed else 'FAILED'}: {args.onnx} ({report.precision}) vs PyTorch on {report.backend}")
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
register_command("pipeline", "the whole job: model -> ONNX -> (INT8) -> engines/runtime -> parity report -> benchmark",
                 _pipeline_args, _pipeline)
