"""Op contracts only grow: a unit whose graph needs contract v1 (the oldest) still verifies and runs on this
package, and one of a contract newer than this package, or of v0, is refused naming its version."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from pimoe_export.artifacts.manifest import verify
from pimoe_export.build.units import package_ort
from pimoe_export.errors import ArtifactError, PluginLoadError
from pimoe_export.interface import META_CONTRACT
from pimoe_export.ops.schema import CONTRACT_VERSION
from pimoe_export.runtime.engine import Engine


def _with_contract(src, dst, version: int) -> None:
    proto = onnx.load(str(src))
    (entry,) = [p for p in proto.metadata_props if p.key == META_CONTRACT]
    entry.value = str(version)
    onnx.save(proto, str(dst))


def test_a_unit_of_the_oldest_contract_verifies_and_runs(exported_layer, tmp_path) -> None:
    model, onnx_path = exported_layer("tiny", 0)
    _with_contract(onnx_path, tmp_path / "v1.onnx", 1)
    try:
        package_ort(tmp_path / "v1.onnx", tmp_path / "unit")
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")
    assert verify(tmp_path / "unit").manifest.contract_version == 1
    x = np.random.default_rng(0).standard_normal((1, 3, model.hidden_size)).astype(np.float32)
    with Engine.load(tmp_path / "unit") as engine, torch.no_grad():
        np.testing.assert_allclose(engine.run(x), model(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("version", [0, CONTRACT_VERSION + 1])
def test_a_unit_of_a_contract_this_package_lacks_is_refused(exported_layer, tmp_path, version) -> None:
    _, onnx_path = exported_layer("tiny", 0)
    try:
        package_ort(onnx_path, tmp_path / "unit")
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")
    manifest = tmp_path / "unit" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["contract_version"] = version
    manifest.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=rf"built for op contract v{version}; this package implements v1 to "
                                            rf"v{CONTRACT_VERSION}"):
        verify(tmp_path / "unit")
