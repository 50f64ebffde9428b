#!/usr/bin/env python3
"""Generation benchmark: prefill and decode tokens/s of a decoder unit against Hugging Face eager PyTorch and ONNX
Runtime GenAI, on the CPU.

For each batch size B (left-padded prompts of P tokens):

- prefill tokens/s = B x P / median time of the prompt call (empty cache);
- decode tokens/s = B / median time of one decode step, over ``--steps`` steps after the prefill (the cache grows
  from P to P + steps).

Runners: ``pimoe`` (the unit through Engine's decoder: ONNX Runtime, the cache kept as OrtValues, libpimoe_ort),
``hf-eager`` (the Hugging Face model of ``--hf-dir``, attn_implementation="eager", one forward per step with its
DynamicCache) and
``genai:<dir>`` for each ``--genai DIR`` (ONNX Runtime GenAI's Generator on a GenAI model directory: our unit
itself, or the GenAI model builder's export of the same weights; append_tokens and generate_next_token timed, with
``--threads`` intra-op threads as the others).
All in this process, runners interleaved per round (each round starting with the next runner), median over rounds;
with ``--sessions N`` each ONNX Runtime runner has N sessions of its model, used in turn (give rounds a multiple of
N): one session's decode time depends on where its weights landed in memory, by up to ~8% between identical
sessions of one process, which is the size of the differences being judged.
Usage:

    .venv/bin/python scripts/bench_generate.py --hf-dir HF_DIR --unit UNIT [--genai DIR ...]
        [--batches 1,8] [--prompt 64] [--steps 32] [--threads 2] [--rounds 5] [--json OUT]

The models of docs/benchmarks.md come from the test suite's decoder builder run as a script (random weights, a
tokenizer of 320 tokens, the family's MoE blocks as pimoe ops; DIR/hf and the fp32 unit DIR/ort-fp32):

    .venv/bin/python tests/decoders.py --family qwen3_moe --size mid -o DIR

The unit's own directory is also a GenAI model (``--genai-unit`` times it in ONNX Runtime GenAI).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pimoe_export.artifacts.manifest import read_manifest  # noqa: E402
from pimoe_export.interface import DECODER_POSITIONS_INPUT, MODEL_IDS_INPUT, MODEL_MASK_INPUT  # noqa: E402
from pimoe_export.runtime.decoder import Rows  # noqa: E402
from pimoe_export.runtime.engine import Engine  # noqa: E402

#: (seconds per prefill call, seconds per decode step) of one round
Timing = tuple[float, float]

def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, length).tolist() for _ in range(batch)]


def pimoe_round(engine: Engine, batch: list[list[int]], steps: int) -> Timing:
    decoder = engine.decoder()
    start = time.perf_counter()
    rows, logits = Rows.prefill(decoder, batch)
    prefill = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits = rows.step(decoder, logits.argmax(axis=1).tolist())
        times.append(time.perf_counter() - start)
    return prefill, float(np.median(times))


def hf_round(model, batch: list[list[int]], steps: int) -> Timing:
    import torch

    ids = torch.tensor(batch)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        start = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        prefill = time.perf_counter() - start
        times = []
        for _ in range(steps):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            start = time.perf_counter()
            out = model(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
            times.append(time.perf_counter() - start)
    return prefill, float(np.median(times))


def genai_round(og, model, batch: list[list[int]], steps: int) -> Timing:
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(batch[0]) + steps + 1, batch_size=len(batch))
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(np.array(batch, np.int32))
    prefill = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        generator.generate_next_token()
        times.append(time.perf_counter() - start)
    return prefill, float(np.median(times))


def op_profile(unit: Path, threads: int, past: int, steps: int, out: Path) -> None:
    """ONNX Runtime's own profile of ``steps`` decode steps (batch 1, one token, a past of ``past``): kernel time
    and node count per op type, per step."""
    from collections import Counter

    import onnxruntime as ort

    from pimoe_export.runtime.ort import session_options

    spec = Engine.load(unit).decoder_spec
    assert spec is not None
    rng = np.random.default_rng(0)
    feeds = {MODEL_IDS_INPUT: np.full((1, 1), 5, np.int64), MODEL_MASK_INPUT: np.ones((1, past + 1), np.int64),
             DECODER_POSITIONS_INPUT: np.full((1, 1), past, np.int64),
             **{n: rng.standard_normal((1, spec.num_kv_heads, past, dim), np.float32)
                for n, dim in zip(spec.past_names, spec.cache_head_dims, strict=True)}}
    options = session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(out / "ort-profile")
    session = ort.InferenceSession(str(unit / "model.onnx"), options, providers=["CPUExecutionProvider"])
    for _ in range(steps):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    times: Counter[str] = Counter()
    nodes: Counter[str] = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            times[event["args"]["op_name"]] += event["dur"]
            nodes[event["args"]["op_name"]] += 1
    print(f"ONNX Runtime profile, {steps} decode steps (batch 1, past {past}): "
          f"{sum(times.values()) / steps:.0f} us kernel time and {sum(nodes.values()) // steps} nodes per step")
    print("| op type | us/step | nodes |\n|---|---|---|")
    for op, total in times.most_common(8):
        print(f"| {op} | {total / steps:.0f} | {nodes[op] // steps} |")


def cycling(rounds: list[Callable[[list[list[int]]], Timing]]) -> Callable[[list[list[int]]], Timing]:
    """One runner over several sessions of the same model: each call uses the next one."""
    turn = itertools.cycle(rounds)
    return lambda batch: next(turn)(batch)


def runners(args: argparse.Namespace) -> dict[str, Callable[[list[list[int]]], Timing]]:
    """The runners; the ONNX Runtime ones with ``--sessions`` sessions each, created in turn (the first session of
    every runner, then the second, ...), so that no runner always has the process's first or last allocations."""
    pimoe: list[Callable[[list[list[int]]], Timing]] = []
    genai: dict[str, list[Callable[[list[list[int]]], Timing]]] = {f"genai:{d.name}": [] for d in args.genai}
    og = None
    if args.genai:
        import onnxruntime_genai as og
    for _ in range(args.sessions):
        engine = Engine.load(args.unit, threads=args.threads)
        pimoe.append(lambda b, e=engine: pimoe_round(e, b, args.steps))
        for directory in args.genai:
            config = og.Config(str(directory))
            config.clear_providers()
            # the same intra-op thread count as the other runners: GenAI's own default is half the logical cores
            # (min 1, max 16), which equals --threads 1 only on a 2-core machine
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": args.threads}}}}))
            model = og.Model(config)
            genai[f"genai:{directory.name}"].append(lambda b, m=model: genai_round(og, m, b, args.steps))
    result: dict[str, Callable[[list[list[int]]], Timing]] = {"pimoe": cycling(pimoe)}
    if not args.skip_hf:
        import torch
        import transformers

        torch.set_num_threads(args.threads)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(args.hf_dir), attn_implementation="eager").eval()
        result["hf-eager"] = lambda b: hf_round(hf, b, args.steps)
    result.update({name: cycling(rounds) for name, rounds in genai.items()})
    return result


def cpu_line() -> str:
    """The CPU's model name, family and model (/proc/cpuinfo) and its core count."""
    try:
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        name = f"{fields['model name']} (family {fields['cpu family']} model {fields['model']})"
    except (OSError, KeyError):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", type=Path, required=True, help="the Hugging Face model directory (reference)")
    parser.add_argument("--unit", type=Path, required=True, help="its decoder unit")
    parser.add_argument("--genai", type=Path, action="append", default=[], help="a GenAI model directory to time")
    parser.add_argument("--genai-unit", action="store_true", help="also time the unit itself in ONNX Runtime GenAI")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=1,
                        help="ONNX Runtime sessions per runner, used in turn round by round (identical sessions of "
                             "one model differ by up to ~8%% in decode time: where their weights landed in memory)")
    parser.add_argument("--skip-hf", action="store_true",
                        help="leave Hugging Face eager out (no PyTorch model in the process while the others run)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="only profile the unit's decode step with ONNX Runtime (its JSON into DIR)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        op_profile(args.unit, args.threads, args.prompt + args.steps // 2, 30, args.profile)
        return 0
    if args.genai_unit:
        args.genai.append(args.unit)
    vocab = read_manifest(args.unit).decoder["vocab_size"]
    timed = runners(args)
    results = []
    print(f"CPU: {cpu_line()}; threads {args.threads}; model {args.unit}; prompt {args.prompt}, "
          f"{args.steps} decode steps, median of {args.rounds} rounds over {args.sessions} session(s) per runner")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| runner | batch | prefill tok/s | decode tok/s | decode ms/step (rounds' min-max) |\n|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        data = prompts(batch, args.prompt, vocab)
        rounds: dict[str, list[Timing]] = {name: [] for name in timed}
        for run in timed.values():  # warm-up, every session
            for _ in range(args.sessions):
                run(data)
        names = list(timed)
        for index in range(args.rounds):  # each round starts with the next runner: no runner always follows another
            for name in names[index % len(names):] + names[:index % len(names)]:
                rounds[name].append(timed[name](data))
        for name, values in rounds.items():
            prefill, step = (float(np.median([v[i] for v in values])) for i in (0, 1))
            steps = [v[1] * 1e3 for v in values]
            row = {"runner": name, "batch": batch, "prefill_tokens_per_s": batch * args.prompt / prefill,
                   "decode_tokens_per_s": batch / step, "decode_ms_per_step": step * 1e3,
                   "decode_ms_per_step_rounds": steps}
            results.append(row)
            print(f"| {name} | {batch} | {row['prefill_tokens_per_s']:.0f} | {row['decode_tokens_per_s']:.0f} | "
                  f"{row['decode_ms_per_step']:.2f} ({min(steps):.2f}-{max(steps):.2f}) |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_line(), "args": {k: str(v) for k, v in
                                                                                 vars(args).items()},
                                         "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
