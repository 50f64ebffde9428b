"""`pimoe-export triton`: Triton Inference Server model repositories for deployable units.

A TensorRT-RTX unit is built ahead of time in the test (CI has no full TensorRT; the generator handles both engine
flavours alike, RTX only behind --allow-rtx), an onnxruntime unit is packaged from the same export. config.pbtxt
is read back with a small protobuf-text parser of this file (independent of the generator) and compared with the
manifest and with the ONNX graph itself. No tritonserver runs here: these tests check the files only.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pimoe_export.errors import ArtifactError, BackendUnavailableError, PluginLoadError

# ------------------------------------------------------------------------------------------ pbtxt reader
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"#]+|#[^\n]*')


def parse_pbtxt(text: str) -> dict[str, list[Any]]:
    """Protobuf text format -> {field: [values]} (messages are dicts of the same shape; `f [a, b]` lists extend)."""
    tokens = [t for t in _TOKENS.findall(text) if not t.startswith("#")]
    pos = 0

    def scalar(token: str) -> Any:
        if token.startswith('"'):
            return token[1:-1]
        return int(token) if re.fullmatch(r"-?\d+", token) else token

    def value() -> list[Any]:
        nonlocal pos
        token = tokens[pos]
        pos += 1
        if token == "{":
            return [message("}")]
        if token == "[":
            items: list[Any] = []
            while tokens[pos] != "]":
                if tokens[pos] == ",":
                    pos += 1
                    continue
                items.extend(value())
            pos += 1
            return items
        return [scalar(token)]

    def message(end: str | None) -> dict[str, list[Any]]:
        nonlocal pos
        fields: dict[str, list[Any]] = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            fields.setdefault(key, []).extend(value())
        pos += 1
        return fields

    return message(None)


def tensors(config: dict[str, list[Any]], kind: str) -> list[tuple[str, str, list[int]]]:
    return [(t["name"][0], t["data_type"][0], t["dims"]) for t in config[kind]]


# ------------------------------------------------------------------------------------------ fixtures
_ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 6: "TYPE_INT32"}  # onnx.TensorProto element types
_IO_TO_TRITON = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int32": "TYPE_INT32"}  # manifest io dtypes


def _dims(shape) -> list[int]:
    """Manifest io dims -> config.pbtxt dims (an axis name is a dynamic dimension, -1)."""
    return [d if isinstance(d, int) else -1 for d in shape]


@pytest.fixture(scope="module")
def tiny(exported_layer):
    return exported_layer("tiny", 5)


@pytest.fixture(scope="module")
def rtx_unit(tiny, tmp_path_factory) -> Path:
    from pimoe_export.build.units import BuildOptions, build_unit
    from pimoe_export.native import libraries as L
    from pimoe_export.native import tensorrt_loader as T

    try:
        L.find_plugin_library()
        T.import_tensorrt("rtx")
    except (PluginLoadError, BackendUnavailableError) as exc:
        pytest.skip(f"TensorRT-RTX or the plugin library is not available: {exc}")
    unit = tmp_path_factory.mktemp("units") / "trt-rtx-fp32"
    build_unit(tiny[1], unit, options=BuildOptions(flavour="rtx", compute_capabilities=("SM89",)))
    return unit


@pytest.fixture(scope="module")
def ort_unit(tiny, tmp_path_factory) -> Path:
    from pimoe_export.build.units import package_ort

    try:
        unit = tmp_path_factory.mktemp("units") / "ort-fp32"
        package_ort(tiny[1], unit)
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")
    return unit


def _manifest(unit: Path):
    from pimoe_export.artifacts.manifest import read_manifest

    return read_manifest(unit)


def _onnx_io(path: Path) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def spec(value) -> tuple[str, str, list[int]]:
        t = value.type.tensor_type
        return (value.name, _ONNX_TO_TRITON[t.elem_type],
                [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim])

    return [spec(v) for v in graph.input], [spec(v) for v in graph.output]


# ------------------------------------------------------------------------------------------ TensorRT units
@pytest.mark.trt
def test_tensorrt_repository_matches_manifest_and_onnx(rtx_unit, tiny, tmp_path) -> None:
    from pimoe_export.serve.triton import write_triton_repository

    repo = tmp_path / "repo"
    model = write_triton_repository(rtx_unit, repo, name="pimoe_tiny", allow_rtx=True)
    config = parse_pbtxt((repo / "pimoe_tiny" / "config.pbtxt").read_text())
    assert config["name"] == ["pimoe_tiny"]
    assert config["platform"] == ["tensorrt_plan"]
    assert config["default_model_filename"] == ["model.plan"]
    assert config["max_batch_size"] == [0]
    assert config["instance_group"] == [{"count": [1], "kind": ["KIND_GPU"]}]
    assert "model_operations" not in config

    manifest = _manifest(rtx_unit)
    expected_in = [(n, _IO_TO_TRITON[d], _dims(s)) for n, d, s in manifest.io["inputs"]]
    expected_out = [(n, _IO_TO_TRITON[d], _dims(s)) for n, d, s in manifest.io["outputs"]]
    assert tensors(config, "input") == expected_in
    assert tensors(config, "output") == expected_out
    # and the same as the ONNX graph the engine was built from (names, dtypes, dims; -1 = dynamic)
    assert (tensors(config, "input"), tensors(config, "output")) == _onnx_io(tiny[1])
    assert tensors(config, "input") == [("hidden_states", "TYPE_FP32", [-1, -1, 16])]
    assert [t[1] for t in tensors(config, "output")] == ["TYPE_FP32", "TYPE_INT32", "TYPE_FP32"]

    plan = repo / "pimoe_tiny" / "1" / "model.plan"
    library = repo / "pimoe_tiny" / "libpimoe_trt_plugins.so"
    assert plan.read_bytes() == (rtx_unit / "model.engine").read_bytes()
    assert library.read_bytes() == (rtx_unit / "libpimoe_trt_plugins.so").read_bytes()
    assert model.model_file == plan and model.library == library
    readme = (repo / "pimoe_tiny" / "README.md").read_text()
    assert f"--backend-config=tensorrt,plugins={library.resolve()}" in readme
    assert "PIMOE_TRT_STATIC_REGISTRATION=1 tritonserver" in readme
    assert "TensorRT-RTX engine" in readme  # written with --allow-rtx: marked as not servable by Triton


@pytest.mark.trt
def test_rtx_unit_is_refused_without_allow_rtx(rtx_unit, tmp_path) -> None:
    from pimoe_export.serve.triton import TritonRepositoryError, write_triton_repository

    with pytest.raises(TritonRepositoryError, match=r"TensorRT-RTX engine.*--flavour tensorrt"):
        write_triton_repository(rtx_unit, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


@pytest.mark.trt
@pytest.mark.parametrize("victim", ["model.engine", "libpimoe_trt_plugins.so", "manifest.json"])
def test_tampered_unit_is_refused(tiny, rtx_unit, tmp_path, victim, capsys) -> None:
    from pimoe_export.cli import main
    from pimoe_export.serve.triton import write_triton_repository

    unit = tmp_path / "unit"
    shutil.copytree(rtx_unit, unit)
    path = unit / victim
    if victim == "manifest.json":
        from pimoe_export.ops.schema import CONTRACT_VERSION

        text = path.read_text()
        assert f'"contract_version": {CONTRACT_VERSION}' in text
        path.write_text(text.replace(f'"contract_version": {CONTRACT_VERSION}', '"contract_version": 99'))
        expected = "op contract v99"
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        expected = f"{victim} does not match its manifest sha256"
    with pytest.raises(ArtifactError, match=re.escape(expected)):
        write_triton_repository(unit, tmp_path / "repo", allow_rtx=True)
    assert not (tmp_path / "repo").exists()  # nothing written before verification
    assert main(["triton", str(unit), "-o", str(tmp_path / "repo"), "--allow-rtx"]) == 2
    assert expected in capsys.readouterr().err
    # `check --unit` verifies the shipped unit before anything runs: the same refusal, no report written
    from pimoe_export.model.io import save_pretrained

    model_dir = save_pretrained(tiny[0], tmp_path / "model")
    assert main(["check", str(model_dir), "--unit", str(unit), "--no-plots"]) == 2
    assert expected in capsys.readouterr().err
    assert not (unit / "report").exists()


@pytest.mark.trt
def test_cli_options(rtx_unit, tmp_path, capsys) -> None:
    from pimoe_export.cli import main

    repo = tmp_path / "repo"
    args = ["triton", str(rtx_unit), "-o", str(repo), "--allow-rtx", "--instances", "3", "--server-repo", "/models"]
    assert main(args) == 0
    name = f"{rtx_unit.parent.name}_{rtx_unit.name}"  # default: <pipeline dir>_<unit dir>
    assert name in capsys.readouterr().out
    config = parse_pbtxt((repo / name / "config.pbtxt").read_text())
    assert config["instance_group"] == [{"count": [3], "kind": ["KIND_GPU"]}]
    readme = (repo / name / "README.md").read_text()
    assert f"plugins=/models/{name}/libpimoe_trt_plugins.so" in readme
    assert "--model-repository=/models" in readme

    assert main(args) == 2  # exists: refused without --force
    assert "already exists; pass --force" in capsys.readouterr().err
    (repo / name / "1" / "model.plan").write_bytes(b"stale")
    assert main([*args, "--force", "--max-batch-size", "8"]) == 0
    config = parse_pbtxt((repo / name / "config.pbtxt").read_text())
    assert config["max_batch_size"] == [8]  # Triton adds the batch dim: it leaves every tensor's dims
    assert tensors(config, "input") == [("hidden_states", "TYPE_FP32", [-1, 16])]
    assert [t[2] for t in tensors(config, "output")] == [[-1, 16], [-1, 2], [-1, 2]]
    assert (repo / name / "1" / "model.plan").read_bytes() == (rtx_unit / "model.engine").read_bytes()


@pytest.mark.trt
@pytest.mark.parametrize(("options", "message"), [
    ({"max_batch_size": 9}, r"--max-batch-size 9 is outside 0\.\.8"),
    ({"max_batch_size": -1}, "outside"),
    ({"instances": 0}, "--instances must be >= 1"),
    ({"name": "../escape"}, "not usable as a Triton model directory"),
    ({"server_repository": "models"}, "--server-repo must be an absolute path"),
])
def test_bad_options_are_refused(rtx_unit, tmp_path, options, message) -> None:
    from pimoe_export.serve.triton import TritonRepositoryError, write_triton_repository

    with pytest.raises(TritonRepositoryError, match=message):
        write_triton_repository(rtx_unit, tmp_path / "repo", allow_rtx=True, **options)
    assert not any((tmp_path / "repo").glob("*/config.pbtxt"))


def test_force_does_not_delete_foreign_folders(ort_unit, tmp_path) -> None:
    from pimoe_export.serve.triton import TritonRepositoryError, write_triton_repository

    foreign = tmp_path / "repo" / "mine"
    foreign.mkdir(parents=True)
    (foreign / "data.txt").write_text("keep me")
    with pytest.raises(TritonRepositoryError, match=r"holds no config\.pbtxt"):
        write_triton_repository(ort_unit, tmp_path / "repo", name="mine", force=True)
    assert (foreign / "data.txt").read_text() == "keep me"


def test_force_replaces_a_model_folder_this_command_wrote_even_without_its_config(ort_unit, tmp_path) -> None:
    """A folder the command wrote itself (recorded in the repository's ownership record) is replaced with force
    even when its config.pbtxt is gone (an interrupted write); without force it is refused."""
    from pimoe_export.serve.triton import TritonRepositoryError, write_triton_repository

    write_triton_repository(ort_unit, tmp_path / "repo", name="tiny")
    (tmp_path / "repo" / "tiny" / "config.pbtxt").unlink()
    (tmp_path / "repo" / "tiny" / "stale.txt").write_text("from before")
    with pytest.raises(TritonRepositoryError, match="already exists; pass --force"):
        write_triton_repository(ort_unit, tmp_path / "repo", name="tiny")
    model = write_triton_repository(ort_unit, tmp_path / "repo", name="tiny", force=True)
    assert model.config.is_file() and not (tmp_path / "repo" / "tiny" / "stale.txt").exists()
    # a Triton model folder written by someone else (it holds a config.pbtxt) is replaced with force too
    other = tmp_path / "repo" / "theirs"
    other.mkdir()
    (other / "config.pbtxt").write_text('name: "theirs"\n')
    model = write_triton_repository(ort_unit, tmp_path / "repo", name="theirs", force=True)
    assert 'name: "theirs"' in model.config.read_text() and (other / "1").is_dir()


# ------------------------------------------------------------------------------------------ onnxruntime units
def test_onnxruntime_repository(ort_unit, tiny, tmp_path) -> None:
    """Served by Triton's ONNX Runtime backend: model.onnx + our op library via model_operations, on the CPU."""
    import torch

    from pimoe_export.runtime.ort import create_session
    from pimoe_export.serve.triton import write_triton_repository

    repo = tmp_path / "repo"
    write_triton_repository(ort_unit, repo, name="tiny_ort")
    config = parse_pbtxt((repo / "tiny_ort" / "config.pbtxt").read_text())
    assert config["platform"] == ["onnxruntime_onnx"]
    assert config["default_model_filename"] == ["model.onnx"]
    assert config["max_batch_size"] == [0]
    assert config["instance_group"] == [{"count": [1], "kind": ["KIND_CPU"]}]
    assert (tensors(config, "input"), tensors(config, "output")) == _onnx_io(tiny[1])
    library = Path(config["model_operations"][0]["op_library_filename"][0])
    assert library.is_absolute() and library == (repo / "tiny_ort" / "libpimoe_ort.so").resolve()
    assert library.read_bytes() == (ort_unit / "libpimoe_ort.so").read_bytes()
    onnx_copy = repo / "tiny_ort" / "1" / "model.onnx"
    assert onnx_copy.read_bytes() == (ort_unit / "model.onnx").read_bytes()

    # what Triton's ONNX Runtime backend would load, run in ONNX Runtime: matches the PyTorch model
    session = create_session(onnx_copy, library=library)
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    y = session.run(["output"], {"hidden_states": x})[0]
    with torch.inference_mode():
        ref = tiny[0](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)

    readme = (repo / "tiny_ort" / "README.md").read_text()
    assert "op_library_filename" in readme and "must be 1.21 or newer" in readme


def test_onnxruntime_repository_ships_external_data(tiny, tmp_path) -> None:
    """A graph with its weights in an external-data file (what export writes past 2 GB; forced here on the tiny
    layer): the unit ships the data file, and the Triton model folder gets it beside model.onnx, so the model there
    runs as the PyTorch layer computes it."""
    import onnx
    import torch

    from pimoe_export.build.units import package_ort
    from pimoe_export.runtime.ort import create_session
    from pimoe_export.serve.triton import write_triton_repository

    graph = tmp_path / "external.onnx"
    onnx.save_model(onnx.load(str(tiny[1])), str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="external.onnx.data", size_threshold=0)
    try:
        package_ort(graph, tmp_path / "unit")
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")
    assert {a.role for a in _manifest(tmp_path / "unit").artifacts} >= {"onnx", "onnx_data"}
    write_triton_repository(tmp_path / "unit", tmp_path / "repo", name="ext")
    served = tmp_path / "repo" / "ext" / "1"
    assert sorted(p.name for p in served.iterdir()) == ["external.onnx.data", "model.onnx"]
    session = create_session(served / "model.onnx", library=tmp_path / "repo" / "ext" / "libpimoe_ort.so")
    x = np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32)
    with torch.inference_mode():
        ref = tiny[0](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(["output"], {"hidden_states": x})[0], ref, rtol=1e-5, atol=1e-5)


def test_onnxruntime_repository_with_server_path(ort_unit, tmp_path) -> None:
    from pimoe_export.serve.triton import write_triton_repository

    write_triton_repository(ort_unit, tmp_path / "repo", name="m", server_repository="/models/")
    config = parse_pbtxt((tmp_path / "repo" / "m" / "config.pbtxt").read_text())
    assert config["model_operations"] == [{"op_library_filename": ["/models/m/libpimoe_ort.so"]}]


def test_unit_without_io_is_refused(ort_unit, tmp_path) -> None:
    import json

    from pimoe_export.serve.triton import write_triton_repository

    unit = tmp_path / "unit"
    shutil.copytree(ort_unit, unit)
    data = json.loads((unit / "manifest.json").read_text())
    data["io"] = {}
    (unit / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="records no inputs/outputs"):
        write_triton_repository(unit, tmp_path / "repo")


def test_not_a_unit(tmp_path) -> None:
    from pimoe_export.serve.triton import write_triton_repository

    with pytest.raises(ArtifactError, match=r"manifest\.json is missing"):
        write_triton_repository(tmp_path, tmp_path / "repo")


def test_pbtxt_reader() -> None:
    text = '# c\nname: "a"\nx [ { d: [ -1, 2 ] k: K }, { d: [ 3 ] } ]\ng { c: 1 }\n'
    assert parse_pbtxt(text) == {"name": ["a"], "x": [{"d": [-1, 2], "k": ["K"]}, {"d": [3]}], "g": [{"c": [1]}]}
