"""docker/ recipes, checked without a Docker engine (CI has none; docker/README.md says what is not verified).

Every file the Dockerfiles copy or run exists in the repository and survives .dockerignore; the entry point and
the in-image build script are valid bash; the entry point's help and error paths work; the build script refuses a
TensorRT of the wrong major version and drops CUDA architectures the local nvcc does not know.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "docker" / "server" / "Dockerfile", ROOT / "docker" / "jetson" / "Dockerfile"]
SCRIPTS = [ROOT / "docker" / "server" / "entrypoint.sh", ROOT / "docker" / "build_in_image.sh"]
#: what `docker/build_in_image.sh` (scripts/setup.sh, pip install -e .) needs from the build context
NEEDED_IN_CONTEXT = ["pyproject.toml", "README.md", "pimoe_export/__init__.py", "pimoe_export/cli/__init__.py",
                     "plugins/CMakeLists.txt", "plugins/trt/CMakeLists.txt", "scripts/setup.sh",
                     "scripts/fetch_deps.sh", "docker/build_in_image.sh", "docker/server/entrypoint.sh",
                     "tests/conftest.py", "engines/README.md"]


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        result.append((keyword.upper(), args.strip()))
    assert not pending, f"{dockerfile}: dangling line continuation"
    return result


def dockerignored(relative: str) -> bool:
    """Whether .dockerignore keeps ``relative`` out of the build context (last matching rule wins; a rule also
    matches everything under a matching folder)."""
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule[1:] if negate else rule
        parts = relative.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(p, pattern[3:]) for p in parts)
        else:
            hit = any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes)
        if hit:
            ignored = not negate
    return ignored


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_copied_and_executed_files_exist(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    kinds = [k for k, _ in steps]
    assert "FROM" in kinds and kinds.count("FROM") == 1
    # ARGs used by FROM are declared before it, with a default
    from_index = kinds.index("FROM")
    declared = {a.split("=", 1)[0]: ("=" in a) for k, a in steps[:from_index] if k == "ARG"}
    image = steps[from_index][1]
    for name in declared:
        assert declared[name], f"{dockerfile}: ARG {name} (used by FROM) needs a default"
    for ref in [part.strip("${}") for part in image.replace("}", "} ").split() if part.startswith("${")]:
        assert ref.split(":")[0].rstrip("}") in declared, f"{dockerfile}: FROM uses undeclared ARG {ref}"

    copies = [(k, a) for k, a in steps if k in ("COPY", "ADD")]
    assert copies, f"{dockerfile} copies nothing"
    destination = None
    for _, args in copies:
        words = [w for w in args.split() if not w.startswith("--")]
        assert not any(w.startswith("--from") for w in args.split()), "no multi-stage copies expected"
        *sources, destination = words
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile}: COPY source {source} does not exist"
    assert destination is not None and destination.startswith("/")
    app = destination.rstrip("/")
    assert f"PIMOE_APP_DIR={app}" in dockerfile.read_text()

    # the entry point: JSON form, a script of the repository under the COPY destination, executable
    (entry,) = [json.loads(a) for k, a in steps if k == "ENTRYPOINT"]
    assert entry[0].startswith(app + "/")
    script = ROOT / entry[0][len(app) + 1:]
    assert script.is_file() and script.stat().st_mode & stat.S_IXUSR, f"{script} missing or not executable"
    (cmd,) = [json.loads(a) for k, a in steps if k == "CMD"]
    assert cmd == ["pipeline"]

    # scripts that RUN steps execute exist and are executable
    runs = " ".join(a for k, a in steps if k == "RUN")
    called = [w for w in runs.split() if w.startswith(("docker/", "scripts/"))]
    assert "docker/build_in_image.sh" in called
    for path in called:
        assert (ROOT / path).is_file() and (ROOT / path).stat().st_mode & stat.S_IXUSR, path


def test_build_context_keeps_sources_and_drops_outputs() -> None:
    for path in NEEDED_IN_CONTEXT:
        assert (ROOT / path).exists(), path
        assert not dockerignored(path), f".dockerignore excludes {path}, which the image build needs"
    for path in ["build/plugins/libpimoe_ort.so", ".venv/bin/python", "engines/seed-512/model.onnx",
                 "engines/seed-512", "pimoe_export/__pycache__/cli.cpython-311.pyc", ".git/HEAD"]:
        assert dockerignored(path), f".dockerignore lets {path} into the build context"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_valid_bash(script: Path) -> None:
    assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", "-S", "error", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def test_entrypoint_help_and_missing_unit(tmp_path) -> None:
    entry = SCRIPTS[0]
    env = {**os.environ, "PIMOE_APP_DIR": str(ROOT), "PIMOE_ENGINES_DIR": str(tmp_path / "engines")}
    result = subprocess.run([str(entry), "help"], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    for word in ("pipeline", "gpu-tests", "check", "triton"):
        assert f"\n  {word} " in "\n" + result.stdout
    result = subprocess.run([str(entry), "check"], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 2
    assert "run the pipeline first" in result.stderr
    result = subprocess.run([str(entry), "echo", "passthrough"], capture_output=True, text=True, env=env, timeout=30)
    assert result.stdout.strip() == "passthrough"
    text = entry.read_text()  # the commands the brief asks for
    assert 'pipeline --preset "$preset" -o "$engines/$preset"' in text
    assert '-m pytest -m gpu' in text
    assert 'check "$model" --unit "$unit"' in text


def _stub_tensorrt(tmp_path: Path, version: str) -> dict[str, str]:
    stub = tmp_path / "stub" / "tensorrt"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(f'__version__ = "{version}"\n')
    workdir = tmp_path / "checkout" / "docker"
    workdir.mkdir(parents=True)
    shutil.copy2(SCRIPTS[1], workdir / "build_in_image.sh")
    return {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(tmp_path / "stub")}


def test_build_script_requires_tensorrt_11(tmp_path) -> None:
    env = _stub_tensorrt(tmp_path, "10.3.0.30")
    result = subprocess.run(["bash", str(tmp_path / "checkout" / "docker" / "build_in_image.sh")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert "has TensorRT 10.3.0.30, this recipe wants TensorRT 11.x" in result.stderr
    assert "PIMOE_REQUIRE_TRT_MAJOR=10" in result.stderr
    assert not (tmp_path / "checkout" / ".venv").exists()  # stopped before touching anything


def test_build_script_filters_cuda_architectures(tmp_path) -> None:
    if not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").is_file()):
        pytest.skip("no nvcc on this machine")
    env = _stub_tensorrt(tmp_path, "11.4.0.106")
    # PIMOE_TRT_HEADERS=bogus stops the script right after the architecture step (before setup.sh)
    env.update(PIMOE_CUDA_ARCHITECTURES="87;110;999", PIMOE_TRT_HEADERS="bogus")
    result = subprocess.run(["bash", str(tmp_path / "checkout" / "docker" / "build_in_image.sh")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert "TensorRT 11.4.0.106" in result.stdout, result.stdout + result.stderr
    assert "dropping sm_999" in result.stdout
    assert "building for 87;110" in result.stdout
    assert result.returncode != 0 and "PIMOE_TRT_HEADERS must be 'image' or 'fetched'" in result.stderr
