"""A fixed handful of C++ mutants (scripts/mutate_cpp.py) must be killed by the boundary tests.

One mutant per blind spot that mutation testing found (docs/mutation.md): NaN among numbers in the top-k, an id
exactly E, fp16 subnormals, the portable kernels' NaN test (ReLU keeps NaN; run with PIMOE_CPU_ISA=generic), an
expert id equal to E in the shared checks, the ONNX Runtime library's dtype check of w8a8 weight scales. Mutants are
named by their source line, not by number, so that edits elsewhere in plugins/ do not change what is tested; a line
that no longer exists fails with a message saying to update the list."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

W_SCALE_CHECK = ('if (s != kF32) return msg("PiMoEExpertMLP: w_scale (layer ", l, ") must be float32, got ", '
                 'type_name(s));')
# (file, stripped source line, rule, before, after, which match on that line)
PICKS = [
    ("plugins/kernels/cpu/ops_cpu.cpp", "if (na != nb) return nb;", "drop-check", "if (na != nb) return nb;", ";", 0),
    ("plugins/kernels/cpu/ops_cpu.cpp", "if (id < 0 || id >= e)", "rel", ">=", ">", 0),
    ("plugins/kernels/cpu/ops_cpu.cpp", "exponent = 127 - 15 + 1;", "arith", "+", "-", 0),
    ("plugins/kernels/cpu/kernels_generic.cpp", "static bool is_nan(float a) { return a != a; }", "eq", "!=", "==", 0),
    ("plugins/common/pimoe_attrs.h",
     "if (e < 0 || e >= contract::kMAX_EXPERTS || (num_experts > 0 && e >= num_experts))", "rel", ">=", ">", 1),
    ("plugins/ort/pimoe_ort_io.cpp", W_SCALE_CHECK, "drop-check", W_SCALE_CHECK, ";", 0),
]


def load_runner():
    spec = importlib.util.spec_from_file_location("mutate_cpp", ROOT / "scripts" / "mutate_cpp.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def pick_ids(runner) -> list[int]:
    mutants = runner.find_mutants(runner.SOURCES)  # numbered over every source, as the runner numbers them
    ids = []
    for file, line, rule, before, after, nth in PICKS:
        text = (ROOT / file).read_text().split("\n")
        found = [m for m in mutants if m.file == file and text[m.line - 1].strip() == line and m.op == rule
                 and m.before == before and m.after == after]
        assert len(found) > nth, f"mutant {file}: {line!r} {before}->{after} not found; update PICKS"
        ids.append(found[nth].id)
    return ids


def test_the_picked_mutants_exist() -> None:
    assert len(set(pick_ids(load_runner()))) == len(PICKS)


@pytest.mark.slow
def test_boundary_tests_kill_the_picked_mutants(tmp_path) -> None:
    runner = load_runner()
    include = ROOT / "build" / "deps" / "onnxruntime" / "include"
    if not (include / "onnxruntime_cxx_api.h").is_file():
        pytest.skip("the ONNX Runtime headers are not fetched (scripts/setup.sh)")
    report = tmp_path / "mutants.json"
    ids = ",".join(str(i) for i in pick_ids(runner))
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "mutate_cpp.py"), "--only", ids,
                             "--worktree", "--work", str(tmp_path / "work"), "--json", str(report),
                             "--pytest-args", "tests/ops/test_op_boundaries.py"],
                            capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert report.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(report.read_text())
    assert len(results) == len(PICKS)
    survivors = [f"{r['file']}:{r['line']} {r['diff']}" for r in results if r["status"] not in ("killed", "timeout")]
    assert not survivors, "\n".join(survivors)
