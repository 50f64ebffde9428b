"""`pimoe-export generate`: text (or token ids) in, a continuation out, from a decoder unit (Engine.generate)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pimoe_export.cli._common import integer, number

NAME = "generate"
HELP = "generate a continuation of prompts with a decoder unit (an LLM with a KV cache; greedy or seeded sampling)"


def token_ids(text: str) -> list[int]:
    """`1,5,9` -> [1, 5, 9]."""
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"token ids look like 1,5,9, got {text!r}") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative token ids like 1,5,9, got {text!r}")
    return ids


def configure(p: argparse.ArgumentParser) -> None:
    from pimoe_export.runtime.sampling import DEFAULT_MAX_NEW_TOKENS

    p.add_argument("unit", type=Path, help="decoder unit directory (manifest.json with a decoder)")
    p.add_argument("--prompt", action="append", dest="prompts", default=[], metavar="TEXT",
                   help="a prompt (text; the unit's tokenizer encodes it); repeat for a batch")
    p.add_argument("--prompt-ids", action="append", dest="prompts", type=token_ids, metavar="IDS",
                   help="a prompt as token ids, e.g. 1,5,9 (units without a tokenizer); repeat for a batch")
    p.add_argument("--max-new-tokens", type=integer(1), default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"most tokens to generate per prompt (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--temperature", type=number(0, 100), default=0.0, help="0 (default): greedy; above: sampling")
    p.add_argument("--top-k", type=integer(0), default=0, help="sampling: keep the K most likely tokens (0: all)")
    p.add_argument("--top-p", type=number(0, 1, open_low=True), default=1.0,
                   help="sampling: keep the most likely tokens up to probability P (1: all)")
    p.add_argument("--seed", type=integer(0, 2**63 - 1), default=None,
                   help="sampling seed: the same seed gives the same tokens (default: a fresh one, printed)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a row when its text holds TEXT (repeatable)")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated (one prompt)")
    p.add_argument("--json", action="store_true", help="print every result as JSON (token ids, text, finish reason)")
    p.add_argument("--threads", type=integer(1, 256), default=None, help="ONNX Runtime intra-op threads")


def run(args: argparse.Namespace) -> int:
    from pimoe_export.errors import PiMoEInputError
    from pimoe_export.runtime.engine import Engine

    prompts = list(args.prompts)  # in command-line order, texts and id lists mixed
    if not prompts:
        raise PiMoEInputError("give a prompt: --prompt TEXT (or --prompt-ids 1,5,9)")
    if args.stream and len(prompts) != 1:
        raise PiMoEInputError("--stream prints one row as it comes: give one prompt")

    def stream(event) -> None:
        piece = event.text if event.text is not None else (f" {event.token_id}" if event.token_id is not None
                                                            else "")
        print(piece, end="", flush=True)

    with Engine.load(args.unit, threads=args.threads) as engine:
        results = engine.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                                  on_token=stream if args.stream else None)
    if args.stream:
        print()
    for result in results:
        if args.json:
            print(json.dumps({"prompt_token_ids": result.prompt_token_ids, "token_ids": result.token_ids,
                              "text": result.text, "finish_reason": result.finish_reason, "seed": result.seed}))
        elif not args.stream:
            print(result.text if result.text is not None else " ".join(map(str, result.token_ids)))
        if result.seed is not None and args.seed is None:
            print(f"(sampled with --seed {result.seed})", file=sys.stderr)
    return 0
