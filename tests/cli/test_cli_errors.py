"""Every failure a user can fix ends with exit 2 (3: the machine lacks something) and one message naming the problem
and the fix, through one mapping (errors.user_message / exit_code): the package's typed errors, OSError, and the
exceptions of the libraries that read the user's files. Cases: the hostile-input run of issue 24's "Also"."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pimoe_export.cli import main
from pimoe_export.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, exit_code, user_message


@pytest.fixture(scope="module")
def files(exported_layer, tmp_path_factory):
    """A tiny checkpoint and its export, and hostile variants of both."""
    model, onnx_path = exported_layer("tiny", 0)
    root = tmp_path_factory.mktemp("hostile")
    model.save_pretrained(root / "tiny")
    shutil.copy(onnx_path, root / "tiny.onnx")
    config = json.loads((root / "tiny" / "config.json").read_text())
    for key in ("config", "architecture"):
        shutil.copytree(root / "tiny", root / f"no-{key}")
        (root / f"no-{key}" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != key}))
    data = onnx_path.read_bytes()
    (root / "truncated.onnx").write_bytes(data[: len(data) // 2])
    np.save(root / "overflow.npy", np.full((64, 16), 3e38, np.float32))
    proto = onnx.load(str(onnx_path))
    route = next(n for n in proto.graph.node if n.op_type == "PiMoERoute")
    bias = next(t for t in proto.graph.initializer if t.name == route.input[1])
    bias.CopyFrom(numpy_helper.from_array(np.asarray(0.0, np.float32), bias.name))  # a scalar, not [E]
    onnx.save(proto, str(root / "scalar-bias.onnx"))
    return root


CASES = {
    "a checkpoint config without its config object": (["info", "no-config"], "lacks 'config'"),
    "a checkpoint config without its architecture": (["info", "no-architecture"], "lacks 'architecture'"),
    "quantize --onnx on a truncated ONNX": (["quantize", "tiny", "-o", "q.int8.onnx", "--onnx", "truncated.onnx"],
                                            "not a readable ONNX model"),
    "check --onnx on a graph whose selection_bias is a scalar": (
        ["check", "tiny", "--onnx", "scalar-bias.onnx", "-o", "report", "--no-plots"], "selection_bias"),
    "calibration data that overflows the model": (["quantize", "tiny", "-o", "o.int8.onnx", "--calib",
                                                   "overflow.npy"], "NaN or Inf"),
    "build --sm with an unknown target": (["build", "tiny.onnx", "-o", "unit", "--sm", "SM999"],
                                          "unknown compute capability 'SM999'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_caused_failures_end_with_exit_2_and_one_message(files, case, capsys, monkeypatch) -> None:
    argv, expected = CASES[case]
    if argv[0] == "build":
        from pimoe_export.errors import BackendUnavailableError
        from pimoe_export.native.tensorrt_loader import import_tensorrt

        try:
            import_tensorrt("rtx")
        except BackendUnavailableError as exc:
            pytest.skip(f"TensorRT-RTX is not installed: {exc}")
    monkeypatch.chdir(files)
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("pimoe-export")]
    assert len(lines) == 1 and lines[0].startswith(f"pimoe-export {argv[0]}: error: ") and expected in lines[0], err
    assert "Traceback" not in err and "internal error" not in err


def test_library_exceptions_about_inputs_map_to_bad_input_and_bugs_stay_internal(monkeypatch, capsys) -> None:
    from google.protobuf.message import DecodeError
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    import pimoe_export.cli.info_command as info

    for error in (DecodeError("truncated message"), InvalidArgument("bad input shape"),
                  json.JSONDecodeError("Expecting value", "x", 0), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad")):
        assert exit_code(error) == EXIT_BAD_INPUT and error.__class__.__name__ in user_message(error)
    for bug in (KeyError("config"), TypeError("unsupported operand"), ValueError("math domain error")):
        assert exit_code(bug) == EXIT_INTERNAL and user_message(bug) is None

    def decode_fails(args):
        raise DecodeError("Error parsing message")
    monkeypatch.setattr(info, "run", decode_fails)
    assert main(["info", "anything"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pimoe-export info: error: google.protobuf refused an input") and \
        "DecodeError: Error parsing message" in err[0]

    def bug(args):
        raise KeyError("config")
    monkeypatch.setattr(info, "run", bug)
    assert main(["info", "anything"]) == EXIT_INTERNAL
    assert "internal error (KeyError" in capsys.readouterr().err


def test_check_refuses_a_decoder_unit_against_a_model_of_another_vocabulary(decoder_cases, tmp_path, monkeypatch,
                                                                          capsys) -> None:
    """A decoder unit checked against a model whose vocabulary differs from the unit's (another model) is refused up
    front, exit 2, naming both sizes; no report is written."""
    import pimoe_export.hf.importers as importers

    decoder_case = decoder_cases("mixtral")
    model = decoder_case.hf_model()
    vocab = model.config.vocab_size
    model.config.vocab_size = vocab + 7
    monkeypatch.setattr(importers, "load_source", lambda directory: SimpleNamespace(module=model, evaluation=None))
    argv = ["check", str(decoder_case.hf_dir), "--unit", str(decoder_case.unit), "-o", str(tmp_path / "report")]
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"is a decoder unit with a vocabulary of {vocab}, but {decoder_case.hf_dir} has a vocabulary of " \
           f"{vocab + 7}; check the unit against the model it was exported from" in err
    assert not (tmp_path / "report").exists()
