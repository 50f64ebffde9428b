#!/usr/bin/env python3
"""Where a decode step of ``Engine``'s decoder goes: ONNX Runtime's run against the Python around it, for both ways
``OrtDecoder`` calls ONNX Runtime (``native``: one ``run_with_ort_values`` of the native session, the CPU default;
``binding``: I/O binding, the path for other devices and older onnxruntime), with ONNX Runtime GenAI's
``generate_next_token`` on the same unit as the reference.

All runners in one process, on one session for both Engine paths (so both draw the same weights' placement), rounds
interleaved (each round starting with the next runner); per round the median over ``--steps`` decode steps after a
prefill of ``--prompt`` tokens, then the median over rounds. ``run`` is the time inside the ONNX Runtime call,
``outside`` the rest of ``Rows.step`` plus the greedy argmax (what GenAI does in C++). The script also checks that
both paths give bit-identical logits at every step. Usage:

    .venv/bin/python scripts/bench_decode_step.py UNIT [--batches 1,8] [--threads 1] [--rounds 15]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pimoe_export.runtime.decoder import OrtDecoder, Rows  # noqa: E402
from pimoe_export.runtime.engine import Engine  # noqa: E402

Result = dict[str, float]


class Timed:
    """Accumulates the seconds spent in the wrapped callable."""

    def __init__(self, call: Callable[..., Any]) -> None:
        self.call, self.seconds = call, 0.0

    def __call__(self, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.call(*args)
        finally:
            self.seconds += time.perf_counter() - start


class TimedSession:
    """An InferenceSession whose run_with_iobinding is timed (the binding path)."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.run_with_iobinding = Timed(session.run_with_iobinding)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def engine_round(engine: Engine, native: bool, prompts: list[list[int]], steps: int) -> tuple[Result, list]:
    decoder = engine.decoder()
    assert isinstance(decoder, OrtDecoder)
    if native:
        assert decoder._native is not None, "this onnxruntime has no native run_with_ort_values: nothing to compare"
        timer = Timed(decoder._native[0])
        decoder._native = (timer, *decoder._native[1:])
    else:
        decoder._native = None
        decoder.session = TimedSession(decoder.session)
        timer = decoder.session.run_with_iobinding
    rows, logits = Rows.prefill(decoder, prompts)
    totals, runs, seen = [], [], [logits]
    for _ in range(steps):
        timer.seconds = 0.0
        start = time.perf_counter()
        logits = rows.step(decoder, logits.argmax(axis=1).tolist())
        totals.append(time.perf_counter() - start)
        runs.append(timer.seconds)
        seen.append(logits)
    total, run = float(np.median(totals)), float(np.median(runs))
    return {"step": total, "run": run, "outside": float(np.median(np.subtract(totals, runs)))}, seen


def genai_round(og: Any, model: Any, prompts: list[list[int]], steps: int) -> Result:
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompts[0]) + steps + 1, batch_size=len(prompts))
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompts, np.int32))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        generator.generate_next_token()
        times.append(time.perf_counter() - start)
    return {"step": float(np.median(times))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("unit", type=Path)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-genai", action="store_true")
    args = parser.parse_args()
    engine = Engine.load(args.unit, threads=args.threads)
    spec = engine.decoder_spec
    assert spec is not None, f"{args.unit} is not a decoder unit"
    genai: tuple[Any, Any] | None = None
    if not args.no_genai:
        import json

        import onnxruntime_genai as og

        config = og.Config(str(args.unit))
        config.clear_providers()
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": args.threads}}}}))
        genai = (og, og.Model(config))
    print(f"unit {args.unit}; threads {args.threads}; prompt {args.prompt}, {args.steps} steps; median of "
          f"{args.rounds} rounds; load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| batch | runner | step ms | ORT run ms | outside ms (rounds' min-max of step) |\n|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, spec.vocab_size, args.prompt).tolist() for _ in range(batch)]
        runners: dict[str, Callable[[], Result]] = {
            "engine native": lambda p=prompts: engine_round(engine, True, p, args.steps)[0],
            "engine binding": lambda p=prompts: engine_round(engine, False, p, args.steps)[0],
        }
        if genai is not None:
            runners["genai"] = lambda p=prompts: genai_round(genai[0], genai[1], p, args.steps)
        native_logits = engine_round(engine, True, prompts, args.steps)[1]
        binding_logits = engine_round(engine, False, prompts, args.steps)[1]
        identical = all(np.array_equal(a, b) for a, b in zip(native_logits, binding_logits, strict=True))
        for run in runners.values():  # warm-up
            run()
        names = list(runners)
        rounds: dict[str, list[Result]] = {name: [] for name in names}
        for index in range(args.rounds):
            for name in names[index % len(names):] + names[:index % len(names)]:
                rounds[name].append(runners[name]())
        for name, values in rounds.items():
            med = {key: float(np.median([v[key] for v in values])) * 1e3 for key in values[0]}
            steps = [v["step"] * 1e3 for v in values]
            print(f"| {batch} | {name} | {med['step']:.3f} | {med.get('run', float('nan')):.3f} | "
                  f"{med.get('outside', float('nan')):.3f} ({min(steps):.2f}-{max(steps):.2f}) |")
        print(f"batch {batch}: native and binding logits bit-identical at every step: {identical}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
