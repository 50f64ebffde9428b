"""`pimoe-export pipeline`: the whole job into one output directory (see pimoe_export.pipeline)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pimoe_export.cli._common import SEED, add_force, integer

NAME = "pipeline"
HELP = "the whole job: model -> ONNX -> (INT8) -> engines/runtime -> parity report -> benchmark"


def configure(p: argparse.ArgumentParser) -> None:
    from pimoe_export.model.factory import PRESETS

    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS), help="create the model from a preset")
    source.add_argument("--model", type=Path, help="use an existing checkpoint directory (a PiMoE layer), or a whole "
                                                   "model written by `pimoe-export moefy`")
    p.add_argument("-o", "--output", required=True, type=Path, help="output directory, e.g. engines/seed-512")
    p.add_argument("--seed", type=SEED, default=0, help="initialisation seed for --preset")
    p.add_argument("--bench-repeats", type=integer(1), default=20, help="timed runs per benchmark point (median)")
    p.add_argument("--calib", type=Path, help="whole models: a text file (one sentence per line) through the "
                                              "model's tokenizer; 4 of 5 lines calibrate INT8, 1 of 5 is held out "
                                              "for the parity checks (default: seeded random token ids)")
    p.add_argument("--int8-mode", choices=("w8a8", "w8a8_dynamic"), default="w8a8",
                   help="INT8 activation scales: static from calibration (w8a8) or per row at run time "
                        "(w8a8_dynamic)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    add_force(p)


def run(args: argparse.Namespace) -> int:
    from pimoe_export.pipeline import run_pipeline

    if args.model is not None:  # read (and validate) the model before the output is touched
        from pimoe_export.hf.importers import check_source

        check_source(args.model, args.calib)
    elif args.calib is not None:
        from pimoe_export.errors import PiMoEInputError

        raise PiMoEInputError("--calib applies to whole models (a `pimoe-export moefy` directory); a PiMoE layer "
                              "preset calibrates on seeded hidden states")
    summary = run_pipeline(output=args.output, preset=args.preset, model_dir=args.model, seed=args.seed,
                           bench_repeats=args.bench_repeats, progress=not args.quiet, force=args.force,
                           calib_text=args.calib, int8_mode=args.int8_mode)
    print(json.dumps({"passed": summary["passed"], "summary": str(args.output / "pipeline.json")}))
    return 0 if summary["passed"] else 1
