#!/usr/bin/env python3
"""The accuracy/speed trade-off of standard Q/DQ INT8 for a whole model's attention (and other) Linear layers,
on top of the W8A8 experts, in ONNX Runtime on the CPU.

Takes a `pimoe-export moefy` directory and the output of `pimoe-export pipeline --model` on it (its model.onnx and
model.int8.onnx), writes model.int8-qdq.onnx (pimoe_export.quantize.qdq: the non-PiMoE Linears QDQ int8,
routers fp32, calibrated on the same 4 of 5 text lines as the experts), then on the held-out fifth compares each
graph's mean-pooled embeddings with the fp32 PyTorch model, and times the three graphs in one process, rounds
interleaved, median over repeats (tokens/s = batch x sequence / median latency; padded sentences of the text).

Usage (after scripts/moefy_minilm.py, or on any moefied model and its pipeline output):
    .venv/bin/python scripts/bench_qdq.py --model build/minilm/moe --engines build/minilm/engines \\
        --calib build/minilm/eval.txt [--shapes 1x16,8x128,32x128] [--repeats 10] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pimoe_export.bench.timing import median_ms  # noqa: E402
from pimoe_export.hf.checkpoint import load_moefied  # noqa: E402
from pimoe_export.hf.feeds import model_feeds  # noqa: E402
from pimoe_export.interface import MODEL_IDS_INPUT, MODEL_MASK_INPUT  # noqa: E402
from pimoe_export.quantize.qdq import quantize_linears  # noqa: E402
from pimoe_export.runtime.ort import create_session  # noqa: E402
from pimoe_export.validate.metrics import pooled_embedding_cosine  # noqa: E402


def embedding_cosines(session, model, feeds) -> np.ndarray:
    out = []
    for feed in feeds:
        got = session.run(["last_hidden_state"], feed)[0]
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
        out.append(pooled_embedding_cosine(ref, got, feed[MODEL_MASK_INPUT]))
    return np.concatenate(out)


def timing_feed(feeds, batch: int, seq: int) -> dict[str, np.ndarray]:
    """``batch`` x ``seq`` token ids cut from the text's tokenised batches (no padding inside the window)."""
    ids = np.concatenate([f[MODEL_IDS_INPUT][f[MODEL_MASK_INPUT] != 0] for f in feeds])
    need = batch * seq
    ids = np.resize(ids, need).reshape(batch, seq)
    return {MODEL_IDS_INPUT: ids.astype(np.int64), MODEL_MASK_INPUT: np.ones((batch, seq), np.int64)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--engines", type=Path, required=True)
    p.add_argument("--calib", type=Path, required=True)
    p.add_argument("--method", default="minmax", choices=("minmax", "percentile", "entropy"))
    p.add_argument("--shapes", default="1x16,8x128,32x128")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    model = load_moefied(args.model)
    calib, held, source = model_feeds(args.model, args.calib, int(model.config.vocab_size))
    qdq = args.engines / "model.int8-qdq.onnx"
    info = quantize_linears(args.engines / "model.int8.onnx", qdq, calib, method=args.method)
    graphs = {"fp32": args.engines / "model.onnx", "int8 experts": args.engines / "model.int8.onnx",
              "int8 experts + QDQ Linears": qdq}
    sessions = {name: create_session(path, threads=args.threads) for name, path in graphs.items()}
    accuracy = {}
    for name, session in sessions.items():
        c = embedding_cosines(session, model, held)
        accuracy[name] = {"mean_cosine": float(c.mean()), "min_cosine": float(c.min()), "sentences": int(c.size)}
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    speed: dict[str, dict[str, list[float]]] = {name: {} for name in sessions}
    for _ in range(args.rounds):
        for batch, seq in shapes:
            feed = timing_feed(calib, batch, seq)
            for name, session in sessions.items():
                ms = median_ms(lambda s=session, f=feed: s.run(["last_hidden_state"], f), args.repeats)
                speed[name].setdefault(f"{batch}x{seq}", []).append(ms)
    table = ["| graph | embedding cosine vs PyTorch fp32 (mean / min) | " +
             " | ".join(f"{b}x{s} tokens/s" for b, s in shapes) + " |", "|---|---|" + "---|" * len(shapes)]
    for name in sessions:
        a = accuracy[name]
        cells = [f"{b * s / (np.median(speed[name][f'{b}x{s}']) / 1e3):,.0f}" for b, s in shapes]
        table.append(f"| {name} | {a['mean_cosine']:.5f} / {a['min_cosine']:.5f} | " + " | ".join(cells) + " |")
    result = {"data": source, "qdq": info, "accuracy": accuracy,
              "median_ms": {n: {k: float(np.median(v)) for k, v in d.items()} for n, d in speed.items()},
              "threads": args.threads, "table": table}
    (args.engines / "bench_qdq.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(table))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
