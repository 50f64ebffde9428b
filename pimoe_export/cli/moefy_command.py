"""`pimoe-export moefy`: a Hugging Face BERT-family encoder with PiMoE feed-forward blocks (model/moefy.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pimoe_export.cli._common import SEED, add_force, integer

NAME = "moefy"
HELP = "turn a Hugging Face BERT-family encoder's feed-forward blocks into PiMoE layers"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_model_dir", type=Path, help="a Hugging Face model directory (config.json + safetensors)")
    p.add_argument("-o", "--output", required=True, type=Path, help="directory for the MoEfied model")
    p.add_argument("--experts", type=integer(2, 1024), default=8, help="experts per layer (divides the FFN width)")
    p.add_argument("--top-k", type=integer(1, 16), default=2, help="experts per token")
    p.add_argument("--calib", type=Path, help="text file, one sentence per line, through the model's tokenizer "
                                              "(default: seeded random token ids: a weak stand-in)")
    p.add_argument("--finetune-epochs", type=integer(0), default=0, help="distillation steps per layer (experts)")
    p.add_argument("--seed", type=SEED, default=0, help="clustering and router-training seed")
    add_force(p)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from pimoe_export._files import OutputDir
    from pimoe_export.errors import PiMoEConfigError
    from pimoe_export.model.moefy import (
        MANIFEST,
        TOKENIZER_FILES,
        WEIGHTS,
        MoefySettings,
        moefy,
        random_feeds,
        read_lines,
        require_transformers,
        save_moefied,
        text_feeds,
    )

    transformers = require_transformers()
    settings = MoefySettings(experts=args.experts, top_k=args.top_k, finetune_epochs=args.finetune_epochs,
                             seed=args.seed)
    if args.top_k > args.experts:
        raise PiMoEConfigError("top_k", f"--top-k {args.top_k} exceeds --experts {args.experts}")
    try:  # safetensors only: a pickled pytorch_model.bin is never loaded
        model = transformers.AutoModel.from_pretrained(str(args.hf_model_dir), local_files_only=True,
                                                       use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise PiMoEConfigError("hf_model_dir", f"{args.hf_model_dir} is not a loadable Hugging Face model with "
                               f"safetensors weights ({str(exc).splitlines()[0]})") from None
    feeds = (text_feeds(args.hf_model_dir, read_lines(args.calib)) if args.calib is not None
             else random_feeds(int(model.config.vocab_size), args.seed))
    out = OutputDir(args.output, force=args.force, command="moefy")
    for name in ("config.json", MANIFEST, WEIGHTS, *TOKENIZER_FILES):
        out.claim(name)
    torch.manual_seed(args.seed)
    model, layers = moefy(model, [{k: torch.from_numpy(np.asarray(v)) for k, v in f.items()} for f in feeds],
                          settings)
    save_moefied(model, out.root, source_dir=args.hf_model_dir)
    print(json.dumps({"output": str(out.root), "pimoe_layers": sorted(layers), "experts": args.experts,
                      "top_k": args.top_k}))
    return 0
