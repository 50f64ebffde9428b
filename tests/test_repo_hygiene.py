"""Repository-level invariants: lint, generated header in sync, no pickle loading."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_generated_files_match_their_sources() -> None:
    """The C++ contract header, the tables of docs/op_contract.md and the CUDA target list are generated from
    ops/schema.py and interface.py; the committed files must be what the generator writes."""
    from pimoe_export.ops.codegen import generated_files

    for path, text in generated_files().items():
        assert path.read_text() == text, f"{path} is stale: run `python -m pimoe_export.ops.codegen` and commit it"


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff not installed")
def test_ruff_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    # every Python file in the repository: the package, tests, scripts, and the plugins' build tools
    result = subprocess.run([ruff, "check", "pimoe_export", "tests", "scripts", "plugins"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_pickle_loading() -> None:
    offenders = []
    for path in [*ROOT.glob("pimoe_export/**/*.py"), *ROOT.glob("scripts/*.py")]:
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in match.group(1):
                offenders.append(f"{path.name}: {match.group(0)}")
        if re.search(r"^\s*import pickle|pickle\.loads?\(", text, re.M):
            offenders.append(f"{path.name}: pickle")
    assert not offenders, offenders


def test_every_rung_the_repository_mentions_is_defined() -> None:
    """'rung N' anywhere in the repository refers to a row of the ladder in docs/verification.md."""
    table = (ROOT / "docs" / "verification.md").read_text()
    defined = set(re.findall(r"^\| (\w+) \|", table, re.M)) - {"rung"}
    assert {"0", "5", "5e", "6", "7"} <= defined
    mentioned: dict[str, set[str]] = {}
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if not path.is_file() or parts[0] in {".git", ".venv", "build", "engines"} or path.suffix not in {
                ".py", ".md", ".sh", ".cpp", ".h", ".cu", ".cuh", ".txt", ".toml", ".yaml"}:
            continue
        for rung in re.findall(r"\brungs? (\w+)", path.read_text(errors="replace"), re.I):
            mentioned.setdefault(rung, set()).add(str(path.relative_to(ROOT)))
    undefined = {rung: files for rung, files in mentioned.items() if rung not in defined and not rung.isalpha()}
    assert not undefined, undefined


def run_ci_in(root: Path) -> subprocess.CompletedProcess:
    """.ci/run, copied into ``root`` (which holds its README.md), run there as CI runs it."""
    (root / ".ci").mkdir(exist_ok=True)
    shutil.copy2(ROOT / ".ci" / "run", root / ".ci" / "run")
    return subprocess.run(["bash", str(root / ".ci" / "run")], cwd=root, capture_output=True, text=True, timeout=30)


def test_ci_runs_exactly_the_readmes_test_command(tmp_path) -> None:
    """README: "`.ci/run` runs exactly the test command above" (the block between the test-command markers), not
    the main command written in the same form above it, and every line of it."""
    fence = "```"
    (tmp_path / "README.md").write_text(
        f"# x\n\n<!-- main-command -->\n{fence}bash\necho WRONG-BLOCK\n{fence}\n<!-- /main-command -->\n\n"
        f"Run the tests:\n\n<!-- test-command -->\n{fence}bash\necho ran-tests &&\n  echo second-line\n{fence}\n"
        "<!-- /test-command -->\n\nMore text: echo WRONG-TEXT\n")
    result = run_ci_in(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["+ echo ran-tests &&", "  echo second-line", "ran-tests", "second-line"]
    assert "WRONG" not in result.stdout + result.stderr


def test_the_readmes_test_command_is_what_ci_runs(tmp_path) -> None:
    """The real README's test-command block, through the real .ci/run: `scripts/setup.sh && .venv/bin/python -m
    pytest` (both stood in for by scripts that say how they were called)."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    for tool in ("scripts/setup.sh", ".venv/bin/python"):
        (tmp_path / tool).parent.mkdir(parents=True)
        (tmp_path / tool).write_text(f'#!/usr/bin/env bash\necho "{tool} $*"\n')
        (tmp_path / tool).chmod(0o755)
    result = run_ci_in(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["+ scripts/setup.sh && .venv/bin/python -m pytest", "scripts/setup.sh ",
                                          ".venv/bin/python -m pytest"]
