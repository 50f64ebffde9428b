"""`pimoe-export triton`: a Triton Inference Server model repository for a unit."""

from __future__ import annotations

import argparse
from pathlib import Path

from pimoe_export.cli._common import integer

NAME = "triton"
HELP = ("write a Triton Inference Server model repository (config.pbtxt, engine or ONNX, custom-op library, README) "
        "for a unit")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("unit_dir", type=Path, help="a unit directory (manifest.json): a TensorRT unit, or an "
                                               "onnxruntime unit (served on the CPU by Triton's ONNX Runtime backend)")
    p.add_argument("-o", "--output", required=True, type=Path, help="model repository to write into (REPO/)")
    p.add_argument("--name", help="model name = folder REPO/NAME (default: <pipeline dir>_<unit dir>)")
    p.add_argument("--max-batch-size", type=integer(0), default=0,
                   help="0 (default): batch is an explicit dim of every tensor; N > 0: Triton adds the batch dim "
                        "(N must fit the unit's profile)")
    p.add_argument("--instances", type=integer(1), default=1, help="instance_group count (default 1)")
    p.add_argument("--server-repo", default=None,
                   help="absolute path of REPO as tritonserver will see it (e.g. its mount point in the Triton "
                        "container); library paths in config.pbtxt/README use it (default: REPO here)")
    p.add_argument("--allow-rtx", action="store_true",
                   help="also write a repository for a TensorRT-RTX unit (Triton cannot load it; inspection only)")
    p.add_argument("--force", action="store_true", help="replace an existing REPO/NAME that pimoe-export did not write")


def run(args: argparse.Namespace) -> int:
    from pimoe_export.serve.triton import write_triton_repository

    model = write_triton_repository(
        args.unit_dir, args.output, name=args.name, max_batch_size=args.max_batch_size, instances=args.instances,
        server_repository=args.server_repo, allow_rtx=args.allow_rtx, force=args.force)
    print(f"wrote Triton model {model.name!r} ({model.platform}) to {model.model_dir}:")
    for path in (model.config, model.model_file, model.library, model.readme):
        print(f"  {path.relative_to(model.repository)}")
    for kind, specs in (("input", model.inputs), ("output", model.outputs)):
        for spec in specs:
            print(f"  {kind:6s} {spec.name:16s} {spec.data_type:10s} {list(spec.dims)}")
    print(f"  how to start tritonserver: {model.readme}")
    return 0

