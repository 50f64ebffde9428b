#!/usr/bin/env python3
"""Hand-written mutants against the tests (docs/mutation.md): each patch file is one realistic bug, applied alone to
a scratch copy of the checkout and run against every test file plausibly relevant to it; a patch no test fails
"survived". This is how a held-out audit measures the tests (mutants written by someone who has not read them), so
the same runner serves for the project's own stand-in samples and for the auditor's patches.

    python scripts/mutate_patches.py PATCH_OR_DIR... [--jobs 2] [--fast] [--json build/mutate-patches/result.json]
    python scripts/mutate_patches.py PATCH --tests tests/runtime/test_generate.py     # choose the tests yourself

Which tests a patch gets (unless --tests), in two stages: first the tests of the changed files' groups in
scripts/mutate_py.sh (the table the mutmut run uses: quick ones), then, if none failed, the test folder named like
the subpackage (tests/serve for pimoe_export/serve/...; its server tests too, which the groups leave out) and every
test file that reaches the changed module by name (directly, through a helper module of tests/ or through a conftest
fixture; see naming_tests) or, for a command's module, runs that command (command_tests), less what the first stage
ran. Slow tests are included unless --fast (the audit ran whole
files). Each stage is ``pytest -x`` in the copy, the package imported from the copy
(subprocesses too, via PYTHONPATH); the compiled libraries are the checkout's build/plugins (a patch to plugins/ is
not rebuilt: C++ mutants are scripts/mutate_cpp.py's). The checkout is never modified. Verdicts: killed (a test
failed), survived, timeout (counted as killed, like mutmut), broken (pytest could not collect or run: a patch that
breaks the import is not a realistic bug; reported apart, not scored), stale (the patch no longer applies; not
scored), no tests (it changes only files outside every group, e.g. plugins/; not scored).
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUPS_SCRIPT = ROOT / "scripts" / "mutate_py.sh"
#: the checkout's compiled libraries, for the tests that need them (as scripts/mutate_py.sh sets them)
LIBRARIES = {"PIMOE_ORT_LIBRARY": "libpimoe_ort.so", "PIMOE_ORT_CUDA_LIBRARY": "libpimoe_ort_cuda.so",
             "PIMOE_ORT_CUDA_EMU_LIBRARY": "emu/libpimoe_ort_cuda_emu.so",
             "PIMOE_TRT_PLUGINS": "trt/libpimoe_trt_plugins.so",
             "PIMOE_TRT_HARNESS": "harness/libpimoe_trt_harness.so",
             "PIMOE_TRT_HARNESS_EMU": "emu/libpimoe_trt_harness_emu.so"}
#: pytest's exit codes: 0 all passed, 1 a test failed; 2-5 interrupted, internal error, usage error, nothing collected
BROKEN_CODES = {2, 3, 4}
NOTHING_COLLECTED = 5  # a stage whose tests all ran in an earlier one, or were deselected


def read_groups(script: Path = GROUPS_SCRIPT) -> list[tuple[str, list[str], list[str]]]:
    """(group, module globs, tests) rows of the GROUPS_TABLE in scripts/mutate_py.sh."""
    rows = re.findall(r'^\s*"([\w-]+)\|([^|"]*)\|([^"]*)"\s*$', script.read_text(), flags=re.M)
    if not rows:
        raise SystemExit(f"no GROUPS_TABLE rows found in {script}")
    return [(g, m.split(), t.split()) for g, m, t in rows]


def changed_files(patch: str) -> list[str]:
    """The paths a unified diff changes (its ``+++ b/...`` lines; a deleted file's ``--- a/...``)."""
    files = []
    for old, new in re.findall(r"^--- (?:a/)?(\S+).*\n\+\+\+ (?:b/)?(\S+)", patch, flags=re.M):
        path = old if new == "/dev/null" else new
        if path not in files:
            files.append(path)
    return files


def module_name(path: str) -> str | None:
    """``pimoe_export/runtime/engine.py`` -> ``pimoe_export.runtime.engine`` (a package's __init__: the package)."""
    if not (path.startswith("pimoe_export/") and path.endswith(".py")):
        return None
    parts = path[:-3].split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def naming_tests(module: str, root: Path = ROOT) -> list[str]:
    """Test files that reach ``module`` by name: they name it (dotted, or ``from <package> import <name>``), import a
    helper module of tests/ that does (e.g. tests/decoders.py, through helpers that import it too), or take a
    conftest fixture that uses such a helper or the module (through fixtures that take such fixtures too)."""
    package, _, name = module.rpartition(".")
    patterns = [re.compile(rf"\b{re.escape(module)}\b")]
    if package:
        patterns.append(re.compile(rf"from {re.escape(package)} import [^\n]*\b{re.escape(name)}\b"))
    files = {p: p.read_text(encoding="utf-8", errors="replace") for p in sorted((root / "tests").rglob("*.py"))}
    helpers = {p for p, text in files.items() if not p.name.startswith("test_") and any(x.search(text)
                                                                                      for x in patterns)}
    fixtures: set[str] = set()
    while True:  # helpers importing such helpers, and conftest fixtures using them, to a fixed point
        stems = {p.stem for p in helpers if p.name != "conftest.py"}
        words = [re.compile(rf"^\s*(?:from|import) {re.escape(s)}\b", re.M) for s in stems]
        words += [re.compile(rf"\b{re.escape(f)}\b") for f in fixtures]
        grown = helpers | {p for p, text in files.items() if not p.name.startswith("test_")
                           and any(w.search(text) for w in words)}
        found = set(fixtures)
        for p in (h for h in grown if h.name == "conftest.py"):
            for fixture, body in _fixtures(files[p]):
                if any(w.search(body) for w in (*patterns, *words)):
                    found.add(fixture)
        if grown == helpers and found == fixtures:
            break
        helpers, fixtures = grown, found
    stems = {p.stem for p in helpers if p.name != "conftest.py"}
    reach = [*patterns, *(re.compile(rf"^\s*(?:from|import) {re.escape(s)}\b", re.M) for s in stems),
             *(re.compile(rf"\b{re.escape(f)}\b") for f in fixtures)]
    return [p.relative_to(root).as_posix() for p, text in files.items()
            if p.name.startswith("test_") and any(x.search(text) for x in reach)]


def command_tests(module: str, root: Path = ROOT) -> list[str]:
    """For a command's module (pimoe_export.cli.<name>_command): the test files that run that command through the
    CLI (``main(["<name>", ...])``, a ``cli("<name>", ...)`` helper, an argv list starting with it), which name the
    CLI, not the module."""
    match = re.fullmatch(r"pimoe_export\.cli\.(\w+)_command", module)
    if match is None:
        return []
    word = re.compile(rf"[\[(]\s*[\"']{re.escape(match.group(1))}[\"']")
    calls = re.compile(r"\b(?:main|cli)\(|\bargv\b")
    return [p.relative_to(root).as_posix() for p in sorted((root / "tests").rglob("test_*.py"))
            if word.search(text := p.read_text(encoding="utf-8", errors="replace")) and calls.search(text)]


def _fixtures(source: str) -> list[tuple[str, str]]:
    """(name, source) of the top-level functions of a conftest that are pytest fixtures."""
    found = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and any("fixture" in ast.unparse(d) for d in node.decorator_list):
            found.append((node.name, ast.get_source_segment(source, node) or ""))
    return found


def tests_for(files: list[str], groups: list[tuple[str, list[str], list[str]]],
              root: Path = ROOT) -> list[list[str]]:
    """The tests plausibly relevant to a patch that changes ``files`` (see the module docstring), in two stages run
    one after the other: the groups' tests (chosen to be quick), then the rest (subpackage folders, files naming
    the module) without what the first stage ran."""
    first: list[str] = []
    rest: list[str] = []
    for path in files:
        for _, modules, tests in groups:
            if any(fnmatch.fnmatch(path, glob) for glob in modules):
                first += tests
        module = module_name(path)
        if module is not None:
            parts = module.split(".")  # pimoe_export/serve/x.py -> tests/serve
            mirror = root / "tests" / parts[1] if len(parts) > 1 else None
            if mirror is not None and mirror.is_dir():
                rest.append(mirror.relative_to(root).as_posix())
            rest += naming_tests(module, root) + command_tests(module, root)

    def unique(chosen: list[str], skip: list[str]) -> list[str]:
        wholes = [t.rstrip("/") for t in (*chosen, *skip) if "::" not in t]
        out: list[str] = []
        for t in chosen:
            file = t.split("::")[0]
            inside = any(file != w and file.startswith(w + "/") for w in wholes) or ("::" in t and file in wholes)
            if t not in out and t not in skip and not inside:
                out.append(t)
        return out

    stage1 = unique(first, [])
    stage2 = unique(rest, stage1)
    return [stage for stage in (stage1, stage2) if stage]


def excluding(stage: list[str], done: list[str]) -> list[str]:
    """pytest arguments for ``stage`` leaving out the tests an earlier stage ran (``done``)."""
    return [*stage, *(f"--deselect={t}" if "::" in t else f"--ignore={t}" for t in done)]


def checkout_files(root: Path, others_only: bool = False) -> list[str]:
    """The checkout's files a run sees: tracked ones (as they are on disk) and new ones git does not ignore, so that
    a test file not yet committed is both chosen (the selection reads the checkout) and there to run; with
    ``others_only``, only the new ones."""
    which = ["--others", "--exclude-standard"] if others_only else ["--cached", "--others", "--exclude-standard"]
    listed = subprocess.run(["git", "ls-files", "-z", *which], cwd=root, capture_output=True, check=True).stdout
    return sorted(set(filter(None, listed.decode().split("\0"))))


def make_copy(dest: Path, root: Path = ROOT) -> None:
    """The checkout's files (:func:`checkout_files`) into ``dest``, a fresh folder."""
    shutil.rmtree(dest, ignore_errors=True)
    for name in checkout_files(root):
        src = root / name
        if not src.is_file() or src.is_symlink():
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    # its own repository, so that git apply takes the patches' paths from here (inside the checkout's build/, it
    # would take them from the checkout's top and skip them)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


def first_failure(output: str) -> str:
    """The first ``FAILED``/``ERROR`` line of pytest's summary (what killed the mutant)."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line[:300]
    return ""


def run_patch(patch: Path, tree: Path, stages: list[list[str]], fast: bool, timeout: float) -> dict:
    text = patch.read_text()
    files = changed_files(text)
    result: dict = {"patch": patch.name, "sha256": hashlib.sha256(text.encode()).hexdigest(), "files": files}
    check = subprocess.run(["git", "apply", "--check", str(patch)], cwd=tree, capture_output=True, text=True)
    if check.returncode != 0:
        return {**result, "verdict": "stale", "detail": check.stderr.strip()[:300]}
    if not stages:
        return {**result, "verdict": "no tests", "detail": "no test is plausibly relevant to the files it changes"}
    for cache in [*tree.glob("pimoe_export/**/__pycache__"), *tree.glob("tests/**/__pycache__")]:
        shutil.rmtree(cache, ignore_errors=True)  # never a bytecode file older than the patched source
    subprocess.run(["git", "apply", str(patch)], cwd=tree, check=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    for var, lib in LIBRARIES.items():
        if not env.get(var) and (ROOT / "build" / "plugins" / lib).is_file():
            env[var] = str(ROOT / "build" / "plugins" / lib)
    start = time.monotonic()
    code: int | None = 0
    outputs: list[str] = []
    try:
        for i, stage in enumerate(stages):
            cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                   *excluding(stage, [t for earlier in stages[:i] for t in earlier])]
            if fast:
                cmd += ["-m", "not slow"]
            left = timeout - (time.monotonic() - start)
            try:
                done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=max(left, 1))
                code = 0 if done.returncode == NOTHING_COLLECTED else done.returncode
                outputs.append(done.stdout + done.stderr)
            except subprocess.TimeoutExpired as exc:
                partial = exc.stdout
                code = None
                outputs.append(partial.decode(errors="replace") if isinstance(partial, bytes) else (partial or ""))
            if code != 0:
                break
    finally:
        subprocess.run(["git", "apply", "-R", str(patch)], cwd=tree, check=True)
    output = outputs[-1] if outputs else ""
    seconds = round(time.monotonic() - start, 1)
    if code is None:
        verdict = "timeout"
    elif code == 0:
        verdict = "survived"
    elif code in BROKEN_CODES:
        verdict = "broken"
    else:
        verdict = "killed"
    tail = "\n".join(output.strip().splitlines()[-3:])
    return {**result, "verdict": verdict, "exit_code": code, "seconds": seconds, "tests": stages,
            "detail": first_failure(output) or tail[:300]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("patches", type=Path, nargs="+", help="patch files, or folders of *.patch")
    parser.add_argument("--tests", nargs="+", help="run these tests against every patch instead of choosing")
    parser.add_argument("--fast", action="store_true", help="leave slow tests out")
    parser.add_argument("--jobs", type=int, default=1, help="patches run side by side (one scratch copy each)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per patch (then: timeout)")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "mutate-patches")
    parser.add_argument("--json", type=Path, help="results (default: WORK/result.json); an earlier result of the "
                        "same patch on the same checkout with the same options is kept, not rerun")
    args = parser.parse_args()

    # absolute: git apply runs in the scratch copies
    patches = sorted(p.resolve() for arg in args.patches for p in ([arg] if arg.is_file() else arg.glob("*.patch")))
    if not patches:
        raise SystemExit("no patch files given")
    out = args.json or args.work / "result.json"
    done: dict[str, dict] = {}
    if out.is_file():
        done = {r["patch"]: r for r in json.loads(out.read_text())["results"]}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).stdout
    diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=ROOT, capture_output=True).stdout
    new = b"".join(name.encode() + b"\0" + (ROOT / name).read_bytes() for name in checkout_files(ROOT, True)
                   if (ROOT / name).is_file() and not (ROOT / name).is_symlink())
    setting = hashlib.sha256(head + diff + new + json.dumps([args.tests, args.fast]).encode()).hexdigest()

    def key(patch: Path) -> str:  # the patch, the checkout's files (committed, changed and new) and the options
        return hashlib.sha256(patch.read_bytes() + setting.encode()).hexdigest()

    todo = [p for p in patches if done.get(p.name, {}).get("key") != key(p) or done[p.name]["verdict"] == "stale"]
    groups = read_groups()
    trees = [args.work / f"tree{i}" for i in range(min(max(1, args.jobs), len(todo)))]
    for tree in trees:
        make_copy(tree)
    free = list(trees)

    def one(patch: Path) -> dict:
        tree = free.pop()
        try:
            stages = [args.tests] if args.tests else tests_for(changed_files(patch.read_text()), groups)
            r = {**run_patch(patch, tree, stages, args.fast, args.timeout), "key": key(patch)}
        finally:
            free.append(tree)
        print(f"{r['patch']}: {r['verdict']} ({r.get('seconds', 0)} s) {r.get('detail', '')}", flush=True)
        return r

    with ThreadPoolExecutor(max_workers=max(1, len(trees))) as pool:
        for r in pool.map(one, todo):
            done[r["patch"]] = r
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"results": sorted(done.values(), key=lambda x: x["patch"])}, indent=1))

    results = [done[p.name] for p in patches]
    scored = [r for r in results if r["verdict"] in {"killed", "timeout", "survived"}]
    killed = sum(r["verdict"] != "survived" for r in scored)
    print(f"\n{killed} of {len(scored)} scored patches killed"
          + (f" ({100 * killed / len(scored):.1f}%)" if scored else "")
          + "".join(f"; {sum(r['verdict'] == v for r in results)} {v}" for v in ("broken", "stale", "no tests")
                    if any(r["verdict"] == v for r in results)))
    for r in results:
        if r["verdict"] == "survived":
            print(f"  survived: {r['patch']} ({', '.join(r['files'])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
