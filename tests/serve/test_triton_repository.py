"""Triton model repositories for every kind of unit, without TensorRT: an ONNX Runtime unit, and TensorRT and
TensorRT-RTX units made from it (an engine of arbitrary bytes: the writer copies and hashes, it never loads one).
What config.pbtxt declares at each max_batch_size, where the custom library is named, and what the README tells the
user to run (the start command, the version warning, the load-test shape), each written out here."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pimoe_export.artifacts.manifest import REQUIRED_ROLES, Artifact, read_manifest
from pimoe_export.build.units import package_ort
from pimoe_export.errors import PluginLoadError
from pimoe_export.interface import Profile
from pimoe_export.serve.triton import TritonRepositoryError, tensor_specs, write_triton_repository

FILES = {"onnx": "model.onnx", "engine": "model.engine", "plugin_library": "libpimoe_trt_plugins.so"}


@pytest.fixture(scope="module")
def ort(exported_layer, tmp_path_factory) -> Path:
    _, onnx_path = exported_layer("tiny", 0)
    unit = tmp_path_factory.mktemp("pipe") / "ort-fp32"
    try:
        package_ort(onnx_path, unit, profile=Profile((1, 1), (2, 8), (4, 128)))
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")
    return unit


def engine_unit(ort: Path, where: Path, backend: str, version: str = "11.4.0", sms=("sm_89",)) -> Path:
    unit = where / f"{backend}-fp32"
    shutil.copytree(ort, unit)
    (unit / "libpimoe_ort.so").unlink()
    (unit / "model.engine").write_bytes(os.urandom(2048))
    (unit / "libpimoe_trt_plugins.so").write_bytes(os.urandom(1024))
    manifest = read_manifest(unit)
    manifest.backend, manifest.backend_version, manifest.target_sms = backend, version, list(sms)
    manifest.artifacts = [Artifact.of(role, unit / FILES[role]) for role in REQUIRED_ROLES[backend]]
    manifest.write(unit)
    return unit


def test_an_onnx_runtime_repository_without_batching(ort, tmp_path) -> None:
    model = write_triton_repository(ort, tmp_path / "repo", server_repository="/models/")
    assert model.name == f"{ort.parent.name}_ort-fp32" and model.platform == "onnxruntime_onnx"
    config = model.config.read_text()
    assert 'platform: "onnxruntime_onnx"' in config and 'default_model_filename: "model.onnx"' in config
    assert "max_batch_size: 0\n" in config and "kind: KIND_CPU" in config
    assert f'op_library_filename: "/models/{model.name}/libpimoe_ort.so"' in config
    assert 'name: "hidden_states"\n    data_type: TYPE_FP32\n    dims: [ -1, -1, 16 ]' in config
    assert 'name: "expert_ids"\n    data_type: TYPE_INT32\n    dims: [ -1, -1, 2 ]' in config
    readme = model.readme.read_text()
    assert f"Source unit: `{ort.resolve()}`: onnxruntime " in readme
    assert "PiMoE H=16, E=4, k=2. Accepted shapes (the unit's profile): batch 1..4, sequence 1..128." in readme
    assert "max_batch_size 0 (batch is an explicit dimension of every tensor)." in readme
    assert "```bash\ntritonserver --model-repository=/models\n```" in readme
    assert f"of config.pbtxt: `/models/{model.name}/libpimoe_ort.so`" in readme
    assert f"Load test: `perf_analyzer -m {model.name} --shape hidden_states:1,16,16`." in readme
    assert "| input | `hidden_states` | TYPE_FP32 | [-1, -1, 16] |" in readme
    assert "PIMOE_TRT_STATIC_REGISTRATION" not in readme


def test_a_repository_with_batching_drops_the_batch_dim(ort, tmp_path) -> None:
    model = write_triton_repository(ort, tmp_path / "repo", name="batched", max_batch_size=4, instances=2)
    config = model.config.read_text()
    assert "max_batch_size: 4\n" in config and "count: 2\n" in config
    assert 'name: "hidden_states"\n    data_type: TYPE_FP32\n    dims: [ -1, 16 ]' in config
    assert 'name: "expert_weights"\n    data_type: TYPE_FP32\n    dims: [ -1, 2 ]' in config
    readme = model.readme.read_text()
    assert "max_batch_size 4 (Triton adds the batch dimension;" in readme
    assert "Load test: `perf_analyzer -m batched --shape hidden_states:16,16`." in readme
    assert model.max_batch_size == 4 and [t.dims for t in model.inputs] == [(-1, -1, 16)]


@pytest.mark.parametrize(("size", "fragment"), [
    (5, "--max-batch-size 5 is outside 0..4 (the unit's profile accepts batch 1..4); use 0"),
    (-1, "--max-batch-size -1 is outside 0..4"),
])
def test_a_batch_size_the_profile_cannot_hold_is_refused(ort, tmp_path, size, fragment) -> None:
    with pytest.raises(TritonRepositoryError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        write_triton_repository(ort, tmp_path / "repo", max_batch_size=size)
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_batching_needs_batch_1_and_a_leading_batch_axis(ort, tmp_path, monkeypatch) -> None:
    unit = tmp_path / "min2"
    shutil.copytree(ort, unit)
    manifest = read_manifest(unit)
    manifest.profile = Profile((2, 1), (2, 8), (4, 128))
    manifest.write(unit)
    with pytest.raises(TritonRepositoryError, match=r"needs a profile that accepts batch 1; this unit's minimum "
                                                    r"batch is 2: use --max-batch-size 0"):
        write_triton_repository(unit, tmp_path / "repo", max_batch_size=2)
    with pytest.raises(TritonRepositoryError, match=r"is outside 0\.\.4 \(the unit's profile accepts batch 2\.\.4\)"):
        write_triton_repository(unit, tmp_path / "repo", max_batch_size=9)
    # a graph whose outputs include one with a fixed leading dim (verify is stubbed: the tiny graph has none)
    from pimoe_export.artifacts.manifest import verify
    from pimoe_export.serve import triton

    verified = verify(ort)
    verified.manifest.io["outputs"][1][2] = [3, "sequence", 2]
    monkeypatch.setattr(triton, "verify", lambda unit_dir: verified)
    assert tensor_specs(verified.manifest)[1][1].dims == (3, -1, 2)
    with pytest.raises(TritonRepositoryError, match=r"--max-batch-size > 0 needs a dynamic leading \(batch\) "
                                                    r"dimension on every tensor"):
        write_triton_repository(ort, tmp_path / "repo", max_batch_size=2)
    write_triton_repository(ort, tmp_path / "repo", max_batch_size=0)  # without batching it is fine


def test_a_tensorrt_repository_names_its_plugins_for_the_backend(ort, tmp_path) -> None:
    unit = engine_unit(ort, tmp_path / "pipe", "tensorrt", version="11.4.0", sms=("sm_89", "sm_90"))
    model = write_triton_repository(unit, tmp_path / "repo", name="trt", server_repository="/srv/repo")
    config = model.config.read_text()
    assert 'platform: "tensorrt_plan"' in config and 'default_model_filename: "model.plan"' in config
    assert "kind: KIND_GPU" in config and "model_operations" not in config
    assert (model.model_dir / "1" / "model.plan").read_bytes() == (unit / "model.engine").read_bytes()
    assert (model.model_dir / "libpimoe_trt_plugins.so").read_bytes() == (unit / "libpimoe_trt_plugins.so").read_bytes()
    readme = model.readme.read_text()
    assert ("```bash\nPIMOE_TRT_STATIC_REGISTRATION=1 tritonserver --model-repository=/srv/repo \\\n"
            "    --backend-config=tensorrt,plugins=/srv/repo/trt/libpimoe_trt_plugins.so\n```") in readme
    assert "The engine runs only with exactly TensorRT 11.4.0 on a GPU of ['sm_89', 'sm_90']" in readme
    assert f"`pimoe-export build {unit.resolve() / 'model.onnx'} -o UNIT --flavour tensorrt`" in readme
    assert "Warning: this is a TensorRT-RTX engine" not in readme


def test_a_tensorrt_rtx_repository_only_on_request_and_with_a_warning(ort, tmp_path) -> None:
    unit = engine_unit(ort, tmp_path / "pipe", "tensorrt-rtx", version="1.7.1", sms=("sm_86",))
    with pytest.raises(TritonRepositoryError, match=r"holds a TensorRT-RTX engine; Triton's TensorRT backend "
                                                    r".*or pass --allow-rtx to write it anyway for inspection"):
        write_triton_repository(unit, tmp_path / "repo")
    model = write_triton_repository(unit, tmp_path / "repo", name="rtx", allow_rtx=True)
    readme = model.readme.read_text()
    assert "**Warning: this is a TensorRT-RTX engine.**" in readme
    assert "inspection only. Build a TensorRT unit (`--flavour tensorrt`, e.g. in the docker/server image)" in readme
    assert "The engine runs only with exactly" not in readme


def test_an_engine_whose_version_was_not_recorded(ort, tmp_path) -> None:
    unit = engine_unit(ort, tmp_path / "pipe", "tensorrt", version="", sms=())
    readme = write_triton_repository(unit, tmp_path / "repo", name="v").readme.read_text()
    assert "exactly TensorRT (version not recorded) on a GPU of the build machine" in readme


def test_output_dtypes_default_to_the_first_inputs(ort, tmp_path) -> None:
    unit = tmp_path / "blank"
    shutil.copytree(ort, unit)
    manifest = read_manifest(unit)
    manifest.io["outputs"][0][1] = ""  # recorded as "follows the precision"
    inputs, outputs = tensor_specs(manifest)
    assert outputs[0].data_type == inputs[0].data_type == "TYPE_FP32"
    manifest.io["inputs"][0][1] = "float16"
    assert tensor_specs(manifest)[1][0].data_type == "TYPE_FP16"
    manifest.io["inputs"][0][1] = ""
    with pytest.raises(TritonRepositoryError, match=r"tensor 'hidden_states' has dtype '', which has no Triton"):
        tensor_specs(manifest)


def test_a_malformed_io_entry_is_refused_naming_it_and_the_fix(ort) -> None:
    from pimoe_export.errors import ArtifactError

    manifest = read_manifest(ort)
    manifest.io["outputs"][1] = ["expert_ids", "int32"]  # no shape
    with pytest.raises(ArtifactError, match=r"\['expert_ids', 'int32'\].*rebuild the unit"):
        tensor_specs(manifest)
