"""`pimoe-export moefy`: a Hugging Face BERT-family encoder with PiMoE feed-forward blocks (hf/moefy.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pimoe_export.cli._common import SEED, add_force, integer

REPORT = "moefy_report.json"

NAME = "moefy"
HELP = "turn a Hugging Face BERT-family encoder's feed-forward blocks into PiMoE layers"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_model_dir", type=Path, help="a Hugging Face model directory (config.json + safetensors)")
    p.add_argument("-o", "--output", required=True, type=Path, help="directory for the MoEfied model")
    p.add_argument("--experts", type=integer(2, 1024), default=8, help="experts per layer (divides the FFN width)")
    p.add_argument("--top-k", type=integer(1, 16), default=2, help="experts per token")
    p.add_argument("--calib", type=Path, help="text file, one sentence per line, through the model's tokenizer "
                                              "(default: seeded random token ids: a weak stand-in)")
    p.add_argument("--finetune-epochs", type=integer(0), default=0,
                   help="epochs of whole-model distillation from the original (experts only, routers frozen)")
    p.add_argument("--routing-noise", type=non_negative, default=1.5,
                   help="noisy top-k while distilling: noise = this x each token's router-logit std (0: none)")
    p.add_argument("--seed", type=SEED, default=0, help="clustering and router-training seed")
    add_force(p)


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0")
    return value


def _split(args: argparse.Namespace, vocab_size: int) -> tuple[list, list, str]:
    """(training feeds, held-out feeds, a description): the text's lines 4:1 by position (held out: every fifth,
    when there are at least 5), or seeded random token ids."""
    from pimoe_export.hf.feeds import random_feeds, read_lines, text_feeds

    if args.calib is None:
        return random_feeds(vocab_size, args.seed), random_feeds(vocab_size, args.seed + 1, ((4, 24),) * 2), \
            "seeded random token ids (no --calib)"
    lines = read_lines(args.calib)
    held = [line for i, line in enumerate(lines) if i % 5 == 4] if len(lines) >= 5 else []
    train = [line for i, line in enumerate(lines) if i % 5 != 4] if held else lines
    return text_feeds(args.hf_model_dir, train), text_feeds(args.hf_model_dir, held or lines), \
        f"{len(train)} training + {len(held)} held-out lines of {args.calib}"


def run(args: argparse.Namespace) -> int:
    import copy
    import dataclasses

    import numpy as np
    import torch

    from pimoe_export._files import OutputDir
    from pimoe_export.errors import PiMoEConfigError
    from pimoe_export.hf.checkpoint import MANIFEST, TOKENIZER_FILES, require_transformers, save_moefied
    from pimoe_export.hf.moefy import MoefySettings, distil, embedding_fidelity, moefy
    from pimoe_export.model.io import WEIGHTS_FILE

    transformers = require_transformers()
    settings = MoefySettings(experts=args.experts, top_k=args.top_k, finetune_epochs=args.finetune_epochs,
                             routing_noise=args.routing_noise, seed=args.seed)
    if args.top_k > args.experts:
        raise PiMoEConfigError("top_k", f"--top-k {args.top_k} exceeds --experts {args.experts}")
    try:  # safetensors only: a pickled pytorch_model.bin is never loaded
        model = transformers.AutoModel.from_pretrained(str(args.hf_model_dir), local_files_only=True,
                                                       use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise PiMoEConfigError("hf_model_dir", f"{args.hf_model_dir} is not a loadable Hugging Face model with "
                               f"safetensors weights ({str(exc).splitlines()[0]})") from None
    train, held, source = _split(args, int(model.config.vocab_size))
    train_t, held_t = ([{k: torch.from_numpy(np.asarray(v)) for k, v in f.items()} for f in feeds]
                       for feeds in (train, held))
    out = OutputDir(args.output, force=args.force, command="moefy")
    entries = ["config.json", MANIFEST, WEIGHTS_FILE, REPORT, *TOKENIZER_FILES]
    out.refuse_foreign(entries)  # every entry checked before any is claimed: nothing left behind
    for name in entries:
        out.claim(name)
    torch.manual_seed(args.seed)
    original = copy.deepcopy(model.float().eval())
    model, layers = moefy(model, train_t, dataclasses.replace(settings, finetune_epochs=0))
    before = embedding_fidelity(model, original, held_t)
    losses = distil(model, original, train_t, settings) if settings.finetune_epochs else []
    report = {"settings": dataclasses.asdict(settings), "data": source, "distillation_loss_per_epoch": losses,
              "moe_vs_original_held_out": embedding_fidelity(model, original, held_t) if losses else before,
              "moe_vs_original_held_out_before_distillation": before if losses else None}
    save_moefied(model, out.root, source_dir=args.hf_model_dir)
    (out.root / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"output": str(out.root), "pimoe_layers": sorted(layers), "experts": args.experts,
                      "top_k": args.top_k, "moe_vs_original": report["moe_vs_original_held_out"]}))
    return 0
