"""`pimoe-export create`: a PiMoE model from a preset, saved as a checkpoint (config.json + model.safetensors)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pimoe_export.cli._common import SEED, add_force

NAME = "create"
HELP = "create a PiMoE model from a preset and save it (config.json + model.safetensors)"


def configure(p: argparse.ArgumentParser) -> None:
    from pimoe_export.model.factory import PRESETS

    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("-o", "--output", required=True, type=Path, help="checkpoint directory to write")
    p.add_argument("--seed", type=SEED, default=0, help="weight initialisation seed (default 0)")
    add_force(p)


def run(args: argparse.Namespace) -> int:
    from pimoe_export._files import OutputDir
    from pimoe_export.model.factory import create_from_preset
    from pimoe_export.model.io import CONFIG_FILE, WEIGHTS_FILE

    out = OutputDir(args.output, force=args.force, command=NAME)
    out.refuse_foreign([CONFIG_FILE, WEIGHTS_FILE])  # both checked before either is claimed: nothing left behind
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        out.claim(name)
    model = create_from_preset(args.preset, seed=args.seed)
    model.save_pretrained(args.output)
    print(f"created preset {args.preset!r} (seed {args.seed}) in {args.output}")
    return 0
