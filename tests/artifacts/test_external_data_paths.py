"""External-data locations are untrusted input: every tensor of a graph is looked at (not only its initializers),
and a unit takes one plain '<name>.data' file beside its ONNX, never a path elsewhere or another unit file's name;
client files copied into a decoder unit are files of the source directory, not symlinks to elsewhere."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pimoe_export._files import OutputDir
from pimoe_export.artifacts.manifest import copy_onnx
from pimoe_export.errors import ArtifactError
from pimoe_export.interface import external_data_files


def _external(name: str, location: str) -> TensorProto:
    tensor = numpy_helper.from_array(np.zeros(4, np.float32), name)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _graph(nodes: list, initializers: list | None = None, name: str = "g") -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=initializers)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _constant_model(location: str) -> onnx.ModelProto:
    constant = helper.make_node("Constant", [], ["c"], value=_external("c", location))
    return _model(_graph([constant, helper.make_node("Add", ["x", "c"], ["y"])]))


def test_a_constant_node_value_is_found() -> None:
    assert external_data_files(_constant_model("../secret.bin")) == ["../secret.bin"]


def test_initializers_sparse_tensors_and_subgraphs_are_found() -> None:
    branch = _graph([helper.make_node("Constant", [], ["y"], value=_external("b", "in_branch.data"))], name="then")
    other = _graph([helper.make_node("Identity", ["x"], ["y"])], name="else")
    cond = helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True), "cond"))
    branch_node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)
    graph = _graph([cond, branch_node], [_external("w", "weights.data")])
    sparse = helper.make_sparse_tensor(_external("sv", "sparse.data"),
                                       numpy_helper.from_array(np.array([0], np.int64), "si"), [4])
    graph.sparse_initializer.append(sparse)
    assert external_data_files(_model(graph)) == ["in_branch.data", "sparse.data", "weights.data"]


def test_a_self_contained_graph_names_none() -> None:
    graph = _graph([helper.make_node("Add", ["x", "w"], ["y"])], [numpy_helper.from_array(np.ones(4, np.float32), "w")])
    assert external_data_files(_model(graph)) == []


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "model.onnx", "libpimoe_ort.so",
                                      "manifest.json", "sub/model.onnx.data"])
def test_a_unit_refuses_an_external_location_that_is_not_a_plain_data_file(location: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(_constant_model(location), str(src / "graph.onnx"))
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    unit = tmp_path / "unit"
    with pytest.raises(ArtifactError, match=re.escape("plain '<name>.data' file name")):
        copy_onnx(src / "graph.onnx", OutputDir(unit))
    assert not (unit / "model.onnx").exists()


def test_a_unit_copies_a_plain_data_file_beside_the_graph(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(_constant_model("graph.onnx.data"), str(src / "graph.onnx"))
    (src / "graph.onnx.data").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    artifacts = copy_onnx(src / "graph.onnx", OutputDir(tmp_path / "unit"))
    assert [a.role for a in artifacts] == ["onnx", "onnx_data"]
    assert (tmp_path / "unit" / "graph.onnx.data").read_bytes() == (src / "graph.onnx.data").read_bytes()


def test_a_missing_or_escaping_data_file_is_named_as_the_graphs_external_data(tmp_path: Path) -> None:
    """The plain name the graph gives must be a file beside it: missing, or a symlink out of the source folder,
    is refused naming the graph's external data and the fix, and the data is not copied."""
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(_constant_model("graph.onnx.data"), str(src / "graph.onnx"))
    with pytest.raises(ArtifactError) as info:
        copy_onnx(src / "graph.onnx", OutputDir(tmp_path / "unit"))
    assert str(info.value) == (f"{src}: graph.onnx.data is missing (the ONNX's external data; or it is not a regular "
                               "file): re-export the graph")
    (tmp_path / "elsewhere.data").write_bytes(b"\0" * 16)
    (src / "graph.onnx.data").symlink_to(tmp_path / "elsewhere.data")
    with pytest.raises(ArtifactError) as info:
        copy_onnx(src / "graph.onnx", OutputDir(tmp_path / "unit2"))
    assert str(info.value).startswith(f"{src}: the ONNX's external data ('graph.onnx.data') resolves to ")
    assert str(info.value).endswith("outside the unit; a unit may only name files inside itself (no '..', no "
                                    "symlinks to elsewhere): re-export the graph")
    assert not (tmp_path / "unit2" / "graph.onnx.data").exists()


def test_a_client_file_symlinked_to_elsewhere_is_refused(tmp_path: Path) -> None:
    from pimoe_export.build.units import _client_sources

    secret = tmp_path / "id_rsa"
    secret.write_text("not for shipping")
    source = tmp_path / "model"
    source.mkdir()
    (source / "tokenizer.json").symlink_to(secret)
    with pytest.raises(ArtifactError, match="outside the model directory"):
        _client_sources(source)
    (source / "tokenizer.json").unlink()
    (source / "tokenizer.json").write_text("{}")
    assert _client_sources(source)["tokenizer"] == (source / "tokenizer.json").resolve()


def _weights_model(weights: np.ndarray) -> onnx.ModelProto:
    """y = x + w, w an initializer held in the proto (a fresh proto each call: writing moves data out of it)."""
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [weights.size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [weights.size])],
                              initializer=[numpy_helper.from_array(weights, "w")])
    return _model(graph)


def test_a_graph_past_the_limit_is_rewritten_into_one_data_file_beside_it(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/models.md: a graph whose weights pass the limit is written as `model.onnx` plus one `model.onnx.data`
    beside it. Written again (a rerun), the data file holds the weights once, not appended to the first copy; a
    graph within the limit is one file again and leaves no stale data file. The limit is a graph's initializer
    bytes as protobuf counts them: a graph of exactly that many stays one file."""
    import pimoe_export.interface as interface

    weights = np.arange(1024, dtype=np.float32)  # 4 KiB
    path, data = tmp_path / "m.onnx", tmp_path / "m.onnx.data"
    held = sum(t.ByteSize() for t in _weights_model(weights).graph.initializer)
    for limit, external in ((held - 1, True), (held - 1, True), (held, False)):
        monkeypatch.setattr(interface, "EXTERNAL_DATA_BYTES", limit)
        assert interface.write_onnx(_weights_model(weights), path) == path
        assert external_data_files(onnx.load(str(path), load_external_data=False)) == (["m.onnx.data"] if external
                                                                                      else [])
        assert data.exists() == external
        if external:
            assert data.read_bytes() == weights.tobytes()
        assert np.array_equal(numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0]), weights)
