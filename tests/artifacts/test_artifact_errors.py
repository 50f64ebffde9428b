"""Refusals of the unit writers that name what is wrong and the fix (the project's bad-input policy): a missing
source file by its path, a standard-op graph with the command that writes a custom-op one."""

from __future__ import annotations

import re

import pytest

from pimoe_export.artifacts.manifest import copy_artifact
from pimoe_export.errors import ArtifactError


def test_copying_a_missing_file_names_it(tmp_path) -> None:
    missing = tmp_path / "nowhere" / "model.onnx"
    with pytest.raises(ArtifactError, match=re.escape(str(missing))):
        copy_artifact(missing, tmp_path / "copy.onnx")
    assert not (tmp_path / "copy.onnx").exists()


def test_a_standard_op_graph_is_refused_with_the_command_that_writes_a_unit_graph(tmp_path) -> None:
    from pimoe_export.build.units import package_ort
    from pimoe_export.export.exporter import export_onnx
    from pimoe_export.model import create_from_preset

    export_onnx(create_from_preset("tiny"), tmp_path / "std.onnx", standard_ops=True)
    with pytest.raises(ArtifactError, match=r"standard-ops graph; .*`pimoe-export export` without --standard-ops"):
        package_ort(tmp_path / "std.onnx", tmp_path / "unit")
    assert not (tmp_path / "unit" / "manifest.json").exists()
