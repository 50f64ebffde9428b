"""scripts/mutate_patches.py, the runner of hand-written mutants (docs/mutation.md): which tests a patch gets, and
the verdict of each kind of patch, run for real against one fast test."""

from __future__ import annotations

import difflib
import fnmatch
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGET = "pimoe_export/runtime/tokenizer.py"
TEST = "tests/runtime/test_sampling.py::test_text_stream_holds_back_incomplete_characters_and_stop_prefixes"


def load_runner():
    spec = importlib.util.spec_from_file_location("mutate_patches", ROOT / "scripts" / "mutate_patches.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def diff(path: str, before: str, after: str) -> str:
    lines = difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                 f"a/{path}", f"b/{path}")
    return "".join(lines)


def test_changed_files_and_module_names() -> None:
    runner = load_runner()
    patch = (diff("pimoe_export/runtime/engine.py", "a\n", "b\n")
             + "--- a/pimoe_export/serve/old.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-x\n"
             + diff("pimoe_export/runtime/engine.py", "c\n", "d\n"))
    assert runner.changed_files(patch) == ["pimoe_export/runtime/engine.py", "pimoe_export/serve/old.py"]
    assert runner.module_name("pimoe_export/runtime/engine.py") == "pimoe_export.runtime.engine"
    assert runner.module_name("pimoe_export/hf/__init__.py") == "pimoe_export.hf"
    assert runner.module_name("plugins/ort/pimoe_ort.cpp") is None


def test_the_scratch_copy_holds_committed_changed_and_new_files_but_not_ignored_ones(tmp_path) -> None:
    """A new test file not yet committed is copied (the selection, which reads the checkout, may choose it); a
    changed file is copied as it is on disk; what .gitignore names is not."""
    runner = load_runner()
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    (repo / ".gitignore").write_text("build/\n")
    (repo / "tests" / "test_old.py").write_text("old\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=repo, check=True)
    (repo / "tests" / "test_old.py").write_text("changed\n")
    (repo / "tests" / "test_new.py").write_text("new\n")
    (repo / "build").mkdir()
    (repo / "build" / "out.bin").write_text("ignored\n")
    runner.make_copy(tmp_path / "copy", repo)
    copied = sorted(str(p.relative_to(tmp_path / "copy")) for p in (tmp_path / "copy").rglob("*")
                    if p.is_file() and ".git" not in p.parts)
    assert copied == [".gitignore", "tests/test_new.py", "tests/test_old.py"]
    assert (tmp_path / "copy" / "tests" / "test_old.py").read_text() == "changed\n"
    assert runner.checkout_files(repo, others_only=True) == ["tests/test_new.py"]


def test_a_patch_gets_its_groups_tests_and_every_test_file_naming_its_module(tmp_path) -> None:
    runner = load_runner()
    tests = tmp_path / "tests"
    (tests / "runtime").mkdir(parents=True)
    (tests / "serve").mkdir()
    (tests / "runtime" / "test_a.py").write_text("from pimoe_export.runtime.engine import Engine\n")
    (tests / "serve" / "test_b.py").write_text("from pimoe_export.runtime import decoder, engine\n")
    (tests / "serve" / "test_c.py").write_text("import pimoe_export.runtime.engines_other\n")  # another module
    (tests / "serve" / "test_d.py").write_text("# pimoe_export.runtime.engine is tested in test_a\n")
    assert runner.naming_tests("pimoe_export.runtime.engine", tmp_path) == [
        "tests/runtime/test_a.py", "tests/serve/test_b.py", "tests/serve/test_d.py"]
    groups = [("runtime", ["pimoe_export/runtime/*"], ["tests/runtime", "tests/x/test_y.py::one"]),
              ("serve", ["pimoe_export/serve/*"], ["tests/serve"])]
    # first the group's tests; then the files naming the module that the group's folder did not cover
    assert runner.tests_for(["pimoe_export/runtime/engine.py"], groups, tmp_path) == [
        ["tests/runtime", "tests/x/test_y.py::one"], ["tests/serve/test_b.py", "tests/serve/test_d.py"]]
    # a subpackage's own test folder comes second, whole; the first stage's tests are left out of it when run
    (tests / "hf").mkdir()
    (tests / "hf" / "test_e.py").write_text("")
    groups.append(("hf", ["pimoe_export/hf/*"], ["tests/hf/test_f.py::fast", "tests/hf/test_g.py"]))
    stages = runner.tests_for(["pimoe_export/hf/weights.py"], groups, tmp_path)
    assert stages == [["tests/hf/test_f.py::fast", "tests/hf/test_g.py"], ["tests/hf"]]
    assert runner.excluding(stages[1], stages[0]) == ["tests/hf", "--deselect=tests/hf/test_f.py::fast",
                                                       "--ignore=tests/hf/test_g.py"]


def test_a_commands_patch_gets_the_tests_that_run_that_command(tmp_path) -> None:
    """A test reaching a command through the CLI names pimoe_export.cli, not the command's module: for a patch to
    cli/check_command.py the runner also chooses the test files that run `check` (main, a cli helper, an argv list),
    and no file that only mentions the word or runs another command."""
    runner = load_runner()
    tests = tmp_path / "tests"
    (tests / "validate").mkdir(parents=True)
    (tests / "cli").mkdir()
    (tests / "validate" / "test_a.py").write_text('from pimoe_export.cli import main\nmain(["check", "d"])\n')
    (tests / "validate" / "test_b.py").write_text('def test(cli):\n    cli("check", "--unit", "u")\n')
    (tests / "validate" / "test_c.py").write_text('argv = [\n    "check", "d"]\n')
    (tests / "validate" / "test_d.py").write_text('steps = report["check"]  # the word, no command run\n')
    (tests / "validate" / "test_e.py").write_text('main(["checkpoint", "d"])\nmain(["export", "check"])\n')
    assert runner.command_tests("pimoe_export.cli.check_command", tmp_path) == [
        "tests/validate/test_a.py", "tests/validate/test_b.py", "tests/validate/test_c.py"]
    assert runner.command_tests("pimoe_export.cli._common", tmp_path) == []
    stages = runner.tests_for(["pimoe_export/cli/check_command.py"], [], tmp_path)
    assert stages == [["tests/cli", "tests/validate/test_a.py", "tests/validate/test_b.py",
                       "tests/validate/test_c.py"]]


def test_the_groups_are_those_of_the_mutmut_run() -> None:
    runner = load_runner()
    groups = runner.read_groups()
    script = (ROOT / "scripts" / "mutate_py.sh").read_text()
    assert len(groups) == script.count('|pimoe_export/')  # every row of its table, no other line
    covered = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pimoe_export").rglob("*.py")}
    lost = sorted(f for f in covered if not any(fnmatch.fnmatch(f, g) for _, mods, _ in groups for g in mods))
    assert not lost, f"modules in no group of scripts/mutate_py.sh: {lost}"


@pytest.mark.slow
def test_each_kind_of_patch_gets_its_verdict(tmp_path) -> None:
    source = (ROOT / TARGET).read_text()
    line = "            self.text = self.tokenizer.decode(self.ids)\n"
    assert line in source, "update this test: the line it mutates is gone"
    patches = {
        "bug": diff(TARGET, source, source.replace(line, line.replace("self.ids", "self.ids[1:]"))),
        "equivalent": diff(TARGET, source, source.replace('"""Add a token', '"""Adds a token')),
        "stale": diff(TARGET, source.replace(line, "            pass\n"), source),
        "broken": diff(TARGET, source, source.replace(line, line.replace("self.ids)", "self.ids"))),
    }
    for name, text in patches.items():
        assert text, name
        (tmp_path / f"{name}.patch").write_text(text)
    out = tmp_path / "result.json"
    folder = os.path.relpath(tmp_path, ROOT)  # relative to where the runner starts, not to its copies
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "mutate_patches.py"), folder, "--tests", TEST,
                          "--jobs", "2", "--work", str(tmp_path / "work"), "--json", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    verdicts = {r["patch"]: r["verdict"] for r in json.loads(out.read_text())["results"]}
    assert verdicts == {"bug.patch": "killed", "equivalent.patch": "survived", "stale.patch": "stale",
                        "broken.patch": "broken"}
    assert "1 of 2 scored patches killed (50.0%); 1 broken; 1 stale" in run.stdout
    assert "survived: equivalent.patch (pimoe_export/runtime/tokenizer.py)" in run.stdout
    again = subprocess.run(run.args, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert "bug.patch:" not in again.stdout and "stale.patch: stale" in again.stdout  # kept results; stale retried
    assert "1 of 2 scored patches killed (50.0%); 1 broken; 1 stale" in again.stdout
    # the copies are restored after each patch, and the checkout is never touched
    assert (ROOT / TARGET).read_text() == source
    for tree in (tmp_path / "work").glob("tree*"):
        assert (tree / TARGET).read_text() == source
