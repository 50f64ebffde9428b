"""Deployable units, manifests and the Engine runtime API (ONNX Runtime here; TensorRT where installed)."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from pimoe_export.artifacts.manifest import read_manifest, verify
from pimoe_export.build.units import package_ort
from pimoe_export.cli import main
from pimoe_export.errors import ArtifactError, BackendUnavailableError, PiMoEInputError, PluginLoadError
from pimoe_export.export.exporter import export_onnx
from pimoe_export.interface import Profile
from pimoe_export.model import create_from_preset
from pimoe_export.runtime.engine import Engine
from pimoe_export.runtime.ort import create_session


@pytest.fixture(scope="module")
def tiny(exported_layer):
    model, onnx_path = exported_layer("tiny", 5)
    return model, onnx_path, onnx_path.parent


@pytest.fixture
def ort_unit(tiny, tmp_path):
    _, onnx_path, _ = tiny
    package_ort(onnx_path, tmp_path / "unit", profile=Profile((1, 1), (1, 8), (4, 64)))
    return tmp_path / "unit"


def test_ort_unit_end_to_end(tiny, ort_unit) -> None:
    model, onnx_path, _ = tiny
    manifest = verify(ort_unit)
    assert manifest.backend == "onnxruntime" and manifest.precision == "fp32"
    assert {a.role for a in manifest.artifacts} == {"onnx", "ort_library"}
    x = np.random.default_rng(0).standard_normal((2, 9, 16)).astype(np.float32)
    with Engine.load(ort_unit) as engine:
        y = engine.run(x)
        y2, ids, _ = engine.run(x, routing=True)
        direct = create_session(onnx_path).run(None, {"hidden_states": x})
        assert np.array_equal(y, direct[0]) and np.array_equal(y2, y) and np.array_equal(ids, direct[1])
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
        yt = engine.run(torch.from_numpy(x))  # torch in, torch out
        assert isinstance(yt, torch.Tensor) and torch.equal(yt, torch.from_numpy(y))


def test_bad_inputs_and_profile_range(ort_unit) -> None:
    with Engine.load(ort_unit) as engine:
        with pytest.raises(PiMoEInputError, match=r"outside this unit's profile .*pimoe-export build --max-tokens"):
            engine.run(np.zeros((5, 4, 16), np.float32))
        with pytest.raises(PiMoEInputError, match=r"\[batch, sequence, 16\]"):
            engine.run(np.zeros((2, 4, 15), np.float32))
        with pytest.raises(PiMoEInputError, match="takes float32 input, got float64"):
            engine.run(np.zeros((1, 4, 16)))
        with pytest.raises(PiMoEInputError, match="numpy array or torch tensor"):
            engine.run([[0.0] * 16])


def test_concurrent_runs_are_identical(ort_unit) -> None:
    x = np.random.default_rng(1).standard_normal((4, 64, 16)).astype(np.float32)
    with Engine.load(ort_unit, threads=2) as engine:
        serial = engine.run(x)
        with ThreadPoolExecutor(max_workers=6) as pool:
            results = list(pool.map(lambda _: engine.run(x), range(24)))
    assert all(np.array_equal(r, serial) for r in results)


@pytest.mark.parametrize("tamper", ["onnx-bytes", "library-missing", "manifest-json", "manifest-format",
                                    "contract", "onnx-replaced"])
def test_tampered_or_mismatched_units_are_refused(ort_unit, tamper) -> None:
    manifest_path = ort_unit / "manifest.json"
    if tamper == "onnx-bytes":
        data = bytearray((ort_unit / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 0x01
        (ort_unit / "model.onnx").write_bytes(bytes(data))
        fragment = "does not match its manifest sha256"
    elif tamper == "library-missing":
        (ort_unit / "libpimoe_ort.so").unlink()
        fragment = "libpimoe_ort.so is missing"
    elif tamper == "manifest-json":
        manifest_path.write_text("{broken")
        fragment = "not valid JSON"
    elif tamper == "manifest-format":
        manifest_path.write_text(json.dumps({"format": "something/9"}))
        fragment = "expected format"
    elif tamper == "contract":
        data = json.loads(manifest_path.read_text())
        data["contract_version"] = 99
        manifest_path.write_text(json.dumps(data))
        fragment = "op contract v99"
    else:  # a different (valid) model file under the same name
        other = create_from_preset("tiny", seed=6)
        export_onnx(other, ort_unit / "model.onnx")
        fragment = "does not match its manifest sha256"
    with pytest.raises(ArtifactError, match=fragment) as info:
        Engine.load(ort_unit)
    if tamper not in ("manifest-json", "manifest-format"):
        assert "pimoe-export" in str(info.value)  # says how to rebuild


def test_engine_version_and_sm_mismatch_are_refused(ort_unit, tmp_path) -> None:
    unit = tmp_path / "fake-trt"
    shutil.copytree(ort_unit, unit)
    data = json.loads((unit / "manifest.json").read_text())
    data.update(backend="tensorrt", backend_version="11.4.0", target_sms=["sm_89"])
    # the artefacts a tensorrt unit must list (contents are never loaded here: verify checks hashes only)
    shutil.copyfile(unit / "model.onnx", unit / "model.engine")
    shutil.copyfile(unit / "libpimoe_ort.so", unit / "libpimoe_trt_plugins.so")
    data["artifacts"] = [a for a in data["artifacts"] if a["role"] == "onnx"] + [
        {**a, "role": role, "file": file} for a in data["artifacts"]
        for role, file, source in (("engine", "model.engine", "onnx"), ("plugin_library", "libpimoe_trt_plugins.so",
                                                                        "ort_library")) if a["role"] == source]
    (unit / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"built with tensorrt 11\.4\.0, this machine has 11\.5\.1"):
        verify(unit, backend_version="11.5.1")
    with pytest.raises(ArtifactError, match=r"targets \['sm_89'\], this GPU is sm_90"):
        verify(unit, backend_version="11.4.0", device_sm="sm_90")
    assert verify(unit, backend_version="11.4.0", device_sm="sm_89").backend == "tensorrt"


def test_missing_unit_and_inspect_cli(ort_unit, tmp_path, capsys) -> None:
    with pytest.raises(ArtifactError, match=r"manifest\.json is missing"):
        read_manifest(tmp_path / "nothing")
    assert main(["inspect", str(ort_unit)]) == 0
    assert "verified" in capsys.readouterr().out
    (ort_unit / "model.onnx").write_bytes(b"x")
    assert main(["inspect", str(ort_unit)]) == 2  # an invalid unit is bad input (README: exit codes)
    assert "NOT VALID" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ TensorRT(-RTX)
def _rtx_or_skip():
    try:
        from pimoe_export.native.libraries import find_plugin_library
        from pimoe_export.native.tensorrt_loader import import_tensorrt

        import_tensorrt("rtx")
        find_plugin_library()
    except (PluginLoadError, BackendUnavailableError) as exc:  # anything else is a bug: it fails, never skips
        pytest.skip(f"TensorRT-RTX or the plugin library is not available: {exc}")


@pytest.mark.trt
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["seed-512", "seed-types"])
def test_cli_build_produces_rtx_units_with_manifests(preset, tmp_path, capsys) -> None:
    """Issue acceptance: `pimoe-export build` produces TensorRT-RTX ahead-of-time engines with manifests."""
    _rtx_or_skip()
    model = create_from_preset(preset, seed=1)
    onnx_path = tmp_path / "model.onnx"
    export_onnx(model, onnx_path)
    unit = tmp_path / "trt"
    cache = tmp_path / "timing.cache"
    assert main(["build", str(onnx_path), "-o", str(unit), "--sm", "SM80,SM89", "--max-tokens", "4x256",
                 "--opt-level", "2", "--timing-cache", str(cache)]) == 0
    manifest = verify(unit)
    assert manifest.backend == "tensorrt-rtx" and manifest.target_sms == ["sm_80", "sm_89"]
    assert manifest.profile.max_shape == (4, 256) and manifest.build_options["optimization_level"] == 2
    groups = len(model.config.expert_groups())
    assert manifest.build_options["plugin_layers"] == {"PiMoERoute": 1, "PiMoEDispatch": 1,
                                                       "PiMoEExpertMLP": groups, "PiMoECombine": 1}
    assert manifest.source_onnx_sha256 == manifest.artifact("onnx").sha256
    # TensorRT-RTX has no tactic timing (its timing-cache calls are no-ops): the cache is not used, and says so
    assert manifest.build_options["timing_cache_used"] is False and not cache.exists()
    assert main(["inspect", str(unit)]) == 0
    # an RTX engine cannot run on this machine: loading says so instead of crashing
    with pytest.raises(BackendUnavailableError, match="TensorRT-RTX engine"):
        Engine.load(unit)


@pytest.mark.trt
def test_tensorrt_engine_runs_where_tensorrt_and_a_gpu_exist(tiny, tmp_path) -> None:
    """Runs in the docker/ server image (TensorRT + GPU); skipped elsewhere."""
    try:
        from pimoe_export.native.devices import local_gpu_sm
        from pimoe_export.native.tensorrt_loader import import_tensorrt

        import_tensorrt("tensorrt")
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    if local_gpu_sm() is None:
        pytest.skip("no GPU")
    from pimoe_export.build.units import BuildOptions, build_unit

    model, onnx_path, _ = tiny
    build_unit(onnx_path, tmp_path / "trt", options=BuildOptions(flavour="tensorrt"))
    x = np.random.default_rng(2).standard_normal((2, 16, 16)).astype(np.float32)
    with Engine.load(tmp_path / "trt") as engine:
        y = engine.run(x)
        with ThreadPoolExecutor(max_workers=4) as pool:
            assert all(np.array_equal(r, y) for r in pool.map(lambda _: engine.run(x), range(8)))
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


def test_comparison_of_precomputed_backend_outputs(tiny, tmp_path) -> None:
    """The comparison every check runs, on outputs a backend computed: Polygraphy's accuracy check and the verdict
    pass on the backend's own outputs and fail when one output is off by 1%."""
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult

    from pimoe_export.interface import TOLERANCES, layer_interface
    from pimoe_export.validate.compare import COMPARED, compare_settings, polygraphy_accuracy, verdict
    from pimoe_export.validate.reference import make_inputs, pytorch_reference

    model, onnx_path, _ = tiny
    feeds = make_inputs(layer_interface(16, model.config.top_k, "fp32"), [(1, 3), (2, 8)], 0)
    reference = pytorch_reference(model, feeds)
    session = create_session(onnx_path)
    actual = [dict(zip(("output", "expert_ids", "expert_weights"), session.run(None, f), strict=True))
              for f in feeds]

    def results(name: str, outputs: list) -> RunResults:
        entry = RunResults()
        entry.append((name, [IterationResult({k: o[k] for k in COMPARED}, runner_name=name) for o in outputs]))
        return entry

    def compare() -> tuple[bool, list[str]]:
        passed = polygraphy_accuracy(results("pytorch", reference), results("tensorrt", actual),
                                     compare_settings(TOLERANCES["fp32"], reference))
        return passed, verdict(reference, actual, TOLERANCES["fp32"], passed).failures

    assert compare() == (True, [])
    actual[1]["output"] = actual[1]["output"] * 1.01
    passed, failures = compare()
    assert not passed and failures


def test_a_broadcast_input_beyond_the_contract_is_refused_before_it_is_copied(tiny, tmp_path) -> None:
    """An 8 GiB (2^31 float32) zero-stride input inside a unit whose profile allows it: the op contract's element
    limits refuse it before anything is made contiguous (nothing near its size is allocated)."""
    import tracemalloc

    from pimoe_export.runtime.engine import Engine

    _, onnx_path, _ = tiny
    package_ort(onnx_path, tmp_path / "unit", profile=Profile((1, 1), (1, 64), (65536, 65536)))
    huge = np.broadcast_to(np.zeros(1, np.float32), (8192, 16384, 16))
    assert huge.size == 2**31 and huge.nbytes == 8 * 2**30
    with Engine.load(tmp_path / "unit") as engine:
        tracemalloc.start()
        try:
            with pytest.raises(PiMoEInputError, match=r"ops index at most \d+ per call"):
                engine.run(huge)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 2**20, peak
        assert engine.unit.max_tokens == (2**31 - 1) // (2 * 64)  # k * the widest layer of the tiny experts
        y = engine.run(np.broadcast_to(np.ones(1, np.float32), (2, 3, 16)))  # a small broadcast input still runs
        assert y.shape == (2, 3, 16)
