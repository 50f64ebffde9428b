"""The CPU kernel sets of libpimoe_ort (the values of PIMOE_CPU_ISA) and which of them this machine runs.

The library picks one set per process (plugins/kernels/cpu/kernels_select.cpp): ``avx512`` where the CPU has
AVX-512 F/BW/DQ/VL and VNNI, else ``avx2`` (AVX2 + FMA + F16C), else ``generic``; ``avx512-simde``, the AVX-512
source built on SIMDe's portable intrinsics so that CPUs without AVX-512 run it, only when PIMOE_CPU_ISA names it.
The tests run every set this machine runs: the library's own choice in the test process, the others in
subprocesses with PIMOE_CPU_ISA set (their test ids name the set).

Run as a script (``python tests/cpu_kernel_sets.py CASES OUT``) it is the subprocess of tests/ops/test_cpu_isa.py: every
``CASES/*.onnx`` model on its ``.npz`` inputs, with 1 and 2 threads and in concurrent calls, which must all give the
same bits; the outputs go to ``OUT`` (.npz) and the kernel set the library ran is printed.
"""

from __future__ import annotations

import os
from pathlib import Path

KERNEL_SETS = ("generic", "avx2", "avx512", "avx512-simde")
_AVX2 = frozenset({"avx2", "fma", "f16c"})
_NEEDS = {
    "generic": frozenset(),
    "avx2": _AVX2,
    "avx512": _AVX2 | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"},
    "avx512-simde": _AVX2,  # SIMDe's portable AVX-512 is compiled for AVX2
}
DESCRIPTION = {
    "generic": "generic (portable C++)",
    "avx2": "avx2 (native AVX2)",
    "avx512": "avx512 (native AVX-512 + VNNI)",
    "avx512-simde": "avx512-simde (the AVX-512 source on SIMDe, no AVX-512 instructions)",
}


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo; None where there are none to read (not x86-64 Linux)."""
    info = Path("/proc/cpuinfo")
    if os.uname().machine != "x86_64" or not info.is_file():
        return None
    line = next((line for line in info.read_text().splitlines() if line.startswith("flags")), "")
    return frozenset(line.split(":", 1)[-1].split())


def runs_here(kernel_set: str) -> bool:
    """Whether this machine has the instructions of ``kernel_set`` (the library then must run it when asked)."""
    if kernel_set == "generic":
        return True
    flags = cpu_flags()
    return flags is not None and _NEEDS[kernel_set] <= flags


def default_kernel_set() -> str:
    """The set the library runs in this process: PIMOE_CPU_ISA when set, else the best one this CPU runs."""
    forced = os.environ.get("PIMOE_CPU_ISA")
    if forced:
        return forced
    return next(s for s in ("avx512", "avx2", "generic") if runs_here(s))


def other_kernel_sets() -> list[str]:
    """Every set this machine runs except the test process's own: the tests run them in subprocesses."""
    return [s for s in KERNEL_SETS if s != default_kernel_set() and runs_here(s)]


def main(cases: Path, out: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from pimoe_export.runtime.ort import check_ort_library, create_session, find_ort_library

    results: dict[str, np.ndarray] = {}
    for model in sorted(cases.glob("*.onnx")):
        with np.load(model.with_suffix(".npz")) as data:  # keys: <input name>/<i>, one feed per i
            feeds: list[dict[str, np.ndarray]] = []
            for key in sorted(data.files):
                name, index = key.rsplit("/", 1)
                while len(feeds) <= int(index):
                    feeds.append({})
                feeds[int(index)][name] = data[key]
        expected = [create_session(model, threads=1).run(None, f) for f in feeds]
        shared = create_session(model, threads=2)
        with ThreadPoolExecutor(max_workers=4) as pool:  # concurrent calls of different sizes on one session
            calls = [feeds[i % len(feeds)] for i in range(4 * len(feeds))]
            got = list(pool.map(lambda f, s=shared: s.run(None, f), calls))
        for i, outputs in enumerate(got):
            for a, b in zip(outputs, expected[i % len(feeds)], strict=True):
                if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():  # bits, NaNs included
                    raise SystemExit(f"{model.name}: call {i} with 2 threads (concurrent) differs from 1 thread")
        for i, outputs in enumerate(expected):
            for j, y in enumerate(outputs):
                results[f"{model.stem}/{i}/{j}"] = y
    np.savez(out, **results)
    print(check_ort_library(str(find_ort_library()))["cpu_isa"])


if __name__ == "__main__":
    import sys

    main(Path(sys.argv[1]), Path(sys.argv[2]))
