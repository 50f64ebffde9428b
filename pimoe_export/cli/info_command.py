"""`pimoe-export info`: a checkpoint's config, parameters per expert and type, and FLOPs per token."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "info"
HELP = "print a checkpoint's config, parameters per expert/type and FLOPs per token"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _block(args: argparse.Namespace, payload: dict) -> int:
    """A MoE block checkpoint (``create --preset mixtral-ffn``): its config, parameters, FLOPs and groups."""
    from pimoe_export.model.moe_block import MoEBlockConfig
    from pimoe_export.model.summary import summarize_block

    config = MoEBlockConfig.from_dict(payload["config"])
    summary = summarize_block(config)
    if args.json:
        print(json.dumps({"architecture": payload["architecture"], "config": config.to_dict(), **summary}, indent=2))
        return 0
    print(f"{args.model_dir}: {payload['architecture']} ({config.family or 'MoE block'})")
    print("config:")
    for key, value in config.to_dict().items():
        if key not in ("metadata", "kind"):
            print(f"  {key:26s} {value}")
    flops = summary["flops_per_token"]
    print(f"parameters: {summary['params_total']:,} total, router {summary['params_router']:,}, "
          f"{summary['params_per_expert']:,} per routed expert")
    print(f"FLOPs per token: router {flops['router']:,}; active (k={config.top_k}) {flops['active_expected']:,}; "
          f"all experts {flops['dense_all_experts']:,}")
    print(f"expert groups (one PiMoEExpertMLP node each): {[g['experts'] for g in summary['expert_groups']]}")
    return 0


def run(args: argparse.Namespace) -> int:
    from pimoe_export.model.config import PiMoEConfig
    from pimoe_export.model.io import read_checkpoint_config
    from pimoe_export.model.moe_block import is_block_config
    from pimoe_export.model.summary import summarize

    payload = read_checkpoint_config(args.model_dir)
    if is_block_config(payload["config"]):
        return _block(args, payload)
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
