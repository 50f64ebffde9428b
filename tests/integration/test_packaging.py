"""Packaging: ONNX Runtime is an extra (`cpu` → onnxruntime, `gpu` → onnxruntime-gpu), never a base dependency.

The slow tests build this package's wheel, install it into fresh venvs next to each ONNX Runtime flavour (wheels from
build/deps/ort-wheels, fetched by scripts/setup.sh; torch-free: numpy + ORT + the package with --no-deps), run an
exported PiMoE layer with libpimoe_ort on the CPU provider there and compare with this venv's run. In the
onnxruntime-gpu venv the package must leave the GPU build in place: the CUDA provider stays listed and pip does not
ask for the CPU `onnxruntime`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pimoe_export.errors import BackendUnavailableError
from pimoe_export.native import libraries

ROOT = Path(__file__).resolve().parents[2]
WHEELHOUSE = ROOT / "build" / "deps" / "ort-wheels"
FLAVOURS = {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu"}

# Runs inside a fresh venv (cwd outside the repository, so `pimoe_export` is the installed copy)
VENV_SCRIPT = """
import json, sys
from importlib import metadata
import numpy as np
import onnxruntime
import pimoe_export
from pimoe_export.runtime.ort import create_session

model, inputs, out = sys.argv[1:4]
x = np.load(inputs)
session = create_session(model)
y, ids, w = session.run(None, {"hidden_states": x})
np.savez(out, output=y, expert_ids=ids, expert_weights=w)
dists = {}
for name in ("onnxruntime", "onnxruntime-gpu"):
    try:
        dists[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
print(json.dumps({"ort_version": onnxruntime.__version__, "providers": onnxruntime.get_available_providers(),
                  "session_providers": session.get_providers(), "package": pimoe_export.__file__,
                  "dists": dists, "requires": metadata.requires("pimoe-export")}))
"""


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, cwd=cwd, env=env or _clean_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


# ------------------------------------------------------------------------------------------ no ORT installed
def test_missing_onnxruntime_is_one_error_naming_both_extras(monkeypatch) -> None:
    from pimoe_export.runtime.ort import session_options

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    libraries.import_onnxruntime.cache_clear()
    try:
        with pytest.raises(BackendUnavailableError) as info:
            session_options()
    finally:
        libraries.import_onnxruntime.cache_clear()
    message = str(info.value)
    assert "pimoe-export[cpu]" in message and "pimoe-export[gpu]" in message
    assert "onnxruntime-gpu" in message


def test_both_flavours_installed_warns(monkeypatch) -> None:
    monkeypatch.setattr(libraries, "installed_ort_distributions", lambda: ["onnxruntime", "onnxruntime-gpu"])
    libraries.import_onnxruntime.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="uninstall both and reinstall one"):
            libraries.import_onnxruntime()
    finally:
        libraries.import_onnxruntime.cache_clear()


def test_pyproject_has_no_hard_onnxruntime_dependency() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {req.split(";")[0].split("<")[0].split(">")[0].split("=")[0].split("[")[0].strip()
             for req in project["dependencies"]}
    assert not names & set(FLAVOURS.values()), names
    extras = project["optional-dependencies"]
    assert [r.startswith("onnxruntime>=1.21") for r in extras["cpu"]] == [True]
    assert [r.startswith("onnxruntime-gpu>=1.21") for r in extras["gpu"]] == [True]


# ------------------------------------------------------------------------------------------ fresh venvs
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """This package's wheel, built from a copy of the sources (so nothing is written into the checkout)."""
    src = tmp_path_factory.mktemp("src")
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(ROOT / "pimoe_export", src / "pimoe_export", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(out), str(src)], cwd=src)
    (found,) = out.glob("pimoe_export-*.whl")
    return found


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    """An exported tiny PiMoE layer, an input, this venv's ONNX Runtime outputs and the PyTorch reference."""
    import torch

    from pimoe_export.errors import PluginLoadError
    from pimoe_export.export.exporter import export_onnx
    from pimoe_export.model import create_from_preset
    from pimoe_export.runtime.ort import create_session, find_ort_library

    try:
        library = libraries.check_ort_library(str(find_ort_library()))["path"]
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")
    root = tmp_path_factory.mktemp("layer")
    model = create_from_preset("tiny", seed=3).eval()
    export_onnx(model, root / "model.onnx")
    x = np.random.default_rng(5).standard_normal((2, 9, model.hidden_size)).astype(np.float32)
    np.save(root / "x.npy", x)
    here = create_session(root / "model.onnx").run(None, {"hidden_states": x})
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    return {"dir": root, "x": root / "x.npy", "here": here, "reference": reference, "library": library}


def _wheelhouse_has(dist: str) -> bool:
    return any(WHEELHOUSE.glob(f"{dist.replace('-', '_')}-*.whl"))


@pytest.mark.slow
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_fresh_venv_runs_the_layer_with_either_onnxruntime(flavour, wheel, layer, tmp_path) -> None:
    dist = FLAVOURS[flavour]
    if not _wheelhouse_has(dist):
        pytest.skip(f"no {dist} wheel in {WHEELHOUSE}: run scripts/fetch_deps.sh ort-wheels (scripts/setup.sh does)")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)  # this pip drives it: faster
    py = str(venv / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", py]
    offline = ["--quiet", "--no-compile", "--no-index", "--find-links", str(WHEELHOUSE)]
    _run([*pip, "install", *offline, dist, "numpy"], cwd=tmp_path)
    # our package after the runtime (the order that used to clobber onnxruntime-gpu), torch-free: --no-deps
    _run([*pip, "install", *offline, "--no-deps", str(wheel)], cwd=tmp_path)
    env = {**_clean_env(), libraries.ORT_LIBRARY_ENV: layer["library"]}
    out = tmp_path / "out.npz"
    done = _run([py, "-c", VENV_SCRIPT, str(layer["dir"] / "model.onnx"), str(layer["x"]), str(out)], tmp_path, env)
    info = json.loads(done.stdout.strip().splitlines()[-1])

    assert Path(info["package"]).is_relative_to(venv), info["package"]  # the installed copy, not the checkout
    assert list(info["dists"]) == [dist], info["dists"]  # exactly one flavour, the one installed first
    assert info["session_providers"] == ["CPUExecutionProvider"]
    # the GPU build stays the GPU build after our package is installed; the CPU build has no CUDA provider
    assert ("CUDAExecutionProvider" in info["providers"]) == (flavour == "gpu"), info["providers"]
    # the metadata pip resolves against: ORT only behind the extras
    hard = [r for r in info["requires"] if "extra ==" not in r]
    assert not [r for r in hard if r.startswith("onnxruntime")], hard
    assert any(r.startswith(f"{dist}") and f'extra == "{flavour}"' in r for r in info["requires"]), info["requires"]
    # pip's own verdict on the installed set: the base dependencies it misses (torch, ...) and never onnxruntime
    check = subprocess.run([*pip, "check"], cwd=tmp_path, env=_clean_env(), capture_output=True,
                           text=True, timeout=120)
    assert "requires torch" in check.stdout, check.stdout
    assert "onnxruntime" not in check.stdout, check.stdout

    got = np.load(out)
    for name, mine in zip(("output", "expert_ids", "expert_weights"), layer["here"], strict=True):
        np.testing.assert_array_equal(got[name], mine, err_msg=f"{name}: {dist} venv vs this venv")
    np.testing.assert_allclose(got["output"], layer["reference"], rtol=1e-4, atol=1e-4)

