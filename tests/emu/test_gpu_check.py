"""scripts/gpu_check.sh, the one-command GPU check, proven on the CPU by its --dry-run (the same script, step order,
time limits, summary and tar, with the emulated harness; issue 25).

- The dry run passes end to end within its budget and leaves exactly the two files that come back from the GPU
  machine: summary.txt (one line per step, in the order GPU tests, benchmark, emulator self-check, sanitizers) and
  gpu_check.tar.gz (summary, environment, every step's log, the junit report, the benchmark rows).
- Planted failures show as failures: a missing harness library (every GPU test skipped: skips count as failures;
  the benchmark and the emulator check fail), a compute-sanitizer that refuses to run (REFUSED, and the run goes
  on), one that hangs (TIMEOUT at its cap). The run exits 1 and still returns the tar.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ["build", "gpu-tests", "bench", "emu-self", "memcheck", "racecheck"]

pytestmark = pytest.mark.emu


def emulated_build() -> Path:
    build = ROOT / "build" / "plugins"
    if not (build / "emu" / "libpimoe_trt_harness_emu.so").is_file():
        if os.environ.get("PIMOE_SKIP_EMU") == "1":
            pytest.skip("PIMOE_SKIP_EMU=1: the emulated harness is not built")
        pytest.fail("the emulated harness is not built: run scripts/setup.sh")
    return build


def dry_run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path, list[str]]:
    emulated_build()
    out = tmp_path / "out"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PIMOE_")}
    environment.update({"OUT": str(out), **env})
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=900,
                            cwd=ROOT, env=environment)
    lines = (out / "summary.txt").read_text().splitlines() if (out / "summary.txt").is_file() else []
    return result, out, lines


def emu_vs_gpu_cases() -> int:
    """How many cases scripts/emu_vs_gpu.py compares (the entries of its CASES literal)."""
    for node in ast.parse((ROOT / "scripts" / "emu_vs_gpu.py").read_text()).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "CASES":
            assert isinstance(node.value, ast.Dict)
            return len(node.value.keys)
    raise AssertionError("scripts/emu_vs_gpu.py has no CASES literal")


def step_lines(lines: list[str]) -> dict[str, str]:
    return {m.group(1): m.group(2) for line in lines if (m := re.match(r"step ([\w-]+): (.*)", line))}


def tar_members(out: Path) -> dict[str, bytes]:
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        return {m.name.removeprefix("./"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


@pytest.mark.slow
def test_dry_run_passes_end_to_end_within_its_budget(tmp_path) -> None:
    result, out, lines = dry_run(tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "summary.txt"]
    steps = step_lines(lines)
    assert list(steps) == STEPS, lines
    for name in ("build", "gpu-tests", "bench", "emu-self"):
        assert steps[name].startswith("PASS"), (name, steps[name])
    assert re.match(r"PASS \d+ passed, 0 failed, 0 errors, 0 skipped", steps["gpu-tests"]), steps["gpu-tests"]
    cases = emu_vs_gpu_cases()
    assert "2 rows" in steps["bench"] and f"{cases}/{cases} cases agree" in steps["emu-self"], lines
    for name in ("memcheck", "racecheck"):  # no compute-sanitizer in a dry run: said, and the run went on
        assert steps[name].startswith("REFUSED"), steps[name]
    total = int(re.search(r"^total (\d+) s; overall PASS", "\n".join(lines), re.M).group(1))
    assert total <= 480
    members = tar_members(out)
    for name in ("summary.txt", "env.txt", "gpu-tests.xml", "bench_gpu.json", "bench_gpu.md", "emu_vs_gpu.md",
                 *[f"{s}.log" for s in STEPS]):
        assert name in members, (name, sorted(members))
    assert members["summary.txt"].decode() == (out / "summary.txt").read_text()
    assert b"EMULATED dry run" in members["bench_gpu.md"] and b"NOT of a GPU" in members["bench_gpu.md"]


FAKE_SANITIZER = """#!/usr/bin/env bash
# memcheck: refuses, as compute-sanitizer does where the driver forbids it; racecheck: hangs
case "$2" in
  memcheck) echo "========= Error: Target application terminated before first instrumented API call"; exit 1;;
  *) sleep 600;;
esac
"""


@pytest.mark.slow
def test_planted_failures_show_as_failed(tmp_path) -> None:
    sanitizer = tmp_path / "compute-sanitizer"
    sanitizer.write_text(FAKE_SANITIZER)
    sanitizer.chmod(0o755)
    result, out, lines = dry_run(tmp_path, PIMOE_TRT_HARNESS_EMU=str(tmp_path / "missing.so"),
                                 PIMOE_COMPUTE_SANITIZER=str(sanitizer), PIMOE_GPU_CHECK_SCALE="25")
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-2000:]
    steps = step_lines(lines)
    assert list(steps) == STEPS, lines
    assert steps["build"].startswith("PASS"), steps["build"]
    # the harness is missing: every GPU test skips, and skipped tests are failures, not a pass
    assert re.match(r"FAIL 0 passed, 0 failed, 0 errors, [1-9]\d* skipped \(skipped tests count as failures\)",
                    steps["gpu-tests"]), steps["gpu-tests"]
    assert steps["bench"].startswith("FAIL") and steps["emu-self"].startswith("FAIL"), lines
    assert steps["memcheck"].startswith("REFUSED") and "Target application terminated" in steps["memcheck"]
    assert steps["racecheck"].startswith("TIMEOUT after 30 s"), steps["racecheck"]  # 25% of its 120-s cap
    assert "overall FAIL" in lines[-1]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "summary.txt"]
    assert "racecheck.log" in tar_members(out)


# ---------------------------------------------------------------------------------------------- emu_vs_gpu.py
@pytest.fixture(scope="module")
def emu_vs_gpu():
    """scripts/emu_vs_gpu.py as a module (its import puts the repository root on sys.path: undone here)."""
    import importlib.util
    import sys

    path = list(sys.path)
    spec = importlib.util.spec_from_file_location("emu_vs_gpu", ROOT / "scripts" / "emu_vs_gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path
    return module


def test_the_emulator_comparison_fails_on_what_its_tolerances_exclude(emu_vs_gpu) -> None:
    """On the GPU the two sides of scripts/emu_vs_gpu.py differ (a dry run compares the emulator with itself, so
    only differing arrays show the comparison can fail): "exact" is identical bits, integers are exact whatever the
    case's tolerance, "close" is |a - b| <= tol · max(1, max|b|) with NaN in the same places, and a shape or dtype
    mismatch fails with an infinite difference."""
    import numpy as np

    compare = emu_vs_gpu.compare
    b = np.linspace(-4, 4, 33, dtype=np.float32)
    assert compare("exact", 0, [b.copy()], [b]) == (True, 0.0)
    a = b.copy()
    a[7] = np.nextafter(a[7], np.float32(np.inf))  # one ulp
    assert not compare("exact", 0, [a], [b])[0]
    ids = np.array([[1_000_000, 3]], np.int32)  # a difference of 1 is below 2e-6 · 1e6: integers are exact anyway
    assert not compare("close", 2e-6, [ids + np.array([[1, 0]], np.int32)], [ids])[0]
    assert compare("close", 2e-6, [ids.copy()], [ids]) == (True, 0.0)
    ref = np.array([4.0, 0.0, -1.0])  # max|b| = 4: the bound is 1e-5 · 4 = 4e-5
    assert compare("close", 1e-5, [ref + np.array([0.0, 4e-5, 0.0])], [ref]) == (True, pytest.approx(1e-5))
    assert not compare("close", 1e-5, [ref + np.array([0.0, 4.1e-5, 0.0])], [ref])[0]
    small = np.array([0.5, 0.0])  # max|b| < 1: the bound is tol itself
    assert not compare("close", 1e-5, [small + np.array([0.0, 1.1e-5])], [small])[0]
    nan = np.array([1.0, np.nan, 2.0], np.float32)
    assert compare("close", 1e-2, [nan.copy()], [nan])[0]
    assert not compare("close", 1e-2, [np.array([1.0, 1.5, np.nan], np.float32)], [nan])[0]
    assert compare("close", 1e-2, [b[:32]], [b]) == (False, float("inf"))
    assert compare("close", 1e-2, [b.astype(np.float16)], [b]) == (False, float("inf"))
    assert not compare("exact", 0, [b, a], [b, b])[0]  # every output of a call counts, not the first only


def test_the_emulator_comparison_tolerances_are_the_documented_ones(emu_vs_gpu) -> None:
    """docs/verification.md: "bit-exact where no transcendental function or floating-point summation order is
    involved, else 2e-6 for route weights, 1e-5 relative for fp32, 4e-3 for fp16, 1e-2 for w8a8 with LayerNorm +
    GELU": every case's (comparison, tolerance), classified from the op call the case makes."""
    import numpy as np

    from pimoe_export.ops import schema

    seen = set()
    for name, (make, kind, tol) in emu_vs_gpu.CASES.items():
        op, attrs, arrays = make(np.random.default_rng(0))
        if op == schema.ROUTE:
            expected, what = ("close", 2e-6), "route"
        elif op in (schema.DISPATCH, schema.COMBINE):
            expected, what = ("exact", 0), "dispatch/combine"
        elif attrs["quant_mode"] != "none" and attrs["activation"] == "relu" and not attrs["layer_norm"]:
            expected, what = ("exact", 0), "w8a8 relu"
        elif attrs["quant_mode"] != "none":
            assert attrs["activation"] == "gelu" and attrs["layer_norm"], name
            expected, what = ("close", 1e-2), "w8a8 LayerNorm gelu"
        elif arrays[0].dtype == np.float16:
            expected, what = ("close", 4e-3), "fp16 MLP"
        else:
            assert arrays[0].dtype == np.float32, name
            expected, what = ("close", 1e-5), "fp32 MLP"
        assert (kind, tol) == expected, (name, what)
        seen.add(what)
    assert seen == {"route", "dispatch/combine", "w8a8 relu", "w8a8 LayerNorm gelu", "fp16 MLP", "fp32 MLP"}


def test_the_default_budget_and_result_folder(tmp_path) -> None:
    """README: "each step under a time limit (480 s in all), and writes one tar and a per-step summary under
    `${OUT:-gpu-results}`". The script copied alone into an empty tree, OUT and the budget unset: its summary
    opens with the 480-s budget and lands, with the tar, in gpu-results of the tree it runs in (where the build
    it looks for is missing, so it stops after the first step, in well under a second)."""
    tree = tmp_path / "repo"
    (tree / "scripts").mkdir(parents=True)
    script = tree / "scripts" / "gpu_check.sh"
    script.write_text(SCRIPT.read_text())
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PIMOE_") and k != "OUT"}
    environment["PYTHON"] = "/bin/true"  # no Python: the environment report is not what this test is about
    result = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, timeout=60,
                            cwd=tree, env=environment)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    out = tree / "gpu-results"
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "summary.txt"]
    lines = (out / "summary.txt").read_text().splitlines()
    assert re.match(r"pimoe gpu_check \(dry\) .* budget 480 s$", lines[0]), lines[0]
    assert step_lines(lines)["build"].startswith("FAIL (no build in "), lines
    assert "summary.txt" in tar_members(out)
