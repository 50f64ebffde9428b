#!/usr/bin/env python3
"""The CPU expert op's int8 GEMM against the libraries that could do it: ONNX Runtime's MLAS and oneDNN.

One thread, the seed-512 experts' shapes at T tokens (T * k / E rows per expert, k = 2, E = 8): E times
[rows, 512] x [512, 2048] and [rows, 2048] x [2048, 512], plus the benchmark's one-GEMM roofline shape
[T * k, 512] x [512, 4096]. Ours: scripts/bench_int8_gemm.cpp on build/plugins' kernel tables (each kernel set this
CPU runs, dequantising output stage included); MLAS: ONNX Runtime MatMulInteger (u8 x s8 -> int32), one node per
expert in one session; oneDNN (only when its headers are installed, e.g. Debian's libdnnl-dev): its matmul primitive
u8 x s8 -> s32 with weights reordered once, and whether it is exact on the worst case of our codes
(a + 128 = 255 times w = 127), at its best ISA and limited to AVX2 (DNNL_MAX_CPU_ISA).

    .venv/bin/python scripts/bench_int8_gemm.py --tokens 128,1024
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(out: Path) -> bool:
    """Compile the C++ half; returns whether oneDNN is in it."""
    dnnl = Path("/usr/include/dnnl.hpp").is_file() or Path("/usr/include/oneapi/dnnl/dnnl.hpp").is_file()
    lib = ROOT / "build" / "plugins" / "kernels" / "libpimoe_cpu_kernels.a"
    if not lib.is_file():
        raise SystemExit(f"{lib} is missing: run scripts/setup.sh")
    cmd = ["c++", "-O2", "-std=c++17", f"-I{ROOT}/plugins/kernels/cpu", f"-I{ROOT}/plugins/common",
           str(ROOT / "scripts" / "bench_int8_gemm.cpp"), str(lib), "-o", str(out)]
    if dnnl:
        cmd[4:4] = ["-DPIMOE_WITH_DNNL"]
        cmd += ["-ldnnl"]
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, check=True)
    return dnnl


def run(binary: Path, args: list[str], env: dict[str, str]) -> list[str]:
    result = subprocess.run([str(binary), *args], capture_output=True, text=True, env={**os.environ, **env},
                            check=True)
    return result.stdout.split()


def runs_here(binary: Path, kernel_set: str) -> bool:
    """The kernel table runs on this CPU (the library refuses a PIMOE_CPU_ISA it cannot run)."""
    return subprocess.run([str(binary), "ours", "1", "4", "16", "1"], capture_output=True,
                          env={**os.environ, "PIMOE_CPU_ISA": kernel_set}).returncode == 0


def mlas_ms(shapes: list[tuple[int, int, int]]) -> float:
    """One session, one MatMulInteger node per shape, one thread: median of 30 runs after warm-up."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    nodes, inputs, outputs, weights, feeds = [], [], [], [], {}
    for i, (m, k, n) in enumerate(shapes):
        nodes.append(helper.make_node("MatMulInteger", [f"A{i}", f"B{i}"], [f"Y{i}"]))
        inputs.append(helper.make_tensor_value_info(f"A{i}", TensorProto.UINT8, [m, k]))
        outputs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.INT32, [m, n]))
        weights.append(numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), f"B{i}"))
        feeds[f"A{i}"] = rng.integers(1, 256, (m, k)).astype(np.uint8)
    model = helper.make_model(helper.make_graph(nodes, "experts", inputs, outputs, weights),
                              opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, feeds)
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.min(times))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="128,1024")
    args = parser.parse_args()
    binary = ROOT / "build" / "bench" / "bench_int8_gemm"
    dnnl = build(binary)
    sets = [s for s in ("avx512", "avx2") if runs_here(binary, s)]
    print("| shape (one thread) | GOP | " + " | ".join(f"ours, {s}" for s in sets) + " | MLAS (ONNX Runtime) | "
          + ("oneDNN | oneDNN, AVX2 only |" if dnnl else ""))
    print("|---|---|" + "---|" * (len(sets) + 1 + (2 if dnnl else 0)))
    for t in [int(x) for x in args.tokens.split(",")]:
        rows = t * 2 // 8
        cases = [(f"T = {t}: 8 x [{rows}, 512] x [512, 2048]", rows, 512, 2048, 8),
                 (f"T = {t}: 8 x [{rows}, 2048] x [2048, 512]", rows, 2048, 512, 8),
                 (f"T = {t}: [{t * 2}, 512] x [512, 4096] (roofline shape)", t * 2, 512, 4096, 1)]
        for label, m, k, n, e in cases:
            gop = 2.0 * m * k * n * e / 1e9
            cells = []
            for s in sets:
                _, _, ms, _ = run(binary, ["ours", str(m), str(k), str(n), str(e)], {"PIMOE_CPU_ISA": s})
                cells.append(f"{float(ms):.3f} ms ({gop / float(ms) * 1e3:.0f} GOP/s)")
            ms = mlas_ms([(m, k, n)] * e)
            cells.append(f"{ms:.3f} ms ({gop / ms * 1e3:.0f})")
            if dnnl:
                for env in ({}, {"DNNL_MAX_CPU_ISA": "AVX2"}):
                    _, impl, ms2, _ = run(binary, ["dnnl", str(m), str(k), str(n), str(e)],
                                          {"OMP_NUM_THREADS": "1", **env})
                    cells.append(f"{float(ms2):.3f} ms ({gop / float(ms2) * 1e3:.0f}; {impl})")
            print(f"| {label} | {gop:.3f} | " + " | ".join(cells) + " |", flush=True)
    if dnnl:
        for env in ({}, {"DNNL_MAX_CPU_ISA": "AVX2"}):
            _, impl, exact, got, want = run(binary, ["dnnl-exact"], {"OMP_NUM_THREADS": "1", **env})
            print(f"oneDNN {impl} on 255 x 127 products (K = 512): exact {exact} (got {got}, exact {want})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
