"""ONNX Runtime sessions as runtime.ort creates them: from a file or from bytes, with the intra-op thread count asked
for, and ONNX Runtime's refusals as one clear error (its first line kept); the oldest ONNX Runtime the op library
can register with; the dtype an engine takes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pimoe_export.build.units import package_ort
from pimoe_export.errors import ArtifactError, PluginLoadError
from pimoe_export.runtime.engine import Engine
from pimoe_export.runtime.ort import check_onnxruntime_version, create_session


def session_or_skip(*args, **kwargs):
    try:
        return create_session(*args, **kwargs)
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")


def test_a_session_from_a_file_or_from_bytes_computes_the_same(exported_layer) -> None:
    _, path = exported_layer("tiny", 0)
    x = np.random.default_rng(0).standard_normal((2, 3, 16)).astype(np.float32)
    from_file = session_or_skip(path).run(None, {"hidden_states": x})
    from_bytes = session_or_skip(path.read_bytes()).run(None, {"hidden_states": x})
    for a, b in zip(from_file, from_bytes, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("threads", [1, 3])
def test_the_thread_count_reaches_the_session(exported_layer, threads) -> None:
    _, path = exported_layer("tiny", 0)
    session = session_or_skip(path, threads=threads)
    assert session.get_session_options().intra_op_num_threads == threads
    assert session_or_skip(path).get_session_options().intra_op_num_threads == 0  # ONNX Runtime's choice
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_a_graph_onnx_runtime_refuses_is_one_clear_error(tmp_path) -> None:
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "bad.onnx"))
    for given, what in ((tmp_path / "bad.onnx", str(tmp_path / "bad.onnx")), (model.SerializeToString(), "the model")):
        with pytest.raises(ArtifactError) as info:
            session_or_skip(given)
        message = str(info.value)
        assert message.startswith(f"ONNX Runtime cannot load {what}: ") and "NoSuchOp" in message
        assert message.endswith(". Check the graph with `pimoe-export check` or re-export it")
        assert "\n" not in message
    with pytest.raises(ArtifactError, match=r"missing\.onnx does not exist; write it with `pimoe-export export`"):
        session_or_skip(tmp_path / "missing.onnx")


@pytest.mark.parametrize("version", ["1.20.1", "1.9.0", "0.99"])
def test_an_onnxruntime_older_than_1_21_is_refused_with_the_fix(version) -> None:
    with pytest.raises(PluginLoadError) as info:
        check_onnxruntime_version(version)
    assert str(info.value) == (
        f"libpimoe_ort needs onnxruntime >= 1.21 (ONNX Runtime C API 21); this environment has onnxruntime {version}, "
        "which would register none of the pimoe ops: pip install 'onnxruntime>=1.21' (or onnxruntime-gpu >= 1.21; "
        "Triton containers up to 25.03 ship 1.20.1)")
    for ok in ("1.21.0", "1.21", "1.32.1", "2.0.0"):
        check_onnxruntime_version(ok)


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", np.float32), ("fp16", np.float16)])
def test_an_engine_takes_its_graphs_input_dtype(exported_layer, tmp_path, precision, dtype) -> None:
    _, path = exported_layer("tiny", 0, precision)
    try:
        package_ort(path, tmp_path / "unit")
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")
    with Engine.load(tmp_path / "unit") as engine:
        assert engine.input_dtype == np.dtype(dtype) and engine.unit_dir == tmp_path / "unit"
        y = engine.run(np.zeros((1, 2, 16), dtype))
        assert y.dtype == dtype
