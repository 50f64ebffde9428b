"""`pimoe-export package`: an ONNX Runtime unit (model.onnx + libpimoe_ort.so + manifest) from an exported graph."""

from __future__ import annotations

import argparse
from pathlib import Path

from pimoe_export.cli._common import add_force

NAME = "package"
HELP = "package an exported (or INT8) ONNX as an ONNX Runtime unit with the op library and a manifest"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("onnx", type=Path, help="custom-op ONNX (pimoe-export export / quantize)")
    p.add_argument("-o", "--output", required=True, type=Path, help="unit directory to write, e.g. engines/NAME/ort")
    p.add_argument("--library", type=Path, help="libpimoe_ort.so to ship (default: $PIMOE_ORT_LIBRARY or the build "
                                                "tree)")
    add_force(p)


def run(args: argparse.Namespace) -> int:
    from pimoe_export.build.units import package_ort

    manifest = package_ort(args.onnx, args.output, library=args.library, force=args.force)
    print(f"packaged {manifest.precision} ONNX Runtime unit in {args.output} (op library: "
          f"{manifest.build_options['cpu_isa']} kernels); verify it with `pimoe-export inspect {args.output}`")
    return 0
