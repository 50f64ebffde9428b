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
