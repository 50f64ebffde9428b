#!/usr/bin/env python3
"""Interleaved A/B of one PiMoEExpertMLP layer on two builds of libpimoe_ort (e.g. before and after a kernel change).

The layer is Mixtral-like by default: E experts of one group, gated (rows [gate; up], h = silu(gate) * up, no bias),
widths [H, I, H], fed the rows of T tokens routed to k experts each (a fixed random routing). Every measurement runs
in its own subprocess that loads one library, builds the session, warms up and times ``--repeats`` calls (median);
the libraries alternate A B B A within each of ``--rounds`` rounds, so a machine whose load drifts (a shared one)
biases neither side. The report gives each side's median and minimum over its measurements of wall time and of the
process's CPU time (on a shared machine the CPU time of a 1-thread run is the steadier of the two), B / A, and
whether the two libraries' outputs are bit-identical. Nothing here asserts a time.

Usage:
    .venv/bin/python scripts/bench_expert_ab.py LIB_A LIB_B --tokens 128,1024 --precision fp32,w8a8_dynamic
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pimoe_export.ops import schema  # noqa: E402
from pimoe_export.quantize.int8 import quantize_weight  # noqa: E402


def layer_model(args: argparse.Namespace, precision: str) -> bytes:
    """One gated PiMoEExpertMLP node over every expert, parameters as initializers."""
    rng = np.random.default_rng(0)
    widths = [args.hidden, args.inter, args.hidden]
    mode = "none" if precision == "fp32" else precision
    params: list[np.ndarray] = []
    for layer, role in schema.expert_mlp_param_layout(2, False, mode, bias=False):
        rows = schema.expert_mlp_param_rows(widths, layer, True)
        if role == "weight":
            w = (rng.standard_normal((args.experts, rows, widths[layer]), dtype=np.float32)
                 / np.float32(np.sqrt(widths[layer])))
            q, scale = quantize_weight(w) if mode != "none" else (w, None)
            params.append(q)
        elif role == "w_scale":
            params.append(scale)
        else:  # act_smooth
            params.append(np.ones((args.experts, widths[layer]), np.float32))
    node = helper.make_node(schema.EXPERT_MLP, ["x_sorted", "offsets"] + [f"p{i}" for i in range(len(params))],
                            ["y_sorted"], domain=schema.DOMAIN, expert_ids=list(range(args.experts)), widths=widths,
                            activation=args.activation, layer_norm=0, quant_mode=mode, gated=1, bias=0)
    graph = helper.make_graph(
        [node], "expert_ab",
        [helper.make_tensor_value_info("x_sorted", TensorProto.FLOAT, [None, args.hidden]),
         helper.make_tensor_value_info("offsets", TensorProto.INT32, [args.experts + 1])],
        [helper.make_tensor_value_info("y_sorted", TensorProto.FLOAT, [None, args.hidden])],
        initializer=[numpy_helper.from_array(p, f"p{i}") for i, p in enumerate(params)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(schema.DOMAIN, schema.OPSET_VERSION)])
    model.ir_version = 10
    return model.SerializeToString()


def layer_inputs(args: argparse.Namespace, tokens: int) -> dict[str, np.ndarray]:
    """x_sorted and offsets of ``tokens`` tokens, each routed to top_k distinct random experts."""
    rng = np.random.default_rng(tokens)
    ids = np.argsort(rng.random((tokens, args.experts)), axis=1)[:, :args.top_k]
    counts = np.bincount(ids.ravel(), minlength=args.experts)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    x = rng.standard_normal((tokens * args.top_k, args.hidden), dtype=np.float32)
    return {"x_sorted": x, "offsets": offsets}


def child(library: str, model: str, inputs: str, repeats: int, threads: int) -> None:
    """One measurement: prints JSON {median_ms, isa, sha256 of the output}."""
    from pimoe_export.runtime.ort import check_ort_library, create_session

    with np.load(inputs) as data:
        feeds = {k: data[k] for k in data.files}
    session = create_session(model, threads=threads, library=library)
    for _ in range(2):
        y = session.run(None, feeds)[0]
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    print(json.dumps({"median_ms": statistics.median(times), "cpu_ms": statistics.median(cpu),
                      "isa": check_ort_library(library)["cpu_isa"],
                      "sha256": hashlib.sha256(np.ascontiguousarray(y).tobytes()).hexdigest()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("library_a")
    parser.add_argument("library_b")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=3584)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--activation", default="silu", choices=schema.ALL_ACTIVATIONS)
    parser.add_argument("--tokens", default="128,1024")
    parser.add_argument("--precision", default="fp32", help="comma list of fp32, w8a8_dynamic")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    libraries = {"A": str(Path(args.library_a).resolve()), "B": str(Path(args.library_b).resolve())}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precision.split(","):
            model = Path(tmp) / f"{precision}.onnx"
            model.write_bytes(layer_model(args, precision))
            onnx.checker.check_model(str(model))
            for tokens in (int(t) for t in args.tokens.split(",")):
                inputs = Path(tmp) / f"x{tokens}.npz"
                np.savez(inputs, **layer_inputs(args, tokens))
                runs: dict[str, list[dict]] = {"A": [], "B": []}
                for _ in range(args.rounds):
                    for side in "ABBA":
                        out = subprocess.run([sys.executable, __file__, "--child", libraries[side], str(model),
                                              str(inputs), str(args.repeats), str(args.threads)],
                                             capture_output=True, text=True, check=True)
                        runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
                same = len({r["sha256"] for s in runs for r in runs[s]}) == 1
                print(f"{precision} T={tokens} (isa {runs['A'][0]['isa']}/{runs['B'][0]['isa']}, outputs "
                      f"{'bit-identical' if same else 'DIFFER'})", flush=True)
                for key, what in (("median_ms", "wall"), ("cpu_ms", "CPU time")):
                    med = {s: statistics.median(r[key] for r in runs[s]) for s in runs}
                    low = {s: min(r[key] for r in runs[s]) for s in runs}
                    print(f"  {what:8s} median A {med['A']:8.2f} ms  B {med['B']:8.2f} ms  "
                          f"B/A {med['B'] / med['A']:.3f};  min A {low['A']:8.2f} ms  B {low['B']:8.2f} ms  "
                          f"B/A {low['B'] / low['A']:.3f};  "
                          f"per measurement A {[round(r[key], 1) for r in runs['A']]} "
                          f"B {[round(r[key], 1) for r in runs['B']]}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
