#!/usr/bin/env python3
"""CPU benchmark: the pimoe ONNX Runtime path against PyTorch and ONNX Runtime's own MoE op, side by side.

Every variant runs in this one process on the same weights and the same inputs, with the same thread count;
each point is the median of ``--repeats`` timed runs after warm-up. Variants:

- ``torch_eager_loop``: PyTorch eager, a loop over experts gathering each expert's tokens (the common
  Hugging Face style implementation)
- ``torch_pimoe``: our vectorised PyTorch layer (sort-based dispatch)
- ``ort_standard``: our plugin-free standard-op ONNX graph (dense: every expert on every token)
- ``ort_contrib_moe``: ONNX Runtime's ``com.microsoft.MoE`` with our router and the same expert weights
  (fc weights [E, out, in]); it has no LayerNorm between the expert layers, so it does slightly less work
- ``ort_pimoe``: our custom-op graph on libpimoe_ort (fp32)
- ``ort_pimoe_int8``: our W8A8 graph (quantised in this run unless ``--int8 PATH`` names one)

and two roofline lines, the machine's GEMM rate on the same work: ``roofline_sgemm`` (one ``torch.mm``, MKL, with
the experts' FLOPs: all routed rows times one matrix holding every expert layer's weights) and ``roofline_int8``
(one ONNX Runtime ``MatMulInteger``, u8 x s8 on MLAS, with the same multiply-adds). Every thread count in
``--threads`` is measured in full, and ``ort_pimoe``'s outputs are compared bit for bit across runs and thread
counts.

Usage:
    .venv/bin/python scripts/bench_cpu.py --preset seed-512 --tokens 1,16,128,1024 --threads 1,2 --update-docs
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pimoe_export.bench.timing import median_ms  # noqa: E402
from pimoe_export.export.exporter import export_onnx  # noqa: E402
from pimoe_export.interface import LAYER_INPUT, LAYER_OUTPUT  # noqa: E402
from pimoe_export.model import functional  # noqa: E402
from pimoe_export.model.factory import create_from_preset  # noqa: E402
from pimoe_export.runtime.ort import check_ort_library, create_session, find_ort_library  # noqa: E402


def eager_loop(model, x: torch.Tensor) -> torch.Tensor:
    """Hugging Face style MoE: route, then for each expert gather its tokens, run it, scatter-add back."""
    b, s, h = x.shape
    x2 = x.reshape(-1, h)
    cfg = model.config
    weights, ids = functional.route(model.router.compute_logits(x2), model.router.selection_bias, cfg.top_k,
                                    bool(cfg.normalize))
    y = torch.zeros_like(x2)
    for e, expert in enumerate(model.experts):
        token, slot = torch.where(ids == e)
        if token.numel():
            y.index_add_(0, token, expert(x2[token]) * weights[token, slot, None])
    return y.reshape(b, s, h)


def contrib_moe_model(model, custom_onnx: Path) -> bytes:
    """Our exported graph with the four pimoe nodes replaced by one com.microsoft.MoE node."""
    specs = model.config.expert_specs()
    if len({s for s in specs}) != 1 or specs[0].num_layers != 2:
        raise SystemExit("com.microsoft.MoE needs uniform two-layer experts (use --preset seed-512)")
    from pimoe_export.ops import schema

    proto = onnx.load(str(custom_onnx))
    graph = proto.graph
    nodes = {n.op_type: n for n in graph.node if n.domain == schema.DOMAIN}
    logits, x_flat = nodes[schema.ROUTE].input[0], nodes[schema.DISPATCH].input[0]
    y_flat = nodes[schema.COMBINE].output[0]
    keep = [n for n in graph.node if n.domain != schema.DOMAIN]
    produced = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    changed = True
    while changed:  # drop nodes that fed only on pimoe outputs (the routing outputs' reshapes)
        changed = False
        available = produced | {o for n in keep for o in n.output} | {y_flat}
        for n in list(keep):
            if any(i and i not in available for i in n.input):
                keep.remove(n)
                changed = True
    stack = lambda name: np.stack([getattr(e.layers[int(name[-1])], name[:-2]).detach().numpy()  # noqa: E731
                                   for e in model.experts])
    inits = {"moe_fc1_w": stack("weight_0"), "moe_fc1_b": stack("bias_0"),
             "moe_fc2_w": stack("weight_1"), "moe_fc2_b": stack("bias_1")}
    moe = helper.make_node("MoE", [x_flat, logits, *inits], [y_flat], domain="com.microsoft",
                           k=model.config.top_k, activation_type="gelu",
                           normalize_routing_weights=int(bool(model.config.normalize)))
    del graph.node[:]
    graph.node.extend([*keep, moe])
    graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items())
    outputs = [o for o in graph.output if o.name == LAYER_OUTPUT]
    del graph.output[:]
    graph.output.extend(outputs)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.add(domain="com.microsoft", version=1)
    return proto.SerializeToString()


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    family = next((line.split(":")[1].strip() for line in info.splitlines() if line.startswith("cpu family")), "?")
    model = next((line.split(":")[1].strip() for line in info.splitlines() if line.startswith("model\t")), "?")
    isa = [f for f in ("avx512f", "avx512_vnni", "avx_vnni", "avx2", "fma") if f" {f}" in info]
    return (f"{cpu} (family {family} model {model}), {len(os.sched_getaffinity(0))} cores available, "
            f"ISA flags {'/'.join(isa) or 'n/a'}")


def expert_flops(model, tokens: int) -> float:
    """Multiply-add work of the experts for ``tokens`` tokens: top_k rows per token through its expert's layers."""
    spec = model.config.expert_specs()[0]
    rows = tokens * model.config.top_k
    return 2.0 * rows * sum(a * b for a, b in zip(spec.widths[:-1], spec.widths[1:], strict=True))


def roofline_shapes(model, tokens: int) -> tuple[int, int, int]:
    """(M, K, N) of the one GEMM with the experts' FLOPs: all routed rows times one matrix of all layers' weights."""
    rows, k = tokens * model.config.top_k, model.config.expert_specs()[0].widths[0]
    return rows, k, round(expert_flops(model, tokens) / (2.0 * rows * k))


def int8_gemm_session(m: int, k: int, n: int, threads: int):
    """ONNX Runtime's own int8 GEMM (MatMulInteger u8 x s8 -> int32, MLAS), the int8 path's roofline."""
    import onnxruntime as ort
    from onnx import TensorProto

    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "int8_gemm",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, [m, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [m, n])],
                              [numpy_helper.from_array(np.random.default_rng(1).integers(-127, 128, (k, n))
                                                       .astype(np.int8), "B")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(2).integers(0, 256, (m, k)).astype(np.uint8)
    return lambda: session.run(None, {"A": a})


def measure(model, args, variants: dict, tokens_list: list[int], inputs: dict, threads: int) -> tuple[list, dict]:
    """One thread count: every variant, ``args.rounds`` rounds; returns the rows and ort_pimoe's outputs."""
    torch.set_num_threads(threads)
    repeats = {t: max(5, args.repeats if t <= 128 else args.repeats // 3) for t in tokens_list}
    # Several rounds, each measuring every variant once; a cell is the median over rounds of per-round medians.
    # Rounds spread every variant over the whole run, so a slow spell of this (virtual) machine does not land on
    # one variant only; the spread across rounds is reported too.
    samples: dict[int, dict[str, list[float]]] = {t: {} for t in tokens_list}
    outputs: dict[tuple[str, int], list[np.ndarray]] = {}
    gemm = {t: roofline_shapes(model, t) for t in tokens_list}
    for _ in range(args.rounds):
        with torch.inference_mode():
            for t in tokens_list:
                xt = torch.from_numpy(inputs[t])
                a, b = torch.randn(gemm[t][0], gemm[t][1]), torch.randn(gemm[t][1], gemm[t][2])
                samples[t].setdefault("roofline_sgemm", []).append(
                    median_ms(lambda a=a, b=b: torch.mm(a, b), repeats[t]))
                samples[t].setdefault("torch_eager_loop", []).append(
                    median_ms(lambda xt=xt: eager_loop(model, xt), repeats[t]))
                samples[t].setdefault("torch_pimoe", []).append(median_ms(lambda xt=xt: model(xt), repeats[t]))
        if "ort_pimoe_int8" in variants:
            for t in tokens_list:
                run = int8_gemm_session(*gemm[t], threads)
                samples[t].setdefault("roofline_int8", []).append(median_ms(run, repeats[t]))
                del run
        for name, make in variants.items():
            session = make(threads)
            for t in tokens_list:
                feeds = {LAYER_INPUT: inputs[t]}
                samples[t].setdefault(name, []).append(
                    median_ms(lambda s=session, f=feeds: s.run(None, f), repeats[t]))
                if name.startswith("ort_pimoe"):
                    outputs.setdefault((name, t), []).append(session.run(None, feeds)[0])
            del session
            gc.collect()
    rows = []
    for t in tokens_list:
        row: dict[str, float | int] = {"threads": threads, "tokens": t, "repeats": repeats[t],
                                       "gflop": expert_flops(model, t) / 1e9}
        row.update({name: float(np.median(v)) for name, v in samples[t].items()})
        row["spread"] = max((max(v) - min(v)) / float(np.median(v)) for v in samples[t].values())
        rows.append(row)
    return rows, outputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="seed-512")
    parser.add_argument("--tokens", default="1,16,128,1024")
    parser.add_argument("--repeats", type=int, default=30)
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--threads", default=",".join(str(t) for t in sorted({1, cores})),
                        help="comma-separated thread counts, each measured in full (default: 1 and all cores)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all variants (median across rounds)")
    parser.add_argument("--int8", type=Path, help="a W8A8 ONNX of the same model (default: quantised here, "
                                                 "static scales, entropy calibration on seeded normal data)")
    parser.add_argument("--no-int8", action="store_true", help="leave the INT8 path out")
    parser.add_argument("--json", type=Path, default=ROOT / "build" / "bench" / "cpu.json")
    parser.add_argument("--update-docs", action="store_true", help="rewrite the CPU section of docs/benchmarks.md")
    args = parser.parse_args()

    model = create_from_preset(args.preset, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="pimoe-bench-"))
    custom, standard = tmp / "custom.onnx", tmp / "standard.onnx"
    export_onnx(model, custom)
    export_onnx(model, standard, standard_ops=True)
    import onnxruntime as ort

    def plain_session(source, threads: int):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])

    contrib = contrib_moe_model(model, custom)
    # One variant at a time, its session released before the next is created: idle ONNX Runtime thread pools
    # spin, and on a 2-core machine a second live session would steal the cores from the one being timed.
    variants = {
        "ort_standard": lambda th: plain_session(str(standard), th),
        "ort_contrib_moe": lambda th: plain_session(contrib, th),
        "ort_pimoe": lambda th: create_session(custom, threads=th),
    }
    if not args.no_int8:
        int8 = args.int8
        if int8 is None:
            from pimoe_export.quantize import quantize_model

            int8 = quantize_model(model, tmp / "model.int8.onnx", method="entropy", fp32_onnx=custom).onnx_path
        variants["ort_pimoe_int8"] = lambda th: create_session(int8, threads=th)
    tokens_list = [int(t) for t in args.tokens.split(",")]
    load_before = os.getloadavg()[0]
    inputs = {t: np.random.default_rng(t).standard_normal((1, t, model.hidden_size)).astype(np.float32)
              for t in tokens_list}
    rows, identical = [], True
    reference: dict[tuple[str, int], np.ndarray] = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        thread_rows, outputs = measure(model, args, variants, tokens_list, inputs, threads)
        rows += thread_rows
        for key, outs in outputs.items():  # every run, every thread count: the same bits
            reference.setdefault(key, outs[0])
            identical = identical and all(np.array_equal(reference[key], o) for o in outs)
    for row in rows:
        print(json.dumps(row), flush=True)
    lib = check_ort_library(str(find_ort_library()))
    meta = {"preset": args.preset, "threads": args.threads, "rounds": args.rounds, "machine": machine_description(),
            "onnxruntime": ort.__version__, "torch": torch.__version__, "cpu_isa": lib["cpu_isa"],
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after (ours included)
            "bit_identical_across_threads": identical,
            "date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = render(meta, rows)
    print(table)
    if args.update_docs:  # one table per machine kind: the kernel set ours ran names it
        update_docs(table, f"cpu-{args.preset}-{lib['cpu_isa']}")
    return 0


def render(meta: dict, rows: list[dict]) -> str:
    skip = ("threads", "tokens", "repeats", "spread", "gflop")
    names = [k for k in rows[0] if k not in skip]
    int8 = "ort_pimoe_int8" in names
    lines = [
        f"Command: `{meta['command'].replace(str(ROOT) + '/', '')}`  ",
        f"Date: {meta['date']}; machine: {meta['machine']}; onnxruntime {meta['onnxruntime']}, torch "
        f"{meta['torch']}, pimoe CPU kernels (`ort_pimoe`, `ort_pimoe_int8`): {meta['cpu_isa']}; ONNX Runtime's "
        f"MLAS and PyTorch's MKL pick their own from the same CPU. `ort_pimoe` outputs bit-identical across runs and "
        f"thread counts: {'yes' if meta['bit_identical_across_threads'] else '**no**'}."
        + (f" 1-minute load average before the run: {meta['load_average'][0]} (above ~0.3, other jobs shared the "
           "cores)." if "load_average" in meta else ""),
        "",
        f"Median latency (ms), batch 1, fp32 unless named; median over {meta['rounds']} rounds of per-round medians "
        "(largest spread between rounds, relative: " + ", ".join(
            f"{r['threads']}t T={r['tokens']} {r['spread']:.0%}" for r in rows) + "). `roofline_sgemm`: one "
        "`torch.mm` (MKL) with the experts' FLOPs; `roofline_int8`: one ONNX Runtime `MatMulInteger` (u8 x s8, "
        "MLAS) with the same multiply-adds:",
        "",
        "| threads | tokens | expert GFLOP | " + " | ".join(names) + " |",
        "|---" * (len(names) + 3) + "|",
    ]
    for row in rows:
        lines.append(f"| {row['threads']} | {row['tokens']} | {row['gflop']:.3f} | "
                     + " | ".join(f"{row[n]:.3f}" for n in names) + " |")
    ours = "ort_pimoe"
    head = ["vs torch_eager_loop", "vs torch_pimoe", "vs ort_standard", "vs ort_contrib_moe",
            "GFLOP/s (share of roofline_sgemm)"]
    if int8:
        head += ["int8 vs contrib fp32", "int8 vs torch_eager_loop", "int8 GOP/s (share of roofline_int8)"]
    lines += ["", f"Speed-up of `{ours}` (higher is better) and the rate of its expert work:", "",
              "| threads | tokens | " + " | ".join(head) + " |", "|---" * (len(head) + 2) + "|"]
    for row in rows:
        cells = [f"{row[n] / row[ours]:.2f}×" for n in ("torch_eager_loop", "torch_pimoe", "ort_standard",
                                                        "ort_contrib_moe")]
        rate = row["gflop"] / row[ours] * 1e3
        cells.append(f"{rate:.1f} ({row['roofline_sgemm'] / row[ours]:.0%})")
        if int8:
            q = "ort_pimoe_int8"
            cells += [f"{row['ort_contrib_moe'] / row[q]:.2f}×", f"{row['torch_eager_loop'] / row[q]:.2f}×",
                      f"{row['gflop'] / row[q] * 1e3:.1f} ({row['roofline_int8'] / row[q]:.0%})"]
        lines.append(f"| {row['threads']} | {row['tokens']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def update_docs(table: str, key: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    block = f"{begin}\n{table}{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
    print(f"updated {path}")


if __name__ == "__main__":
    sys.exit(main())
