"""The mechanics of scripts/mutate_py.sh (docs/mutation.md): one mutmut work tree per subpackage, a seeded sample of
its mutants, the run, and the scores.

    python scripts/mutate_py.py prepare WORK --group NAME --modules GLOB... --tests TEST...
    python scripts/mutate_py.py sample WORK --group NAME --seed S --size N     # generate, collect stats, choose
    python scripts/mutate_py.py run WORK [--jobs J]                            # mutmut run on the chosen mutants
    python scripts/mutate_py.py report WORK_ROOT [--json PATH]                 # scores of every group

Every step runs inside WORK (a scratch copy under build/), never in the checkout. mutmut 3 mutates function bodies
(never module-level constants) and runs, against each mutant, the selected tests that reached the mutated function
while the unmutated code ran ("stats"); a mutant whose function no selected test reaches is "no tests" and is not
scored. The sample: every mutant of the group in a seeded random order (random.Random(f"{seed}:{group}")), and the
first N of them that some selected test reaches; the "no tests" mutants met before the N-th are reported with it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_FILE = "sample.json"
RESULT_FILE = "result.json"
#: mutmut's exit codes (mutmut.stats.status_by_exit_code), folded into what the score counts
KILLED = {1: "killed", 3: "killed", -11: "segfault", -9: "segfault", 36: "timeout", -24: "timeout", 24: "timeout",
          152: "timeout", 255: "timeout"}
SURVIVED = {0: "survived"}

# Runs the selected tests of one mutant fastest file first (mutmut passes them as a set, in no useful order): the
# files are ordered by the summed duration stats recorded for their tests, each file's tests keep their order (its
# module fixtures are built once). Hypothesis tests draw 12 examples per mutant instead of the CI profile's count.
ORDER_CONFTEST = '''"""Added by scripts/mutate_py.py to the scratch copy only (never to the checkout)."""
import json
import os
from pathlib import Path

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile("mutation", max_examples=12, derandomize=True, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
except ImportError:
    pass


def pytest_configure(config):
    # while mutmut collects which tests reach which function ("stats"), a test's subprocess (python -m
    # pimoe_export.cli ...) must run the code plainly: recording a hit there needs mutmut's configuration, which is
    # not in the subprocess's directory. This process keeps recording (mutmut also holds the mode in-process).
    if os.environ.get("MUTANT_UNDER_TEST") == "stats":
        del os.environ["MUTANT_UNDER_TEST"]


def pytest_collection_modifyitems(session, config, items):
    stats = Path("mutmut-stats.json")
    if not stats.exists():
        return
    durations = json.loads(stats.read_text()).get("duration_by_test", {})
    per_file = {}
    for item in items:
        per_file[item.nodeid.split("::")[0]] = per_file.get(item.nodeid.split("::")[0], 0.0) + \\
            durations.get(item.nodeid, 0.0)
    items.sort(key=lambda item: per_file[item.nodeid.split("::")[0]])
'''


def prepare(work: Path, group: str, modules: list[str], tests: list[str]) -> None:
    """Mirror the package and the tests into ``work`` (deletions too) and write its mutmut configuration."""
    work.mkdir(parents=True, exist_ok=True)
    for name in ("pimoe_export", "tests", "docs", "plugins"):  # docs, plugins/ and README.md: tests read them
        staging = work / f"{name}.new"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(ROOT / name, staging, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.rmtree(work / name, ignore_errors=True)
        staging.rename(work / name)
    shutil.copy2(ROOT / "README.md", work / "README.md")
    missing = [t for t in tests if not (ROOT / t.split("::")[0]).exists()]
    if missing:  # a listed test that this checkout lacks is left out (mutmut would stop on it)
        print(f"{group}: tests {missing} do not exist in this checkout; left out")
    tests = [t for t in tests if t not in missing]
    if not tests:
        print(f"{group}: none of its tests exist in this checkout; the group is left out")
        raise SystemExit(3)
    tests += ["-m", "not slow"]
    pytest_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    q = json.dumps
    lines = ["[tool.mutmut]", 'source_paths = ["pimoe_export"]', f"only_mutate = {q(modules)}",
             f"pytest_add_cli_args_test_selection = {q(tests)}",
             'pytest_add_cli_args = ["-p", "no:logging", "-p", "no:cacheprovider", "-q"]',
             'also_copy = ["conftest.py", "README.md", "docs", "plugins"]',
             # torch is not fork-safe: fork each mutant's worker from a clean server process
             'process_isolation = "forkserver"', "timeout_constant = 30.0", "",
             "[tool.pytest.ini_options]", f"markers = {q(pytest_cfg['markers'])}", ""]
    (work / "pyproject.toml").write_text("\n".join(lines))
    (work / "conftest.py").write_text(ORDER_CONFTEST)
    (work / "group.json").write_text(json.dumps({"group": group, "modules": modules, "tests": tests}, indent=1))


def _generate() -> None:
    """mutmut's own mutant generation (the first step of `mutmut run`), without running anything."""
    from mutmut.__main__ import create_mutants
    from mutmut.mutation.trampoline import set_mutant_under_test
    from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir, setup_source_paths

    set_mutant_under_test("mutant_generation")
    Path("mutants").mkdir(exist_ok=True)
    copy_src_dir()
    copy_also_copy_files()
    setup_source_paths()
    create_mutants(2)


def _mutmut(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mutmut")
    return subprocess.run([str(exe), *args], capture_output=True, text=True)


def _all_mutants() -> list[str]:
    names = []
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        names += list(json.loads(meta.read_text())["exit_code_by_key"])
    return names


def _source_digest(work: Path) -> str:
    """sha256 over the group's modules as prepared in ``work`` (paths and contents)."""
    digest = hashlib.sha256()
    modules = json.loads((work / "group.json").read_text())["modules"]
    for path in sorted({p for pattern in modules for p in work.glob(pattern) if p.is_file()}):
        digest.update(str(path.relative_to(work)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def sample(work: Path, group: str, seed: int, size: int) -> None:
    os.chdir(work)
    source = _source_digest(work)
    old = json.loads(Path(SAMPLE_FILE).read_text()) if Path(SAMPLE_FILE).exists() else None
    if old is not None and old.get("source", source) != source:
        # mutmut numbers the mutants of each function, so after the group's code changed a name may stand for
        # another change: its results and the sample are dropped, and the group is sampled and run afresh
        print(f"{group}: its modules changed since the last sample; sampling and running afresh")
        shutil.rmtree("mutants", ignore_errors=True)
        Path(RESULT_FILE).unlink(missing_ok=True)
        old = None
    if old is None or old.get("seed") != seed or old.get("size") != size:
        _generate()
        # which tests reach which function, collected afresh (mutmut 3.8 loses them when it reloads stats after a
        # configuration change)
        Path("mutants/mutmut-stats.json").unlink(missing_ok=True)
        estimates = _mutmut("print-time-estimates")
        if estimates.returncode != 0:
            raise SystemExit(f"{group}: mutmut print-time-estimates failed:\n{estimates.stdout}\n{estimates.stderr}")
        reached: dict[str, bool] = {}
        for line in estimates.stdout.splitlines():
            if m := re.match(r"^(<no tests>|\d+ms) (\S+)$", line.strip()):
                reached[m.group(2)] = m.group(1) != "<no tests>"
        names = _all_mutants()
        unknown = [n for n in names if n not in reached]
        if unknown:
            raise SystemExit(f"{group}: no estimate for {len(unknown)} mutants (e.g. {unknown[:3]})")
        order = sorted(names)
        random.Random(f"{seed}:{group}").shuffle(order)
        chosen, no_tests = [], []
        for name in order:
            if len(chosen) == size:
                break
            (chosen if reached[name] else no_tests).append(name)
        Path(SAMPLE_FILE).write_text(json.dumps({"group": group, "seed": seed, "size": size, "source": source,
                                                 "mutants": len(names),
                                                 "reached": sum(reached.values()), "chosen": chosen,
                                                 "no_tests": no_tests}, indent=1))
    data = json.loads(Path(SAMPLE_FILE).read_text())
    print(f"{group}: {data['mutants']} mutants, {data['reached']} reached by the selected tests; sample of "
          f"{len(data['chosen'])} (seed {seed}), {len(data['no_tests'])} unreached met before it")


def run(work: Path, jobs: int, names: list[str], again: bool) -> None:
    """mutmut run on ``names`` (default: the sample's mutants that have no result yet or were not killed; with
    ``again``, every one of them)."""
    os.chdir(work)
    data = json.loads(Path(SAMPLE_FILE).read_text())
    codes = _exit_codes()
    chosen = names or [n for n in data["chosen"] if again or codes.get(n) not in KILLED]
    if not chosen:
        print("every mutant of the sample is killed already")
        _collect(work)
        return
    exe = Path(sys.executable).with_name("mutmut")
    # a subprocess a test starts (python -m pimoe_export.cli ...) imports the mutated package too
    env = {**os.environ, "PYTHONPATH": str(work / "mutants"), "HYPOTHESIS_PROFILE": "mutation"}
    subprocess.run([str(exe), "run", "--max-children", str(jobs), *chosen], env=env, check=False)
    _collect(work)


def _exit_codes() -> dict[str, int | None]:
    codes: dict[str, int | None] = {}
    for meta in Path("mutants").rglob("*.py.meta"):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    return codes


def _collect(work: Path) -> dict:
    data = json.loads((work / SAMPLE_FILE).read_text())
    codes = _exit_codes()
    statuses: dict[str, str] = {}
    for name in data["chosen"]:
        code = codes.get(name)
        statuses[name] = KILLED.get(code) or SURVIVED.get(code) or ("not run" if code is None else f"exit {code}")
    killed = sum(s in ("killed", "timeout", "segfault") for s in statuses.values())
    survived = sorted(n for n, s in statuses.items() if s == "survived")
    other = {n: s for n, s in statuses.items() if s not in ("killed", "timeout", "segfault", "survived")}
    result = {"group": data["group"], "seed": data["seed"], "mutants": data["mutants"], "reached": data["reached"],
              "sampled": len(data["chosen"]), "killed": killed, "survived": survived, "other": other,
              "timeouts": sorted(n for n, s in statuses.items() if s == "timeout"),
              "no_tests_met": len(data["no_tests"])}
    (work / RESULT_FILE).write_text(json.dumps(result, indent=1))
    return result


def report(root: Path, out: Path | None) -> None:
    rows, total_k, total_s = [], 0, 0
    for work in sorted(p.parent for p in root.glob(f"*/{SAMPLE_FILE}")):
        os.chdir(work)
        result = _collect(work)
        k, s = result["killed"], len(result["survived"])
        total_k, total_s = total_k + k, total_s + s
        rows.append(result)
        score = f"{100 * k / (k + s):.1f}%" if k + s else "-"
        print(f"{result['group']:<12} mutants {result['mutants']:5d}  reached {result['reached']:5d}  sampled "
              f"{result['sampled']:3d}  killed {k:3d}  survived {s:3d}  other {len(result['other']):2d}  "
              f"unreached met {result['no_tests_met']:3d}  score {score}")
        for name in result["survived"]:
            print(f"    survived: {name}")
        for name, status in result["other"].items():
            print(f"    {status}: {name}")
    if total_k + total_s:
        print(f"{'all':<12} killed {total_k} of {total_k + total_s} scored: {100 * total_k / (total_k + total_s):.1f}%")
    if out:
        out.write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("work", type=Path)
    p.add_argument("--group", required=True)
    p.add_argument("--modules", nargs="+", required=True)
    p.add_argument("--tests", nargs="+", required=True)
    p = sub.add_parser("sample")
    p.add_argument("work", type=Path)
    p.add_argument("--group", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p = sub.add_parser("run")
    p.add_argument("work", type=Path)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--again", action="store_true", help="rerun the mutants already killed too")
    p.add_argument("mutants", nargs="*", help="run only these (default: the sample's not yet killed)")
    p = sub.add_parser("report")
    p.add_argument("root", type=Path)
    p.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.work.resolve(), args.group, args.modules, args.tests)
    elif args.step == "sample":
        sample(args.work.resolve(), args.group, args.seed, args.size)
    elif args.step == "run":
        run(args.work.resolve(), args.jobs, args.mutants, args.again)
    else:
        report(args.root.resolve(), args.json.resolve() if args.json else None)


if __name__ == "__main__":
    main()
