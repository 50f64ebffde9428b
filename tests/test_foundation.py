"""The foundation every package stands on, at its edges: the one error mapping of the command line (which failure is
which exit code and message), files in (hashes, JSON limits, containment) and files out (ownership).

Known answers only: hashlib for hashes, hand-written JSON at exactly the depth and size limits, directory trees
built on purpose (symlinks inside and outside, '..', absolute names)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest

from pimoe_export._files import (
    MAX_JSON_DEPTH,
    OWNERSHIP_FILE,
    OutputDir,
    output_file,
    output_onnx,
    read_format_json,
    read_json,
    resolve_inside,
    sha256_file,
)
from pimoe_export.errors import (
    EXIT_BAD_INPUT,
    EXIT_ENVIRONMENT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARITY_FAILED,
    ArtifactError,
    BackendUnavailableError,
    OutputError,
    ParityError,
    PiMoEConfigError,
    PiMoEError,
    PiMoEExportError,
    PiMoEInputError,
    PluginLoadError,
    RunError,
    exit_code,
    refused_input,
    user_message,
)


# ------------------------------------------------------------------------------------------ exit codes
def test_the_documented_exit_codes() -> None:
    """README "Exit codes": 0 ok, 1 parity failed, 2 bad input, 3 environment, 70 internal, 130 interrupted."""
    assert (EXIT_OK, EXIT_PARITY_FAILED, EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EXIT_INTERNAL, EXIT_INTERRUPTED) == \
        (0, 1, 2, 3, 70, 130)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for code in (0, 1, 2, 3, 70, 130):
        assert f"| {code} |" in readme or f"`{code}`" in readme, code


@pytest.mark.parametrize(("error", "code"), [
    (KeyboardInterrupt(), EXIT_INTERRUPTED),
    (ParityError("the check failed"), EXIT_PARITY_FAILED),
    (BackendUnavailableError("no TensorRT"), EXIT_ENVIRONMENT),
    (PluginLoadError("libpimoe_ort.so was not found"), EXIT_ENVIRONMENT),
    (ArtifactError("corrupt"), EXIT_BAD_INPUT),
    (OutputError("exists"), EXIT_BAD_INPUT),
    (RunError("refused"), EXIT_BAD_INPUT),
    (PiMoEInputError("shape"), EXIT_BAD_INPUT),
    (PiMoEConfigError("top_k", "too big"), EXIT_BAD_INPUT),
    (PiMoEExportError("cannot export"), EXIT_BAD_INPUT),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "x.onnx"), EXIT_BAD_INPUT),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), EXIT_BAD_INPUT),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "out/config.json"), EXIT_BAD_INPUT),
    (OSError(errno.ENOSPC, "No space left on device"), EXIT_BAD_INPUT),
    (KeyError("config"), EXIT_INTERNAL),
    (RuntimeError("something else"), EXIT_INTERNAL),
    (ValueError("math domain error"), EXIT_INTERNAL),
    (AssertionError(), EXIT_INTERNAL),
])
def test_every_kind_of_failure_has_its_exit_code(error, code) -> None:
    assert exit_code(error) == code


def test_environment_errors_are_not_bad_input_although_they_are_package_errors() -> None:
    """PluginLoadError and BackendUnavailableError are PiMoEErrors too: the machine's problem (3) wins over the
    generic "the user's to fix" (2); a failed parity check is neither (1)."""
    for error in (PluginLoadError("x"), BackendUnavailableError("x"), ParityError("x")):
        assert isinstance(error, PiMoEError)
        assert exit_code(error) != EXIT_BAD_INPUT


def _library_error(module: str, message: str = "bad") -> Exception:
    cls = type("LibraryError", (Exception,), {"__module__": module})
    return cls(message)


@pytest.mark.parametrize(("module", "refused", "library"), [
    ("onnx", True, "onnx"),
    ("onnx.checker", True, "onnx"),
    ("onnxruntime", True, "onnxruntime"),
    ("onnxruntime.capi.onnxruntime_pybind11_state", True, "onnxruntime"),
    ("google.protobuf.message", True, "google.protobuf"),
    ("safetensors", True, "safetensors"),
    ("json.decoder", True, "json"),
    ("jsonschema.exceptions", False, None),
    ("onnxscript.ir", False, None),
    ("google", False, None),
    ("safetensors_extra", False, None),
    ("torch", False, None),
    ("builtins", False, None),
])
def test_which_libraries_refuse_the_users_input(module, refused, library) -> None:
    """A library is matched by its module or a submodule of it, never by a shared prefix of the name."""
    error = _library_error(module, "first line\nsecond line")
    assert refused_input(error) is refused
    message = user_message(error)
    if refused:
        assert exit_code(error) == EXIT_BAD_INPUT
        assert message == (f"{library} refused an input of this command (LibraryError: first line); check the files "
                           "and data you passed (--debug shows where)")
    else:
        assert exit_code(error) == EXIT_INTERNAL and message is None


def test_a_library_error_without_a_message_and_an_undecodable_file() -> None:
    assert "(LibraryError: no detail)" in user_message(_library_error("onnx", "  \n "))
    undecodable = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    assert refused_input(undecodable) and exit_code(undecodable) == EXIT_BAD_INPUT
    assert user_message(undecodable).startswith("a text decoder refused an input of this command "
                                                "(UnicodeDecodeError: ")


@pytest.mark.parametrize(("error", "message"), [
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "data/x.npz"),
     "cannot access data/x.npz: No such file or directory; check the path and its permissions"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "out/config.json"),
     "cannot access out/config.json: Is a directory; check the path and its permissions"),
    (OSError(errno.ENOSPC, "No space left on device"),
     "cannot access: No space left on device; check the path and its permissions"),
    (OSError("a message only"), "cannot access: a message only; check the path and its permissions"),
])
def test_os_errors_name_the_file_and_what_happened(error, message) -> None:
    assert user_message(error) == message


def test_package_errors_are_shown_as_they_are_and_bugs_are_not_shown() -> None:
    assert user_message(ArtifactError("unit/model.onnx is corrupt; rebuild it")) == \
        "unit/model.onnx is corrupt; rebuild it"
    assert str(PiMoEConfigError("top_k", "must be <= 4")) == "PiMoEConfig.top_k: must be <= 4"
    assert PiMoEConfigError("top_k", "x").field == "top_k"
    assert user_message(KeyError("x")) is None and user_message(TypeError("x")) is None


# ------------------------------------------------------------------------------------------ files in
@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 12, 13])
def test_sha256_file_is_hashlibs_across_chunk_boundaries(tmp_path, size) -> None:
    data = os.urandom(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path, chunk=4) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_json_nesting_is_refused_one_level_past_the_limit(tmp_path) -> None:
    path = tmp_path / "x.json"
    path.write_text(_nested(MAX_JSON_DEPTH))
    assert read_json(path, "manifest", "rebuild it") is not None
    path.write_text('{"a": ' + _nested(MAX_JSON_DEPTH - 1) + "}")
    assert read_json(path, "manifest", "rebuild it") == {"a": json.loads(_nested(MAX_JSON_DEPTH - 1))}
    path.write_text(_nested(MAX_JSON_DEPTH + 1))
    with pytest.raises(ArtifactError, match=f"nests deeper than {MAX_JSON_DEPTH} levels; the manifest is corrupt, "
                                            "rebuild it"):
        read_json(path, "manifest", "rebuild it")


def test_brackets_inside_strings_do_not_count_as_nesting(tmp_path) -> None:
    text = json.dumps({"s": "[" * 200 + "{" * 200, "t": 'a "quoted" \\ [[[ ' + "]" * 50, "u": ["\\\"[[["]})
    path = tmp_path / "x.json"
    path.write_text(text)
    assert read_json(path, "manifest", "fix") == json.loads(text)


def test_json_size_limit_is_exact(tmp_path) -> None:
    path = tmp_path / "x.json"
    text = json.dumps({"pad": "x" * 100})
    path.write_text(text)
    assert read_json(path, "checkpoint", "fix", max_bytes=len(text))["pad"] == "x" * 100
    with pytest.raises(ArtifactError, match=rf"is {len(text)} bytes, more than a checkpoint can be "
                                            rf"\({len(text) - 1}\); fix"):
        read_json(path, "checkpoint", "fix", max_bytes=len(text) - 1)


@pytest.mark.parametrize(("content", "fragment"), [
    (b"\xff\xfe{}", "is not UTF-8 text; the manifest is corrupt, rebuild it"),
    (b'{"a": 1,}', "is not valid JSON"),
    (b"", "is not valid JSON"),
])
def test_unreadable_json_is_an_artifact_error(tmp_path, content, fragment) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(ArtifactError, match=fragment):
        read_json(path, "manifest", "rebuild it")


def test_a_json_file_that_cannot_be_read_is_an_artifact_error(tmp_path) -> None:
    with pytest.raises(ArtifactError, match=r"cannot read .*missing\.json \(No such file or directory\); fix"):
        read_json(tmp_path / "missing.json", "manifest", "fix")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(ArtifactError, match="cannot read"):
        read_json(tmp_path / "dir.json", "manifest", "fix")


def test_format_and_fields_of_a_json_file(tmp_path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"format": "thing/1", "n": 3, "s": "a"}))
    assert read_format_json(path, "thing/1", "thing", "fix", {"n": int, "s": str})["n"] == 3
    with pytest.raises(ArtifactError, match=r"expected format 'thing/2', found 'thing/1'; fix"):
        read_format_json(path, "thing/2", "thing", "fix")
    with pytest.raises(ArtifactError, match=r"this thing lacks 's' \(int\), 'm' \(str\) or holds another type there"):
        read_format_json(path, "thing/1", "thing", "fix", {"n": int, "s": int, "m": str})
    path.write_text("[1, 2]")
    with pytest.raises(ArtifactError, match=r"expected format 'thing/1', found 'list'"):
        read_format_json(path, "thing/1", "thing", "fix")


@pytest.fixture
def tree(tmp_path) -> Path:
    """unit/{a.bin, sub/b.bin, inner -> a.bin, outer -> ../secret.bin, up -> .., folder/, twin -> ../unit2/c.bin},
    secret.bin, unit2/c.bin (a sibling whose name starts with the unit's)."""
    unit = tmp_path / "unit"
    (unit / "sub").mkdir(parents=True)
    (unit / "folder").mkdir()
    (unit / "a.bin").write_bytes(b"a")
    (unit / "sub" / "b.bin").write_bytes(b"b")
    (tmp_path / "secret.bin").write_bytes(b"s")
    (tmp_path / "unit2").mkdir()
    (tmp_path / "unit2" / "c.bin").write_bytes(b"c")
    (unit / "inner").symlink_to("a.bin")
    (unit / "outer").symlink_to("../secret.bin")
    (unit / "up").symlink_to("..")
    (unit / "twin").symlink_to("../unit2/c.bin")
    return unit


def test_names_inside_the_unit_resolve(tree) -> None:
    assert resolve_inside(tree, "a.bin", "x") == (tree / "a.bin").resolve()
    assert resolve_inside(tree, "sub/b.bin", "x") == (tree / "sub" / "b.bin").resolve()
    assert resolve_inside(tree, "sub/../a.bin", "x") == (tree / "a.bin").resolve()
    assert resolve_inside(tree, "inner", "x") == (tree / "a.bin").resolve()  # a symlink that stays inside


@pytest.mark.parametrize(("name", "fragment"), [
    ("../secret.bin", "outside the unit"),
    ("outer", "outside the unit"),
    ("up/secret.bin", "outside the unit"),
    ("../unit2/c.bin", "outside the unit"),  # a sibling folder is outside, whatever its name starts with
    ("twin", "outside the unit"),
    (".", "outside the unit"),
    ("sub/..", "outside the unit"),
    ("folder", "is missing"),
    ("nothing.bin", "is missing"),
    ("", "has no usable file name"),
    ("   ", "has no usable file name"),
    ("a\x00.bin", "has no usable file name"),
    (None, "has no usable file name"),
    (7, "has no usable file name"),
])
def test_names_that_leave_the_unit_or_name_no_file_are_refused(tree, name, fragment) -> None:
    with pytest.raises(ArtifactError, match=fragment) as info:
        resolve_inside(tree, name, "manifest artefact 'onnx'", "rebuild it")
    assert "manifest artefact 'onnx'" in str(info.value) or "nothing.bin" in str(info.value) or \
        "folder" in str(info.value)
    assert str(info.value).endswith(": rebuild it")


def test_an_absolute_name_is_refused_even_inside_the_unit(tree) -> None:
    with pytest.raises(ArtifactError, match="names the absolute path"):
        resolve_inside(tree, str((tree / "a.bin").resolve()), "x")


def test_a_refusal_names_what_the_root_is(tree) -> None:
    """A unit by default; a model directory (the Hugging Face importer's) when the caller says so."""
    for name, said in (("../secret.bin", "outside the model directory; a model directory may only name files inside "
                                         "itself"),
                       (str((tree / "a.bin").resolve()), "; a model directory may only name files inside itself")):
        with pytest.raises(ArtifactError, match=said):
            resolve_inside(tree, name, "the weights", holder="model directory")
        with pytest.raises(ArtifactError, match=said.replace("model directory", "unit")):
            resolve_inside(tree, name, "the weights")


def test_a_root_that_does_not_exist(tmp_path) -> None:
    with pytest.raises(ArtifactError, match="cannot be read"):
        resolve_inside(tmp_path / "nothing", "a.bin", "x")


# ------------------------------------------------------------------------------------------ files out
def test_outputs_written_by_us_are_replaced_and_the_users_are_not(tmp_path) -> None:
    out = OutputDir(tmp_path / "out", command="export")
    target = out.claim("model.onnx")
    target.write_text("ours")
    assert json.loads((tmp_path / "out" / OWNERSHIP_FILE).read_text())["entries"]["model.onnx"]["command"] == "export"
    assert OutputDir(tmp_path / "out").claim("model.onnx") == target  # ours: replaced without --force
    (tmp_path / "out" / "notes.txt").write_text("theirs")
    with pytest.raises(OutputError, match=r"notes\.txt exists and was not written by pimoe-export; it is left alone. "
                                          r"Pass --force"):
        OutputDir(tmp_path / "out").claim("notes.txt")
    with pytest.raises(OutputError, match=r"notes\.txt exists"):
        OutputDir(tmp_path / "out").refuse_foreign(["model.onnx", "notes.txt"])
    OutputDir(tmp_path / "out").refuse_foreign(["model.onnx", "absent.txt"])
    OutputDir(tmp_path / "out", force=True).refuse_foreign(["notes.txt"])
    assert OutputDir(tmp_path / "out", force=True).claim("notes.txt") == tmp_path / "out" / "notes.txt"
    record = json.loads((tmp_path / "out" / OWNERSHIP_FILE).read_text())
    assert record["format"] == "pimoe-export-outputs/1" and set(record["entries"]) == {"model.onnx", "notes.txt"}


def test_a_symlink_is_never_written_through(tmp_path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "link").symlink_to(victim)
    with pytest.raises(OutputError, match="exists and was not written by pimoe-export"):
        OutputDir(out_dir).claim("link")
    target = OutputDir(out_dir, force=True).claim("link")
    assert not target.is_symlink() and not target.exists()
    target.write_text("new")
    assert victim.read_text() == "keep"
    (out_dir / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="dangling exists"):
        OutputDir(out_dir).claim("dangling")


def test_an_unreadable_ownership_record_owns_nothing(tmp_path) -> None:
    out = OutputDir(tmp_path / "out")
    out.claim("model.onnx").write_text("x")
    (tmp_path / "out" / OWNERSHIP_FILE).write_text("{broken")
    with pytest.raises(OutputError, match=r"model\.onnx exists and was not written"):
        OutputDir(tmp_path / "out").claim("model.onnx")
    (tmp_path / "out" / OWNERSHIP_FILE).write_text(json.dumps({"format": "pimoe-export-outputs/1", "entries": []}))
    with pytest.raises(OutputError, match=r"model\.onnx exists and was not written"):
        OutputDir(tmp_path / "out").claim("model.onnx")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", OWNERSHIP_FILE])
def test_entry_names_are_single_names(tmp_path, name) -> None:
    with pytest.raises(OutputError, match="is not an entry name"):
        OutputDir(tmp_path).claim(name)


def test_output_directories_that_cannot_be_one(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        OutputDir(tmp_path / "file")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="is a dangling symlink"):
        OutputDir(tmp_path / "dangling")
    with pytest.raises(OutputError, match="cannot create the output directory"):
        OutputDir(tmp_path / "file" / "sub")


def test_a_claimed_sub_folder_governs_its_own_entries(tmp_path) -> None:
    out = OutputDir(tmp_path / "out", command="triton")
    (tmp_path / "out" / "repo").write_text("a stale file where the folder goes")
    with pytest.raises(OutputError, match="repo exists"):
        out.claim_dir("repo")
    sub = OutputDir(tmp_path / "out", force=True, command="triton").claim_dir("repo")
    assert sub.root.is_dir() and sub.force and sub.command == "triton"


def test_a_single_output_file(tmp_path) -> None:
    path = output_file(tmp_path / "x.onnx", command="export")
    assert path == tmp_path / "x.onnx"
    path.write_text("ours")
    assert output_file(tmp_path / "x.onnx") == path
    (tmp_path / "y.onnx").write_text("theirs")
    with pytest.raises(OutputError, match=r"y\.onnx exists"):
        output_file(tmp_path / "y.onnx")
    with pytest.raises(OutputError, match="is not a file name"):
        output_file(tmp_path / "..")


def test_an_onnx_output_claims_its_external_data_file_too(tmp_path) -> None:
    """README: a graph past 2 GB is written as `mixtral.onnx` + `mixtral.onnx.data`, and a command never replaces a
    file it did not write unless --force: the `.data` file beside an ONNX output is claimed with it, so a user's
    `x.onnx.data` is refused before anything is written."""
    path = output_onnx(tmp_path / "m.onnx", command="export")
    assert path == tmp_path / "m.onnx"
    record = OutputDir(tmp_path)
    assert record.owns("m.onnx") and record.owns("m.onnx.data")
    assert record.owned["m.onnx.data"]["command"] == "export"
    (tmp_path / "x.onnx.data").write_text("the user's own")
    with pytest.raises(OutputError, match=r"x\.onnx\.data exists and was not written by pimoe-export; it is left "
                                          r"alone\. Pass --force"):
        output_onnx(tmp_path / "x.onnx")
    assert (tmp_path / "x.onnx.data").read_text() == "the user's own" and not (tmp_path / "x.onnx").exists()
    assert output_onnx(tmp_path / "x.onnx", force=True) == tmp_path / "x.onnx"
    assert OutputDir(tmp_path).owns("x.onnx.data")
