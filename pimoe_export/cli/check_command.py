"""`pimoe-export check`: the PyTorch reference against an ONNX graph or a deployable unit (Polygraphy)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pimoe_export.cli._common import SEED, add_force, shapes
from pimoe_export.errors import PiMoEInputError

NAME = "check"
HELP = "compare an ONNX graph or a unit with the PyTorch reference (Polygraphy) and write a report; exit 1 on failure"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", type=Path, help="checkpoint directory holding the PyTorch reference (a PiMoE layer, "
                                                "or a whole model written by `pimoe-export moefy`)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--onnx", type=Path, help="exported (or quantised) ONNX to check on ONNX Runtime")
    target.add_argument("--unit", type=Path, help="a deployable unit (verified, then run as it ships)")
    p.add_argument("-o", "--output", type=Path, help="report directory (default: <onnx stem>_report next to it, or "
                                                     "<unit>/report)")
    p.add_argument("--shapes", type=shapes, default=None, help="batch x sequence list, e.g. 1x1,2x16,4x64")
    p.add_argument("--seed", type=SEED, default=1234, help="input data seed")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("-v", "--verbose", action="store_true", help="show Polygraphy's comparison tables")
    add_force(p)


def run(args: argparse.Namespace) -> int:
    from pimoe_export.artifacts.manifest import read_manifest
    from pimoe_export.hf.importers import load_source
    from pimoe_export.validate.check import DEFAULT_SHAPES, check_onnx, check_unit

    source = load_source(args.model_dir)
    model = source.module
    if args.unit is not None and read_manifest(args.unit).decoder:
        return _check_decoder(model, args)
    options = {"shapes": args.shapes or DEFAULT_SHAPES, "seed": args.seed, "plots": not args.no_plots,
               "verbose": args.verbose, "force": args.force, "feeds": source.evaluation}
    if args.unit is not None:
        target = args.unit
        report = check_unit(model, args.unit, args.output or args.unit / "report", **options)
    else:
        target = args.onnx
        report = check_onnx(model, args.onnx, args.output or args.onnx.with_name(args.onnx.stem + "_report"),
                            **options)
    s = report.output_stats[report.primary]
    print(f"{'PASSED' if report.passed else 'FAILED'}: {target} ({report.precision}) vs PyTorch on {report.backend}")
    print(f"  {report.primary}: max abs {s.max_abs:.3e}, mean abs {s.mean_abs:.3e}, rel L2 {s.rel_l2:.3e}, "
          f"cosine {s.cosine:.8f}")
    verdict = "passed" if report.polygraphy_passed else "failed"
    print(f"  routing agreement {report.routing_agreement:.4%}; Polygraphy {verdict}")
    for failure in report.failures:
        print(f"  - {failure}")
    print(f"  report: {report.files['markdown']}")
    return 0 if report.passed else 1


def _check_decoder(model: object, args: argparse.Namespace) -> int:
    """A decoder unit: teacher-forced per-step logits and greedy tokens against the PyTorch model
    (pimoe_export/validate/generation.py)."""
    from pimoe_export.runtime.engine import Engine
    from pimoe_export.validate.generation import (
        check_generation,
        seeded_prompts,
        torch_reference,
        write_generation_report,
    )

    with Engine.load(args.unit) as engine:
        spec = engine.decoder_spec
        assert spec is not None
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab != spec.vocab_size:
            what = f"has a vocabulary of {vocab}" if vocab else "is not a decoder language model"
            raise PiMoEInputError(f"{args.unit} is a decoder unit with a vocabulary of {spec.vocab_size}, but "
                                  f"{args.model_dir} {what}; check the unit against the model it was exported from")
        report = check_generation(engine, torch_reference(model), seeded_prompts(spec.vocab_size, args.seed))
    files = write_generation_report(report, args.output or args.unit / "report", force=args.force)
    print(f"{'PASSED' if report.passed else 'FAILED'}: {args.unit} ({report.precision}) vs PyTorch, step by step")
    for i, p in enumerate(report.prompts):
        diverged = "identical greedy tokens" if p.first_divergence is None else \
            f"greedy tokens diverge at step {p.first_divergence}"
        print(f"  prompt {i}: {len(p.step_cosine)} positions, worst logits cosine {min(p.step_cosine):.8f}; {diverged}")
    for failure in report.failures:
        print(f"  - {failure}")
    print(f"  report: {files['markdown']}")
    return 0 if report.passed else 1
