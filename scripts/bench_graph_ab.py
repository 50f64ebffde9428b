#!/usr/bin/env python3
"""Interleaved A/B of a whole pimoe ONNX graph on several builds of libpimoe_ort, in one process.

One session per library (each registers its own copy of the op library), all on the same model and input; the calls
alternate between the sessions (A, B, ..., A, B, ...), so a machine whose load drifts (a shared one) slows every
library alike, and each library's median, 20th percentile and minimum over ``--calls`` calls are printed, with
whether all libraries' outputs are bit-identical. Meant for one thread: idle ONNX Runtime pools spin, so with
``--threads`` above 1 the sessions' pools compete for the cores (spinning is then turned off, which is not how the
benchmark runs; prefer scripts/bench_cpu.py on a quiet machine there). Nothing here asserts a time.

Usage:
    .venv/bin/python scripts/bench_graph_ab.py engines/seed-512/model.int8.onnx LIB_A LIB_B --tokens 1,16,128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pimoe_export.interface import LAYER_INPUT  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a pimoe ONNX graph (e.g. a pipeline's model.int8.onnx)")
    parser.add_argument("libraries", type=Path, nargs="+", help="builds of libpimoe_ort.so to compare")
    parser.add_argument("--tokens", default="128", help="comma-separated token counts (batch 1)")
    parser.add_argument("--calls", type=int, default=300, help="timed calls per library and token count")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import onnxruntime as ort

    sessions = []
    for library in args.libraries:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        if args.threads > 1:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.register_custom_ops_library(str(library))
        sessions.append(ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"]))
    width = sessions[0].get_inputs()[0].shape[-1]
    for tokens in (int(t) for t in args.tokens.split(",")):
        feeds = {LAYER_INPUT: np.random.default_rng(tokens).standard_normal((1, tokens, width)).astype(np.float32)}
        outputs = [s.run(None, feeds)[0] for s in sessions]
        identical = all(np.array_equal(outputs[0], o) for o in outputs)
        for _ in range(10):  # warm-up
            for s in sessions:
                s.run(None, feeds)
        times: list[list[float]] = [[] for _ in sessions]
        for _ in range(args.calls):
            for s, t in zip(sessions, times, strict=True):
                t0 = time.perf_counter()
                s.run(None, feeds)
                t.append(time.perf_counter() - t0)
        print(f"T = {tokens}, {args.threads} thread(s), {args.calls} calls each, outputs bit-identical: {identical}")
        for library, t in zip(args.libraries, times, strict=True):
            t.sort()
            print(f"  {library}: median {statistics.median(t) * 1e3:.3f} ms, p20 {t[len(t) // 5] * 1e3:.3f}, "
                  f"min {t[0] * 1e3:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
