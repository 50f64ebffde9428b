"""The "format" field every JSON file pimoe-export reads back is identified by (a checkpoint's config.json, a unit's
manifest.json, an output folder's ownership record): a file without it is not that file, however the rest looks."""

from __future__ import annotations

import json

import pytest

from pimoe_export._files import OWNERSHIP_FILE, OWNERSHIP_FORMAT, OutputDir, read_format_json
from pimoe_export.errors import ArtifactError, OutputError
from pimoe_export.model import create_from_preset
from pimoe_export.model.io import load_pretrained


def test_a_json_file_without_its_format_field_is_refused(tmp_path) -> None:
    path = tmp_path / "thing.json"
    path.write_text(json.dumps({"entries": {}}))
    with pytest.raises(ArtifactError, match=r"expected format 'x/1', found None; fix it"):
        read_format_json(path, "x/1", "thing", "fix it")
    path.write_text(json.dumps({"format": "x/1", "entries": {}}))
    assert read_format_json(path, "x/1", "thing", "fix it") == {"format": "x/1", "entries": {}}


def test_a_checkpoint_config_without_its_format_is_not_loaded(tmp_path) -> None:
    create_from_preset("tiny").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "format" in config
    del config["format"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"expected format .* found None"):
        load_pretrained(tmp_path)


def test_an_ownership_record_without_its_format_owns_nothing(tmp_path) -> None:
    """A record that lost its format line (or was written by something else) cannot make pimoe-export replace a file:
    the user's file it names is refused, as with no record at all; with the format, the same record owns it."""
    (tmp_path / "report.md").write_text("the user's own")
    record = {"entries": {"report.md": {"command": "check", "time": "2026-12-07T00:00:00Z"}}}
    (tmp_path / OWNERSHIP_FILE).write_text(json.dumps(record))
    with pytest.raises(OutputError, match=r"report\.md exists and was not written by pimoe-export"):
        OutputDir(tmp_path).claim("report.md")
    assert (tmp_path / "report.md").read_text() == "the user's own"
    (tmp_path / OWNERSHIP_FILE).write_text(json.dumps({"format": OWNERSHIP_FORMAT, **record}))
    assert OutputDir(tmp_path).claim("report.md") == tmp_path / "report.md"


@pytest.mark.parametrize("name", ["model.onnx", "model.int8.onnx", "mixtral.onnx"])
def test_a_graphs_external_data_file_is_its_file_name_plus_data(name) -> None:
    """README: a graph past 2 GB is `mixtral.onnx` + `mixtral.onnx.data`: the whole file name, then `.data` (two
    graphs in one folder never share one)."""
    from pimoe_export.interface import external_data_name

    assert external_data_name(name) == f"{name}.data"
