"""Exit codes beyond 0 and 2, from real commands: 3 when this machine lacks a piece (an op library, TensorRT), an OS
error in the middle of a command (a path that is a directory), interrupts (Ctrl-C, SIGTERM) and bugs; each ends
with one line on stderr naming the command, the problem and the fix (README "Exit codes")."""

from __future__ import annotations

import json
import shutil
import signal

import pytest

import pimoe_export.cli.info_command as info_command
from pimoe_export.cli import main
from pimoe_export.errors import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EXIT_INTERNAL, EXIT_INTERRUPTED


def one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"pimoe-export {command}: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def tiny(exported_layer, tmp_path_factory):
    model, onnx_path = exported_layer("tiny", 0)
    root = tmp_path_factory.mktemp("exit-codes")
    model.save_pretrained(root / "tiny")
    shutil.copy(onnx_path, root / "tiny.onnx")
    return root


# ------------------------------------------------------------------------------------------ 3: the machine
def test_a_missing_op_library_exits_3_naming_the_variable(tiny, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PIMOE_ORT_LIBRARY", str(tmp_path / "absent.so"))
    assert main(["package", str(tiny / "tiny.onnx"), "-o", str(tmp_path / "unit")]) == EXIT_ENVIRONMENT
    line = one_error_line(capsys.readouterr().err, "package")
    assert line == (f"pimoe-export package: error: PIMOE_ORT_LIBRARY={tmp_path / 'absent.so'} does not exist; point "
                    "it at a built libpimoe_ort.so or unset it")
    assert not (tmp_path / "unit" / "manifest.json").exists()


def test_a_tensorrt_unit_without_tensorrt_exits_3(tiny, tmp_path, monkeypatch, capsys) -> None:
    """A verified TensorRT unit on a machine without the tensorrt module: the machine's problem, not the unit's."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("full TensorRT is installed here")
    from pimoe_export.artifacts.manifest import REQUIRED_ROLES, Artifact, read_manifest
    from pimoe_export.build.units import package_ort

    unit = tmp_path / "trt"
    package_ort(tiny / "tiny.onnx", unit)
    (unit / "model.engine").write_bytes(b"\0" * 64)
    shutil.copyfile(unit / "libpimoe_ort.so", unit / "libpimoe_trt_plugins.so")
    manifest = read_manifest(unit)
    manifest.backend = "tensorrt"
    files = {"onnx": "model.onnx", "engine": "model.engine", "plugin_library": "libpimoe_trt_plugins.so"}
    manifest.artifacts = [Artifact.of(role, unit / files[role]) for role in REQUIRED_ROLES["tensorrt"]]
    manifest.write(unit)
    assert main(["check", str(tiny / "tiny"), "--unit", str(unit), "--no-plots"]) == EXIT_ENVIRONMENT
    line = one_error_line(capsys.readouterr().err, "check")
    assert "the TensorRT module 'tensorrt' is not importable here" in line and "install" in line
    # the same unit, tampered: integrity is checked first, so it is the unit's problem (2) whatever the machine
    (unit / "model.engine").write_bytes(b"\1" * 64)
    assert main(["check", str(tiny / "tiny"), "--unit", str(unit), "--no-plots"]) == EXIT_BAD_INPUT
    assert "model.engine does not match its manifest sha256" in one_error_line(capsys.readouterr().err, "check")


def test_serve_without_pytriton_exits_3_with_the_install_hint_before_reading_a_unit(tmp_path, monkeypatch,
                                                                                    capsys) -> None:
    """README: exit 3 when this machine lacks something; `serve` needs the serve extra (nvidia-pytriton). Without it,
    serve says so before it looks at the unit: a unit that does not exist (exit 2 otherwise) is not even read."""
    import sys

    monkeypatch.setitem(sys.modules, "pytriton", None)  # `import pytriton...` raises ImportError
    monkeypatch.setitem(sys.modules, "pytriton.triton", None)
    assert main(["serve", str(tmp_path / "not-a-unit")]) == EXIT_ENVIRONMENT
    captured = capsys.readouterr()
    line = one_error_line(captured.err, "serve")
    assert "nvidia-pytriton" in line and "install the serve extra" in line
    assert "manifest" not in captured.err and "not-a-unit" not in captured.err and captured.out == ""


@pytest.mark.parametrize(("error", "code"), [("BackendUnavailableError", 3), ("PluginLoadError", 3),
                                             ("ArtifactError", 2), ("ParityError", 1)])
def test_each_error_type_raised_inside_a_command_gives_its_code(monkeypatch, capsys, error, code) -> None:
    import pimoe_export.errors as errors

    def run(args):
        raise getattr(errors, error)("the problem; the fix")
    monkeypatch.setattr(info_command, "run", run)
    assert main(["info", "anything"]) == code
    assert one_error_line(capsys.readouterr().err, "info") == "pimoe-export info: error: the problem; the fix"


# ------------------------------------------------------------------------------------------ 2: OS errors
def test_an_os_error_inside_a_command_exits_2_naming_the_path(tmp_path, capsys) -> None:
    """create --force over a folder that holds a directory named config.json: the checkpoint writer hits
    IsADirectoryError after the weights are written; one line names the path."""
    out = tmp_path / "ckpt"
    (out / "config.json").mkdir(parents=True)
    assert main(["create", "--preset", "tiny", "-o", str(out), "--force"]) == EXIT_BAD_INPUT
    line = one_error_line(capsys.readouterr().err, "create")
    assert line == (f"pimoe-export create: error: cannot access {out / 'config.json'}: Is a directory; check the path "
                    "and its permissions")


def test_an_os_error_without_a_file_name(monkeypatch, capsys) -> None:
    def run(args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(info_command, "run", run)
    assert main(["info", "anything"]) == EXIT_BAD_INPUT
    assert one_error_line(capsys.readouterr().err, "info") == \
        "pimoe-export info: error: cannot access: No space left on device; check the path and its permissions"


# ------------------------------------------------------------------------------------------ 70, 130, --debug
def test_a_bug_exits_70_and_debug_shows_the_traceback(monkeypatch, capsys) -> None:
    def run(args):
        return {}["config"]
    monkeypatch.setattr(info_command, "run", run)
    assert main(["info", "anything"]) == EXIT_INTERNAL
    line = one_error_line(capsys.readouterr().err, "info")
    assert line == ("pimoe-export info: internal error (KeyError: 'config'); this is a bug in pimoe-export: rerun with "
                    "--debug for the traceback and report it")
    assert main(["--debug", "info", "anything"]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and 'return {}["config"]' in err
    assert err.strip().splitlines()[-1].startswith("pimoe-export info: internal error (KeyError")


def test_debug_shows_the_traceback_of_a_users_error_too(tmp_path, capsys) -> None:
    assert main(["--debug", "info", str(tmp_path / "missing")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ArtifactError" in err
    assert main(["info", str(tmp_path / "missing")]) == EXIT_BAD_INPUT
    assert "Traceback" not in capsys.readouterr().err


def test_ctrl_c_and_sigterm_exit_130(monkeypatch, capsys) -> None:
    import os

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(info_command, "run", interrupted)
    assert main(["info", "anything"]) == EXIT_INTERRUPTED
    assert one_error_line(capsys.readouterr().err, "info") == "pimoe-export info: interrupted"

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pause()  # not reached: the handler raises
        return 0
    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(info_command, "run", terminated)
    try:
        assert main(["info", "anything"]) == EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert one_error_line(capsys.readouterr().err, "info") == "pimoe-export info: interrupted"


def test_the_exit_code_of_a_command_is_returned_as_it_is(monkeypatch, capsys) -> None:
    monkeypatch.setattr(info_command, "run", lambda args: 1)
    assert main(["info", "anything"]) == 1
    monkeypatch.setattr(info_command, "run", lambda args: True)  # an int-like result
    assert main(["info", "anything"]) == 1
    assert capsys.readouterr().err == ""


def test_inspect_exits_2_on_an_invalid_unit_and_prints_json(tiny, tmp_path, capsys) -> None:
    from pimoe_export.build.units import package_ort

    unit = tmp_path / "unit"
    package_ort(tiny / "tiny.onnx", unit)
    assert main(["inspect", str(unit), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["verification"].startswith("verified") and data["backend"] == "onnxruntime"
    (unit / "libpimoe_ort.so").write_bytes(b"x")
    assert main(["inspect", str(unit), "--json"]) == EXIT_BAD_INPUT
    data = json.loads(capsys.readouterr().out)
    assert data["verification"].startswith("NOT VALID") and "libpimoe_ort.so" in data["verification"]
