"""`pimoe-export` command line.

Subcommands are registered from small functions; heavy imports happen inside each command so that
`pimoe-export --help` is instant and commands that need only ONNX Runtime never import torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pimoe_export.errors import PiMoEError

Configure = Callable[[argparse.ArgumentParser], None]
Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Configure, Command, str]] = {}


def register_command(name: str, help_text: str, configure: Configure, run: Command) -> None:
    """Add a subcommand: ``configure`` adds its arguments, ``run`` executes it and returns the exit code."""
    _COMMANDS[name] = (configure, run, help_text)


# ---------------------------------------------------------------------------------------------- create
def _create_args(p: argparse.ArgumentParser) -> None:
    from pimoe_export.model.factory import PRESETS

    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("-o", "--output", required=True, type=Path, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")


def _create(args: argparse.Namespace) -> int:
    from pimoe_export.model.factory import create_from_preset

    model = create_from_preset(args.preset, seed=args.seed)
    model.save_pretrained(args.output)
    print(f"created preset {args.preset!r} (seed {args.seed}) in {args.output}")
    return 0


# ---------------------------------------------------------------------------------------------- info
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _info(args: argparse.Namespace) -> int:
    from pimoe_export.model.config import PiMoEConfig
    from pimoe_export.model.io import read_checkpoint_config
    from pimoe_export.model.summary import summarize

    payload = read_checkpoint_config(args.model_dir)
    config = PiMoEConfig.from_dict(payload["config"])
    summary = summarize(config)
    if args.json:
        print(json.dumps({"architecture": payload["architecture"], "config": config.to_dict(), **summary}, indent=2))
        return 0
    print(f"{args.model_dir}: {payload['architecture']}")
    print("config:")
    for key, value in config.to_dict().items():
        if key != "metadata":
            print(f"  {key:26s} {value}")
    print(f"parameters: {summary['params_total']:,} total, router {summary['params_router']:,}")
    print("  per type:")
    for name, entry in summary["params_per_type"].items():
        print(f"    {name:14s} {entry['experts']} expert(s), {entry['params']:,} params")
    print("  per expert:")
    for row in summary["params_per_expert"]:
        widths = "-".join(map(str, row["widths"]))
        print(f"    {row['expert']:4d} {row['type']:14s} {widths:22s} {row['activation']:9s} "
              f"{row['params']:>12,} params {row['flops_per_token']:>12,} FLOP/token")
    flops = summary["flops_per_token"]
    print(f"FLOPs per token: router {flops['router']:,}; active (uniform routing, k={config.top_k}) "
          f"{flops['active_expected']:,.0f}; worst case {flops['active_worst_case']:,}; "
          f"all experts {flops['dense_all_experts']:,}")
    print(f"expert groups (one PiMoEExpertMLP node each): {[g['experts'] for g in summary['expert_groups']]}")
    return 0


register_command("create", "create a PiMoE model from a preset and save it (config.json + model.safetensors)",
                 _create_args, _create)
register_command("info", "print a checkpoint's config, parameters per expert/type and FLOPs per token",
                 _info_args, _info)


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    _load_command_modules()
    parser = argparse.ArgumentParser(
        prog="pimoe-export",
        description="PiMoE from PyTorch to ONNX custom ops, INT8 and TensorRT plugins, with parity checks.",
    )
    from pimoe_export import __version__

    parser.add_argument("--version", action="version", version=f"pimoe-export {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (configure, _, help_text) in _COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _load_command_modules() -> None:
    """Import modules that register further subcommands (kept out of this file to stay small)."""
    import importlib

    for module in ("pimoe_export.cli_commands", "pimoe_export.cli_triton"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _, run, _ = _COMMANDS[args.command]
    try:
        return run(args)
    except PiMoEError as exc:
        print(f"pimoe-export {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
