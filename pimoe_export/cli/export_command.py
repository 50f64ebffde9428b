"""`pimoe-export export`: a checkpoint to ONNX (pimoe custom ops, or standard ops only)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pimoe_export.cli._common import add_force

NAME = "export"
HELP = "export a checkpoint to ONNX (pimoe custom ops, or --standard-ops)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", type=Path, help="checkpoint directory (pimoe-export create / save_pretrained), or "
                                                "a whole model (pimoe-export moefy): one graph with named inputs")
    p.add_argument("-o", "--output", required=True, type=Path, help="ONNX file to write")
    p.add_argument("--standard-ops", action="store_true", help="plugin-free graph (standard ONNX ops only)")
    p.add_argument("--fp16", action="store_true", help="fp16 inputs/outputs and expert weights (router stays fp32)")
    add_force(p)


def run(args: argparse.Namespace) -> int:
    from pimoe_export._files import output_onnx
    from pimoe_export.errors import PiMoEInputError
    from pimoe_export.export.exporter import export_source
    from pimoe_export.hf.importers import load_source

    source = load_source(args.model_dir)
    if args.standard_ops and not source.standard_ops:
        raise PiMoEInputError("--standard-ops exports a bare PiMoE layer; a whole model is exported with the pimoe "
                              "ops (drop --standard-ops)")
    path = output_onnx(args.output, force=args.force, command=NAME)
    result = export_source(source, path, precision="fp16" if args.fp16 else "fp32", standard_ops=args.standard_ops)
    pimoe_nodes = {k: v for k, v in result.node_counts.items() if k.startswith("pimoe::")}
    print(f"exported {result.graph} {result.precision} graph to {result.path} in {result.seconds:.1f} s")
    print(f"  pimoe nodes: {pimoe_nodes or 'none (standard ops)'}; {sum(result.node_counts.values())} nodes in all")
    return 0
