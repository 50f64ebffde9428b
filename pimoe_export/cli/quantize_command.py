"""`pimoe-export quantize`: calibrate and write the W8A8 INT8 ONNX (experts int8, router fp32)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pimoe_export.cli._common import add_force, integer, number

NAME = "quantize"
HELP = "calibrate and write the W8A8 INT8 ONNX (experts int8, router fp32)"


def configure(p: argparse.ArgumentParser) -> None:
    from pimoe_export.quantize.calibrate import METHODS

    p.add_argument("model_dir", type=Path, help="checkpoint directory (a PiMoE layer, or a whole model written by "
                                                "`pimoe-export moefy`)")
    p.add_argument("-o", "--output", required=True, type=Path, help="INT8 ONNX to write (e.g. model.int8.onnx)")
    p.add_argument("--calib", default=None,
                   help="calibration data: .npz/.npy/.safetensors of [N, H] or [B, S, H] hidden states "
                        "(default: 4096 seeded standard-normal tokens); for a whole text model, a text file with "
                        "one sentence per line (default: 4 of 5 seeded random token batches)")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="activation threshold method (default: the checkpoint's recorded deployment setting: mse "
                        "for Hugging Face decoders, else entropy)")
    p.add_argument("--percentile", type=number(0, 100, open_low=True), default=99.99,
                   help="for --method percentile, in (0, 100]")
    p.add_argument("--dynamic", action="store_true", help="dynamic per-row activation scales")
    p.add_argument("--smooth-alpha", type=number(0, 1), default=0.5,
                   help="SmoothQuant migration strength in [0, 1] (0 disables; needs calibration data)")
    p.add_argument("--onnx", type=Path, help="reuse this fp32 custom-op export of the same checkpoint")
    p.add_argument("--calib-tokens", type=integer(1), default=65536, help="use at most this many calibration tokens")
    add_force(p)


def run(args: argparse.Namespace) -> int:
    from pimoe_export._files import output_onnx
    from pimoe_export.hf.importers import load_source
    from pimoe_export.quantize import check_settings, default_fp32_path, quantize_model

    mode = "w8a8_dynamic" if args.dynamic else "w8a8"
    source = load_source(args.model_dir)
    method = args.method or source.settings.calibration_method  # what the pipeline calibrates this source with
    check_settings(method=method, mode=mode, percentile=args.percentile, smooth_alpha=args.smooth_alpha,
                   max_tokens=args.calib_tokens)
    path = output_onnx(args.output, force=args.force, command=NAME)
    if args.onnx is None:  # the fp32 export written next to the output
        output_onnx(default_fp32_path(path), force=args.force, command=NAME)
    result = quantize_model(source, path, calibration=args.calib, method=method, mode=mode,
                            percentile=args.percentile, smooth_alpha=args.smooth_alpha, fp32_onnx=args.onnx,
                            max_tokens=args.calib_tokens, progress=True)
    summary = result.summary()
    print(f"wrote {result.onnx_path} ({summary['mode']}, activations: {summary['method']}, "
          f"{summary['calibration_tokens']} calibration tokens; router fp32)")
    for layer, experts in summary["uncalibrated_experts"].items():
        where = f" of {layer}" if layer else ""
        print(f"  warning: experts {experts}{where} received no calibration token; they use their group's widest "
              "range. Calibrate with more (or more varied) data.")
    print(f"  check it: pimoe-export check {args.model_dir} --onnx {result.onnx_path}")
    return 0
