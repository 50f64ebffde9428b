#!/usr/bin/env python3
"""Mutation testing of the C++ in plugins/ (CPU kernels, ONNX Runtime library, shared contract headers; with
``--cuda`` also the CUDA kernels, on the emulated GPU).

Each mutant is one small, deterministic source change (a relational, arithmetic or logical operator, a dropped
``!``, a constant 0 <-> 1, a loop bound one short, min <-> max, a removed ``if (...) return ...;`` check). It is
applied to a COPY of plugins/ (build/mutation/src; plugins/ itself is never touched), libpimoe_ort is rebuilt in
its own build folder (build/mutation/build), and the fast ONNX Runtime op tests run against the mutant's library
(PIMOE_ORT_LIBRARY; PIMOE_CPU_ISA names the kernel set a mutated kernel file implements: generic, avx2, and for
the AVX-512 file avx512 where the CPU has it, else its SIMDe build avx512-simde). A failing, crashing or timed-out
test run kills the mutant; a mutant that does not compile is 'invalid' and left out of the score.

    .venv/bin/python scripts/mutate_cpp.py --list                 # every mutant, numbered
    .venv/bin/python scripts/mutate_cpp.py --sample 70 --json build/mutation/report.json
    .venv/bin/python scripts/mutate_cpp.py --only 12,40           # selected mutants
    .venv/bin/python scripts/mutate_cpp.py --files plugins/ops/... --sample 10

CUDA kernels (``--cuda``): mutants of plugins/kernels/cuda/*.cu are built into the TensorRT harness on the CPU CUDA
emulator (plugins/emu, ``pimoe_trt_harness_emu``) and judged by the emulated-GPU tests: tests/emu/test_emu.py (every
plugin through its profile shapes against the PyTorch reference, guard bytes around every buffer) and the ``emu``
backend of tests/ops/test_ops_backends.py (PIMOE_TRT_HARNESS_EMU points at the mutant's harness).

    .venv/bin/python scripts/mutate_cpp.py --cuda --files plugins/kernels/cuda/combine.cu --sample 5

docs/mutation.md records the score and the survivors.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
WORK = ROOT / "build" / "mutation"
SOURCES = [
    "plugins/kernels/cpu/ops_cpu.cpp",
    "plugins/kernels/cpu/expert_mlp.cpp",
    "plugins/kernels/cpu/kernels_generic.cpp",
    "plugins/kernels/cpu/kernels_avx2.cpp",
    "plugins/ort/pimoe_ort_io.cpp",
    "plugins/ort/pimoe_ort_cpu.cpp",
    "plugins/kernels/cpu/kernels_avx512.cpp",
    "plugins/kernels/cpu/kernels_select.cpp",
    "plugins/ort/pimoe_ort.cpp",
    "plugins/common/pimoe_attrs.h",
    "plugins/common/pimoe_contract.h",
]
AREAS = ("plugins/kernels/cpu", "plugins/ort", "plugins/common")
CUDA_AREA = "plugins/kernels/cuda"
CUDA_SOURCES = [f"{CUDA_AREA}/{name}.cu" for name in ("route", "dispatch", "combine", "expert_mlp", "gemm_f32_simt",
                                                       "gemm_f16_wmma", "gemm_i8_wmma")]
# the CUDA kernels on the emulated GPU: the harness's plugin-level tests and the op matrix's emu backend
CUDA_TESTS = ["tests/emu/test_emu.py", "tests/ops/test_ops_backends.py", "tests/ops/test_contract_agreement.py"]
CUDA_SELECT = "emu and not sanitizer and not selftest"
# kernel files and the kernel set (PIMOE_CPU_ISA) that runs them: the library picks only one set by itself
KERNEL_SET_OF = {"plugins/kernels/cpu/kernels_generic.cpp": "generic", "plugins/kernels/cpu/kernels_avx2.cpp": "avx2",
                 "plugins/kernels/cpu/kernels_avx512.cpp": "avx512"}
# The fast tests that exercise libpimoe_ort; the targeted boundary tests first (they fail fastest).
TESTS = [
    "tests/ops/test_op_boundaries.py",
    "tests/ops/test_ort_op_bad_inputs.py",
    "tests/ops/test_contract_agreement.py",
    "tests/ops/test_ops_backends.py",
]
TEST_SELECT = "not emu and not trt and not harness and not every_kernel_set"
OP_EXAMPLES = "12"  # hypothesis examples per op test (the suite runs 200)


@dataclass
class Mutant:
    id: int
    file: str
    line: int
    col: int
    op: str
    before: str
    after: str

    def apply(self, text: str) -> str:
        lines = text.split("\n")
        old = lines[self.line - 1]
        assert old[self.col:self.col + len(self.before)] == self.before, (self, old)
        lines[self.line - 1] = old[:self.col] + self.after + old[self.col + len(self.before):]
        return "\n".join(lines)

    def diff(self, text: str) -> str:
        old = text.split("\n")[self.line - 1]
        new = self.apply(text).split("\n")[self.line - 1]
        return "\n".join(difflib.unified_diff([old], [new], self.file, self.file, n=0, lineterm=""))


# ------------------------------------------------------------------------------------------ finding mutants
def mutable_mask(text: str) -> list[bool]:
    """True for every character that is code: not a comment, string/char literal, preprocessor line, nor an
    argument of msg(...) (error-message text), nor a line of a static_assert."""
    mask = [True] * len(text)
    i, n = 0, len(text)
    msg_depth = 0  # parenthesis depth inside msg( ... )
    line_start = True
    while i < n:
        c = text[i]
        if line_start and text[i:].lstrip(" ").startswith("#"):
            j = text.find("\n", i)
            j = n if j < 0 else j
            mask[i:j] = [False] * (j - i)
            i = j
            continue
        line_start = c == "\n"
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            mask[i:j] = [False] * (j - i)
            i = j
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i) + 2
            mask[i:j] = [False] * (j - i)
            i = j
            continue
        if c in "\"'":
            j = i + 1
            while text[j] != c:
                j += 2 if text[j] == "\\" else 1
            mask[i:j + 1] = [False] * (j + 1 - i)
            i = j + 1
            continue
        if msg_depth == 0 and re.match(r"\bmsg\(", text[i:i + 4]) and (i == 0 or not text[i - 1].isalnum()):
            msg_depth = 1
            mask[i:i + 4] = [False] * 4
            i += 4
            continue
        if msg_depth:
            msg_depth += {"(": 1, ")": -1}.get(c, 0)
            mask[i] = False
        i += 1
    return mask


# (name, pattern, replacement): the pattern's group 1 is what is replaced
RULES: list[tuple[str, str, str]] = [
    ("rel", r" (<) ", "<="), ("rel", r" (<=) ", "<"), ("rel", r" (>) ", ">="), ("rel", r" (>=) ", ">"),
    ("eq", r" (==) ", "!="), ("eq", r" (!=) ", "=="),
    ("arith", r" (\+) ", "-"), ("arith", r" (-) ", "+"), ("arith", r" (\*) ", "/"), ("arith", r" (/) ", "*"),
    ("arith", r" (\+=) ", "-="), ("arith", r" (-=) ", "+="),
    ("logic", r" (&&) ", "||"), ("logic", r" (\|\|) ", "&&"),
    ("not", r"[( ](!)[\w(]", ""),
    ("const", r"(?<![\w.])(0)(?![\w.x])", "1"), ("const", r"(?<![\w.])(1)(?![\w.])", "0"),
    ("const", r"(?<![\w.])(0\.0f)", "1.0f"), ("const", r"(?<![\w.])(1\.0f)", "0.0f"),
    ("minmax", r"std::(min)\(", "max"), ("minmax", r"std::(max)\(", "min"),
    ("bound", r"for \([^;]*; \w+ < ([\w.\[\]()>:-]+);", "{0} - 1"),  # a loop bound one short
]


def find_mutants(files: list[str], base: Path = ROOT) -> list[Mutant]:
    """Every mutant of ``files`` (paths relative to the repository) as they are under ``base``."""
    mutants: list[Mutant] = []
    for rel in files:
        text = (base / rel).read_text()
        mask = mutable_mask(text)
        offset = 0
        for number, line in enumerate(text.split("\n"), start=1):
            line_mask = mask[offset:offset + len(line)]
            offset += len(line) + 1
            if not any(line_mask) or "static_assert" in line:
                continue
            found: list[tuple[int, str, str, str]] = []
            for name, pattern, repl in RULES:
                for m in re.finditer(pattern, line):
                    start, end = m.span(1)
                    if not all(line_mask[start:end]):
                        continue
                    before = m.group(1)
                    after = repl.format(before)
                    found.append((start, name, before, after))
            # a check that returns early: the whole statement removed
            m = re.match(r"^(\s*)(if \(.*\) return [^;]*;)$", line)
            if m and all(line_mask[m.start(2):m.start(2) + 2]):
                found.append((m.start(2), "drop-check", m.group(2), ";"))
            for col, name, before, after in sorted(found):
                mutants.append(Mutant(0, rel, number, col, name, before, after))
    for i, mutant in enumerate(mutants):
        mutant.id = i
    return mutants


def area_of(rel: str) -> str:
    return next(a for a in (*AREAS, CUDA_AREA) if rel.startswith(a))


def sample(mutants: list[Mutant], k: int, seed: int) -> list[Mutant]:
    """k mutants spread evenly over the areas (round robin, random within an area, fixed seed)."""
    rng = random.Random(seed)
    areas = [*AREAS, CUDA_AREA] if any(area_of(m.file) == CUDA_AREA for m in mutants) else AREAS
    pools = {a: [m for m in mutants if area_of(m.file) == a] for a in areas}
    for pool in pools.values():
        rng.shuffle(pool)
    chosen: list[Mutant] = []
    while len(chosen) < k and any(pools.values()):
        for pool in pools.values():
            if pool and len(chosen) < k:
                chosen.append(pool.pop())
    return sorted(chosen, key=lambda m: m.id)


# ------------------------------------------------------------------------------------------ building and testing
def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None, cwd: Path = ROOT) -> tuple[int, str]:
    """(returncode, output tail); on timeout the whole process group is killed and -9 returned."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -9, (out or "")[-2000:] + "\n[timed out]"
    return proc.returncode, (out or "")[-3000:]


def copy_sources(work: Path, worktree: bool, commit: str = "HEAD") -> Path:
    """plugins/ as committed (``commit``; with ``worktree``, as it is on disk) copied to work/src, with fresh mtimes so
    that objects an earlier run built from a mutant are rebuilt. Others may be editing plugins/ meanwhile: the
    mutants are found in, and restored from, this snapshot."""
    src = work / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    if worktree:
        shutil.copytree(PLUGINS, src / "plugins", copy_function=shutil.copy)
    else:
        archive = subprocess.run(["git", "archive", commit, "plugins"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-m", "-C", str(src)], input=archive.stdout, check=True)
    return src


def is_cuda(rel: str) -> bool:
    return rel.startswith(CUDA_AREA)


def target_of(rel: str) -> str:
    """The library a mutant of ``rel`` is built into (empty rel: the unmutated CPU library)."""
    return "pimoe_trt_harness_emu" if is_cuda(rel) else "pimoe_ort"


def library_of(build: Path, rel: str) -> Path:
    return build / "emu" / "libpimoe_trt_harness_emu.so" if is_cuda(rel) else build / "libpimoe_ort.so"


def prepare_build(work: Path, jobs: int, cuda: bool = False) -> Path:
    """Configure and build the unmutated copy in work/build (with ``cuda``, the emulated harness too)."""
    src, build = work / "src", work / "build"
    include = os.environ.get("ONNXRUNTIME_INCLUDE_DIR", str(ROOT / "build" / "deps" / "onnxruntime" / "include"))
    simde = os.environ.get("SIMDE_INCLUDE_DIR", str(ROOT / "build" / "deps" / "simde" / "include"))
    args = ["cmake", "-S", str(src / "plugins"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
            f"-DONNXRUNTIME_INCLUDE_DIR={include}", f"-DSIMDE_INCLUDE_DIR={simde}",
            f"-DPIMOE_BUILD_EMU={'ON' if cuda else 'OFF'}"]
    if cuda:  # the emulated harness compiles against the TensorRT headers scripts/setup.sh fetched
        trt = os.environ.get("TENSORRT_INCLUDE_DIR", str(ROOT / "build" / "deps" / "tensorrt" / "include"))
        args.append(f"-DTENSORRT_INCLUDE_DIR={trt}")
    if shutil.which("ccache"):
        args.append("-DCMAKE_CXX_COMPILER_LAUNCHER=ccache")
    code, out = run(args, 300)
    if code != 0:
        sys.exit(f"mutate_cpp: configuring {build} failed (run scripts/setup.sh first for the headers):\n{out}")
    for target in ["pimoe_ort", *(["pimoe_trt_harness_emu"] if cuda else [])]:
        code, out = run(["cmake", "--build", str(build), "--target", target, "--parallel", str(jobs)], 1800)
        if code != 0:
            sys.exit(f"mutate_cpp: the unmutated copy of plugins/ does not build ({target}):\n{out}")
    return build


def test_command(pytest_args: list[str], select: str = TEST_SELECT) -> list[str]:
    pytest_args = [a for a in pytest_args if a.startswith("-") or (ROOT / a.split("::")[0]).exists()]
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:logging",
            "-k", select, *pytest_args]


def mutant_tests(rel: str, pytest_args: list[str], cuda_tests: list[str] | None = None) -> list[str]:
    return test_command(cuda_tests or CUDA_TESTS, CUDA_SELECT) if is_cuda(rel) else test_command(pytest_args)


def test_env(library: Path, rel: str) -> dict[str, str]:
    if is_cuda(rel):
        return {**os.environ, "PIMOE_TRT_HARNESS_EMU": str(library), "PIMOE_OP_EXAMPLES": OP_EXAMPLES}
    env = {**os.environ, "PIMOE_ORT_LIBRARY": str(library), "PIMOE_OP_EXAMPLES": OP_EXAMPLES}
    kernel_set = KERNEL_SET_OF.get(rel)
    if kernel_set == "avx512" and not cpu_has_avx512():
        kernel_set = "avx512-simde"  # the same source on SIMDe's portable intrinsics
    if kernel_set:
        env["PIMOE_CPU_ISA"] = kernel_set
    return env


def cpu_has_avx512() -> bool:
    """The CPU runs the native AVX-512 kernels (AVX-512 F/BW/DQ/VL and VNNI)."""
    info = Path("/proc/cpuinfo")
    flags = set(next((line for line in info.read_text().splitlines() if line.startswith("flags")), "").split()) \
        if info.is_file() else set()
    return {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"} <= flags


def evaluate(mutant: Mutant, build: Path, jobs: int, timeout: float, pytest_args: list[str],
             cuda_tests: list[str] | None = None) -> dict:
    """Apply, rebuild, test, restore. Status: killed, survived, invalid (does not compile), timeout (killed)."""
    copy = build.parent / "src" / mutant.file
    original = (build.parent / "src" / mutant.file).read_text()  # restored after every mutant: pristine
    start = time.monotonic()
    copy.write_text(mutant.apply(original))
    try:
        code, out = run(["cmake", "--build", str(build), "--target", target_of(mutant.file), "--parallel", str(jobs)],
                        900)
        if code != 0:
            status, detail = "invalid", "\n".join(line for line in out.splitlines() if "error" in line)[:600]
        else:
            code, out = run(mutant_tests(mutant.file, pytest_args, cuda_tests), timeout,
                            env=test_env(library_of(build, mutant.file), mutant.file))
            status = "survived" if code == 0 else "timeout" if code == -9 else "killed"
            failed = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
            detail = failed[0][:300] if failed else ("crash or timeout" if status in ("killed", "timeout") and
                                                      code < 0 else "")
    finally:
        copy.write_text(original)  # newer than the mutant's object: the next build recompiles it
    return {**asdict(mutant), "status": status, "seconds": round(time.monotonic() - start, 1),
            "diff": mutant.diff(original), "detail": detail}


# ------------------------------------------------------------------------------------------ report
def summarise(results: list[dict]) -> str:
    lines = [f"{'file':45s} {'killed':>6s} {'surv':>5s} {'inval':>5s} {'score':>6s}"]
    per_file: dict[str, dict[str, int]] = {}
    for r in results:
        counts = per_file.setdefault(r["file"], {"killed": 0, "survived": 0, "invalid": 0})
        counts["killed" if r["status"] in ("killed", "timeout") else r["status"]] += 1
    total = {"killed": 0, "survived": 0, "invalid": 0}
    for rel, counts in sorted(per_file.items()):
        scored = counts["killed"] + counts["survived"]
        score = f"{100 * counts['killed'] / scored:.0f}%" if scored else "-"
        lines.append(f"{rel:45s} {counts['killed']:6d} {counts['survived']:5d} {counts['invalid']:5d} {score:>6s}")
        for key in total:
            total[key] += counts[key]
    scored = total["killed"] + total["survived"]
    score = f"{100 * total['killed'] / scored:.1f}%" if scored else "-"
    lines.append(f"{'total':45s} {total['killed']:6d} {total['survived']:5d} {total['invalid']:5d} {score:>6s}")
    survivors = [r for r in results if r["status"] == "survived"]
    if survivors:
        lines.append("\nsurvivors:")
        for r in survivors:
            lines.append(f"  #{r['id']} {r['file']}:{r['line']} ({r['op']})\n    " +
                         "\n    ".join(r["diff"].splitlines()[2:]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--only", help="comma-separated mutant ids (from --list)")
    parser.add_argument("--files", nargs="+", help=f"restrict to these sources (default: {', '.join(SOURCES)})")
    parser.add_argument("--cuda", action="store_true",
                        help=f"add the CUDA kernels ({CUDA_AREA}, on the emulated GPU) to the default sources")
    parser.add_argument("--sample", type=int, help="run K mutants spread over the areas (fixed seed)")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--json", type=Path, help="write every result to this file")
    parser.add_argument("--work", type=Path, default=WORK, help="folder for the source copy and the build")
    parser.add_argument("--worktree", action="store_true",
                        help="mutate plugins/ as it is on disk (default: as committed, --commit)")
    parser.add_argument("--commit", default="HEAD", help="the commit whose plugins/ is mutated (default HEAD)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per mutant test run (then: killed)")
    parser.add_argument("--pytest-args", nargs="*", default=TESTS, help="test files/options to run per mutant")
    parser.add_argument("--cuda-tests", nargs="*", default=CUDA_TESTS,
                        help="test files run (their `emu` cases) against each CUDA mutant")
    args = parser.parse_args(argv)

    files = args.files or (SOURCES + CUDA_SOURCES if args.cuda else SOURCES)
    unknown = [f for f in files if f not in SOURCES + CUDA_SOURCES]
    if unknown:
        parser.error(f"--files: {unknown} are not mutation targets; choose from {SOURCES + CUDA_SOURCES}")
    work = args.work.resolve()
    commit = subprocess.run(["git", "rev-parse", "--short", args.commit], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    base = copy_sources(work, args.worktree, commit) if not args.list else ROOT if args.worktree else None
    if base is None:  # --list of the committed sources
        base = copy_sources(work / "list", False, commit)
    mutants = find_mutants(files, base)
    if args.only:
        wanted = {int(i) for i in args.only.split(",")}
        mutants = [m for m in mutants if m.id in wanted]
    if args.sample:
        mutants = sample(mutants, args.sample, args.seed)
    if args.list:
        for m in mutants:
            print(f"{m.id:4d} {m.file}:{m.line}:{m.col + 1} {m.op:10s} {m.before!r} -> {m.after!r}")
        print(f"{len(mutants)} mutants")
        return 0
    if not mutants:
        parser.error("no mutants selected")

    cuda = any(is_cuda(m.file) for m in mutants)
    build = prepare_build(work, args.jobs, cuda)
    for rel in ["", *([CUDA_SOURCES[0]] if cuda else [])]:  # the unmutated libraries must pass the same tests
        code, out = run(mutant_tests(rel, args.pytest_args, args.cuda_tests), args.timeout * 2,
                        env=test_env(library_of(build, rel), rel))
        if code != 0:  # every mutant would count as killed
            sys.exit(f"mutate_cpp: the tests fail on the UNMUTATED library; fix that first:\n{out}")
    results: list[dict] = []
    for i, m in enumerate(mutants, start=1):
        r = evaluate(m, build, args.jobs, args.timeout, args.pytest_args, args.cuda_tests)
        results.append(r)
        print(f"[{i}/{len(mutants)}] #{m.id} {m.file}:{m.line} {m.op} {m.before!r}->{m.after!r}: {r['status']} "
              f"({r['seconds']}s) {r['detail'][:120]}", flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))
    print(f"plugins/ of {'the working tree' if args.worktree else 'commit ' + commit}")
    print(summarise(results))
    survived = sum(r["status"] == "survived" for r in results)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
