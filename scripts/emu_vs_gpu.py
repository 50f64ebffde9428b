#!/usr/bin/env python3
"""The CUDA emulator checked against a real GPU: the same plugin calls, with the same inputs, through the CUDA harness
(libpimoe_trt_harness.so, on the GPU) and the emulated one (libpimoe_trt_harness_emu.so, on the CPU), outputs
compared with the tolerances docs/verification.md states for the emulated rung.

Run by scripts/gpu_check.sh on the first GPU at hand; writes emu_vs_gpu.json and emu_vs_gpu.md into --out. Exit code
1 when a case differs beyond its tolerance (the emulator, or its stated tolerance, is then wrong), 2 when a library
is missing.

    python scripts/emu_vs_gpu.py --cuda build/gpu-plugins/harness/libpimoe_trt_harness.so \\
        --emu build/gpu-emu/emu/libpimoe_trt_harness_emu.so --out gpu-results
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pimoe_export.ops import schema  # noqa: E402
from pimoe_export.testing.harness import Harness, HarnessOpBackend, expert_mlp_fields  # noqa: E402

# (kind of comparison, tolerance): "exact" = identical bits; "close" = |a - b| <= tol * max(1, max|b|)
Case = tuple[Callable[[np.random.Generator], tuple[str, dict, list[np.ndarray]]], str, float]


def route_case(dtype, **v2):
    """``v2``: contract-v2 attributes (scoring, groups, ...); sigmoid without groups gets no bias (ranks logits)."""
    def make(rng):
        logits = rng.normal(0, 2, size=(257, 64)).astype(dtype)
        bias = [] if v2.get("scoring") == "sigmoid" and v2.get("num_groups", 1) == 1 else \
            [rng.normal(0, 0.05, 64).astype(np.float32)]
        return schema.ROUTE, {"k": 4, "normalize": 1, **v2}, [logits, *bias]
    return make


def dispatch_case(dtype, n, k, e, h):
    def make(rng):
        return schema.DISPATCH, {"num_experts": e}, [rng.normal(size=(n, h)).astype(dtype),
                                                      rng.integers(0, e, size=(n, k)).astype(np.int32)]
    return make


def combine_case(dtype, order="slot"):
    def make(rng):
        n, k, h = 300, 2 if order == "slot" else 6, 72
        attrs = {} if order == "slot" else {"order": order}
        return schema.COMBINE, attrs, [rng.normal(size=(n * k, h)).astype(dtype),
                                       rng.permutation(n * k).astype(np.int32),
                                       rng.random(size=(n, k)).astype(np.float32)]
    return make


def mlp_case(dtype, rows_per_expert, quant_mode="none", activation="gelu", layer_norm=True, widths=(64, 256, 64),
             gated=False):
    """3 of 8 experts with random segment lengths; int8 weights with per-channel scales, SmoothQuant divisors and
    static activation scales in the w8a8 modes. ``gated``: contract-v2 GLU hidden layers, bias-free."""
    def make(rng):
        from pimoe_export.quantize.int8 import quantize_weight

        e, group = 8, [1, 4, 6]
        offsets = np.concatenate([[0], np.cumsum(rng.integers(0, rows_per_expert + 1, size=e))]).astype(np.int32)
        x = rng.normal(size=(int(offsets[-1]), widths[0])).astype(dtype)
        params = []
        for layer, role in schema.expert_mlp_param_layout(len(widths) - 1, layer_norm, quant_mode, bias=not gated):
            out, inp = widths[layer + 1], widths[layer]
            if role in ("weight", "w_scale", "bias"):
                out = schema.expert_mlp_param_rows(list(widths), layer, gated)
            if role == "weight":
                w = (rng.normal(size=(len(group), out, inp)) / np.sqrt(inp)).astype(np.float32)
                codes, w_scale = quantize_weight(w) if quant_mode != "none" else (w.astype(dtype), None)
                params.append(codes)
            elif role == "w_scale":
                params.append(w_scale)
            elif role == "act_smooth":
                params.append(rng.uniform(0.5, 2.0, size=(len(group), inp)).astype(np.float32))
            elif role == "ln_gamma":
                params.append(rng.uniform(0.5, 1.5, size=(len(group), out)).astype(np.float32))
            else:
                params.append(rng.normal(0, 0.1, size=(len(group), out)).astype(np.float32))
        scales = ([float(np.float32(rng.uniform(0.005, 0.05))) for _ in range((len(widths) - 1) * len(group))]
                  if quant_mode == "w8a8" else [])
        v2 = {"gated": True, "bias": False} if gated else {}
        attrs = expert_mlp_fields(group, widths, activation, layer_norm, quant_mode=quant_mode, act_scales=scales, **v2)
        return schema.EXPERT_MLP, attrs, [x, offsets, *params]
    return make


CASES: dict[str, Case] = {
    "route fp32 (E=64, k=4)": (route_case(np.float32), "close", 2e-6),
    "route fp16": (route_case(np.float16), "close", 2e-6),
    "dispatch fp32, 40000 pairs (tiling limit)": (dispatch_case(np.float32, 20000, 2, 64, 8), "exact", 0),
    "dispatch fp16, h=13 (scalar copy)": (dispatch_case(np.float16, 500, 4, 16, 13), "exact", 0),
    "combine fp32": (combine_case(np.float32), "exact", 0),
    "combine fp16": (combine_case(np.float16), "exact", 0),
    "expert MLP fp32 (SIMT GEMM, LayerNorm, gelu)": (mlp_case(np.float32, 40), "close", 1e-5),
    "expert MLP fp16, few rows (tensor cores, split-K)": (mlp_case(np.float16, 3), "close", 4e-3),
    "expert MLP fp16, 150 rows/expert (tensor cores)": (mlp_case(np.float16, 150), "close", 4e-3),
    "expert MLP w8a8, few rows (int8 mma, 16-row tiles, cp.async)": (
        mlp_case(np.float32, 3, "w8a8", "relu", False), "exact", 0),
    "expert MLP w8a8_dynamic fp16, 150 rows/expert (64-row tiles)": (
        mlp_case(np.float16, 150, "w8a8_dynamic", "relu", False), "exact", 0),
    "expert MLP w8a8 + LayerNorm + gelu": (mlp_case(np.float32, 40, "w8a8", "gelu", True), "close", 1e-2),
    # contract v2
    "route sigmoid, 8 groups, sum of top 2, scaled": (route_case(np.float32, scoring="sigmoid", num_groups=8,
                                                                 groups_kept=4, group_score="sum_top2",
                                                                 routed_scaling_factor=2.5, normalize_eps=1e-20),
                                                      "close", 2e-6),
    "route softmax_topk fp16": (route_case(np.float16, scoring="softmax_topk"), "close", 2e-6),
    "route sigmoid without bias (ranks logits)": (route_case(np.float32, scoring="sigmoid"), "close", 2e-6),
    "combine fp32, expert order": (combine_case(np.float32, "expert"), "exact", 0),
    "expert MLP gated fp32 silu (SIMT, GLU pass)": (mlp_case(np.float32, 40, "none", "silu", False, gated=True),
                                                    "close", 1e-5),
    "expert MLP gated fp16 swiglu_oai, few rows (split-K)": (
        mlp_case(np.float16, 3, "none", "swiglu_oai", False, gated=True), "close", 4e-3),
    "expert MLP gated w8a8_dynamic relu": (mlp_case(np.float32, 40, "w8a8_dynamic", "relu", False, gated=True),
                                           "exact", 0),
}


def compare(kind: str, tol: float, gpu: list[np.ndarray], emu: list[np.ndarray]) -> tuple[bool, float]:
    worst = 0.0
    ok = True
    for a, b in zip(gpu, emu, strict=True):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False, float("inf")
        if kind == "exact" or a.dtype.kind == "i":
            same = np.array_equal(a.view(np.uint8), b.view(np.uint8))
            ok &= same
            worst = max(worst, 0.0 if same else float(np.nanmax(np.abs(a.astype(np.float64) - b))))
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        if not np.array_equal(np.isnan(a64), np.isnan(b64)):
            return False, float("inf")
        diff = float(np.nanmax(np.abs(a64 - b64), initial=0.0))
        scale = max(1.0, float(np.nanmax(np.abs(b64), initial=0.0)))
        worst = max(worst, diff / scale)
        ok &= diff <= tol * scale
    return ok, worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", required=True, help="libpimoe_trt_harness.so (CUDA build)")
    parser.add_argument("--emu", required=True, help="libpimoe_trt_harness_emu.so (emulated build)")
    parser.add_argument("--out", default="gpu-results")
    parser.add_argument("--dry-run", action="store_true",
                        help="both sides emulated (scripts/gpu_check.sh --dry-run: checks this script, not the GPU)")
    args = parser.parse_args(argv)
    for path in (args.cuda, args.emu):
        if not Path(path).is_file():
            print(f"emu_vs_gpu.py: {path} does not exist", file=sys.stderr)
            return 2
    gpu, emu = HarnessOpBackend(Harness(args.cuda)), HarnessOpBackend(Harness(args.emu))
    if (gpu.harness.emulated and not args.dry_run) or not emu.harness.emulated:
        print("emu_vs_gpu.py: --cuda must be the CUDA build and --emu the emulated one", file=sys.stderr)
        return 2
    rows, failed = [], 0
    for seed, (name, (make, kind, tol)) in enumerate(CASES.items()):
        op, attrs, arrays = make(np.random.default_rng(100 + seed))
        ok, worst = compare(kind, tol, gpu.run(op, attrs, arrays), emu.run(op, attrs, arrays))
        failed += not ok
        rows.append({"case": name, "comparison": kind, "tolerance": tol, "worst": worst, "ok": ok})
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {kind} (worst {worst:.3g}, tolerance {tol:g})", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "emu_vs_gpu.json").write_text(json.dumps(rows, indent=2))
    table = ["| case | comparison | worst relative difference | tolerance | result |", "|---|---|---|---|---|"]
    table += [f"| {r['case']} | {r['comparison']} | {r['worst']:.3g} | {r['tolerance']:g} | "
              f"{'ok' if r['ok'] else 'FAIL'} |" for r in rows]
    (out / "emu_vs_gpu.md").write_text("\n".join(table) + "\n")
    print(f"{len(rows) - failed}/{len(rows)} cases agree")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
