#!/usr/bin/env python3
"""Whole-model CPU benchmark: the dense encoder vs its MoEfied form (fp32 and INT8), all in ONNX Runtime.

The encoder has MiniLM-L6's shape (H = 384, 6 layers, 12 heads, FFN 1536, vocabulary 30522), randomly initialised
from a `transformers` config (no download: speed does not depend on the weights' values). `moefy` turns each FFN
into E experts with top-k routing (FFN FLOPs per token x k/E, plus the router); the dense model is exported with
torch.onnx (standard ops), the MoE model with `export_model` (pimoe ops) and quantised per layer.

Every variant runs in the same process, rounds interleaved, median over repeats; tokens/s = batch x sequence /
median latency. Usage:
    .venv/bin/python scripts/bench_model.py [--experts 8] [--top-k 2] [--shapes 1x16,8x128,32x128]
                                            [--repeats 10] [--rounds 3] [--threads 2] [--update-docs]
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pimoe_export.bench.timing import median_ms  # noqa: E402
from pimoe_export.export.exporter import export_model  # noqa: E402
from pimoe_export.hf.checkpoint import require_transformers  # noqa: E402
from pimoe_export.hf.feeds import random_feeds  # noqa: E402
from pimoe_export.hf.moefy import MoefySettings, moefy  # noqa: E402
from pimoe_export.interface import MODEL_IDS_INPUT, MODEL_MASK_INPUT, ONNX_OPSET  # noqa: E402
from pimoe_export.quantize import quantize_model  # noqa: E402
from pimoe_export.runtime.ort import create_session  # noqa: E402


def dense_onnx(model: torch.nn.Module, path: Path, example: dict[str, torch.Tensor]) -> Path:
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("sequence", min=1, max=512)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (), str(path), kwargs=example, dynamo=True, opset_version=ONNX_OPSET,
                          dynamic_shapes={k: {0: batch, 1: seq} for k in example},
                          input_names=list(example), output_names=["last_hidden_state", "pooler_output"])
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--shapes", default="1x16,8x128,32x128")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--update-docs", action="store_true")
    args = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    transformers = require_transformers()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536, max_position_embeddings=512)
    dense = transformers.BertModel(config).eval()
    calib = random_feeds(config.vocab_size, 0, ((8, 64),) * 4)
    moe, _ = moefy(copy.deepcopy(dense), [{k: torch.from_numpy(v) for k, v in f.items()} for f in calib],
                   MoefySettings(experts=args.experts, top_k=args.top_k, router_epochs=50))
    work = Path(tempfile.mkdtemp(prefix="bench_model."))
    example = {k: torch.from_numpy(v[:2]) for k, v in calib[0].items()}
    paths = {"ort_dense_fp32": dense_onnx(dense, work / "dense.onnx", example),
             "ort_moe_fp32": export_model(moe, work / "moe.onnx", example).path}
    paths["ort_moe_int8"] = quantize_model(moe, work / "moe.int8.onnx", calibration=calib,
                                           fp32_onnx=paths["ort_moe_fp32"]).onnx_path
    sessions = {name: create_session(path, threads=args.threads) for name, path in paths.items()}
    rng = np.random.default_rng(1)
    feeds = {s: {MODEL_IDS_INPUT: rng.integers(0, config.vocab_size, s).astype(np.int64),
                 MODEL_MASK_INPUT: np.ones(s, np.int64)} for s in shapes}
    samples: dict[tuple[int, int], dict[str, list[float]]] = {s: {} for s in shapes}
    for _ in range(args.rounds):
        for s in shapes:
            for name, session in sessions.items():
                samples[s].setdefault(name, []).append(
                    median_ms(lambda se=session, f=feeds[s]: se.run(None, f), args.repeats))
    table = render(samples, args, cpu_name())
    print(table)
    if args.update_docs:
        sys.path.insert(0, str(ROOT / "scripts"))
        from bench_cpu import update_docs

        update_docs(table, "cpu-whole-model")
    return 0


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def render(samples: dict, args: argparse.Namespace, cpu: str) -> str:
    names = ["ort_dense_fp32", "ort_moe_fp32", "ort_moe_int8"]
    lines = [f"Command: `.venv/bin/python scripts/bench_model.py --experts {args.experts} --top-k {args.top_k} "
             f"--shapes {args.shapes} --repeats {args.repeats} --rounds {args.rounds} --threads {args.threads} "
             f"--update-docs` ({cpu}, {args.threads} threads; median of {args.rounds} rounds of {args.repeats}-run "
             "medians, tokens/s)", "",
             "| batch × sequence | " + " | ".join(names) + " | MoE fp32 vs dense | MoE INT8 vs dense |",
             "|---|" + "---|" * (len(names) + 2)]
    for (b, s), by_name in samples.items():
        ms = {n: float(np.median(by_name[n])) for n in names}
        tps = {n: b * s / (ms[n] / 1e3) for n in names}
        lines.append(f"| {b}×{s} | " + " | ".join(f"{tps[n]:,.0f}" for n in names) +
                     f" | {ms['ort_dense_fp32'] / ms['ort_moe_fp32']:.2f}× | "
                     f"{ms['ort_dense_fp32'] / ms['ort_moe_int8']:.2f}× |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
