"""A saved check replays through Polygraphy's own CLI: `polygraphy run ... --load-inputs --load-outputs` with the
runners pimoe-export registers (``polygraphy.run.plugins`` entry point) reaches the check's verdict, and a changed
reference output makes the replay fail."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pimoe_export.errors import PluginLoadError

ROOT = Path(__file__).resolve().parents[2]


def polygraphy() -> str:
    exe = Path(sys.executable).parent / "polygraphy"
    if exe.is_file():
        return str(exe)
    found = shutil.which("polygraphy")
    if found is None:
        pytest.skip("the polygraphy command is not installed")
    return found


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    from pimoe_export.build.units import package_ort
    from pimoe_export.export.exporter import export_onnx
    from pimoe_export.model.factory import create_from_preset
    from pimoe_export.validate.check import check_onnx, check_unit

    root = tmp_path_factory.mktemp("replay")
    model = create_from_preset("tiny", seed=11).eval()
    onnx_path = root / "model.onnx"
    export_onnx(model, onnx_path)
    try:
        package_ort(onnx_path, root / "unit")
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")
    return {"onnx": check_onnx(model, onnx_path, root / "onnx_report", plots=False),
            "unit": check_unit(model, root / "unit", root / "unit_report", plots=False)}


def replay(argv: list[str]) -> subprocess.CompletedProcess:
    assert argv[:2] == ["polygraphy", "run"]
    return subprocess.run([polygraphy(), *argv[1:]], capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.parametrize("kind", ["onnx", "unit"])
def test_saved_check_replays_with_the_polygraphy_cli(checked, kind) -> None:
    report = checked[kind]
    assert report.passed
    assert report.replay[3] == {"onnx": "--pimoe-onnxrt", "unit": "--pimoe-unit"}[kind]
    saved = json.loads(Path(report.files["json"]).read_text())
    assert saved["replay"] == report.replay
    result = replay(report.replay)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "PASSED | simple | All outputs matched | Outputs: ['output', 'expert_weights']" in log, log[-3000:]
    assert "Passed: 3/3 iterations" in log  # the three saved shapes


def test_replay_fails_when_the_saved_reference_is_changed(checked, tmp_path) -> None:
    """The replay really compares: one reference element moved by 10x the check's absolute tolerance fails it."""
    from polygraphy.comparator import RunResults

    report = checked["onnx"]
    results = RunResults.load(report.files["pytorch_outputs"])
    _, iterations = results[0]
    output = np.array(iterations[1]["output"])
    atol = float(report.replay[report.replay.index("--atol") + 1].split(":")[1])
    output.flat[7] += 10 * atol + 1e-3 * abs(output.flat[7])
    iterations[1]["output"] = output
    changed = tmp_path / "pytorch_outputs.json"
    results.save(str(changed))
    argv = list(report.replay)
    argv[argv.index("--load-outputs") + 1] = str(changed)
    result = replay(argv)
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    assert "FAILED | Output: 'output'" in log, log[-3000:]


def test_the_saved_reference_is_the_pytorch_models_outputs_on_the_saved_inputs(checked) -> None:
    """What a replay compares the artefact with (``--load-outputs pytorch_outputs.json``) is the PyTorch reference:
    the runner named pytorch, and its outputs are the fp32 model's own on ``inputs.json`` (run here again, the
    independent reference), not the artefact's, which would make every replay compare the artefact with itself."""
    import torch
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    from pimoe_export.model.factory import create_from_preset

    model = create_from_preset("tiny", seed=11).eval()  # the fixture's model, built afresh
    for report in checked.values():
        saved = RunResults.load(report.files["pytorch_outputs"])
        [(runner, iterations)] = list(saved)
        assert runner == "pytorch"
        feeds = load_json(report.files["inputs"])
        assert len(iterations) == len(feeds) == 3
        for feed, iteration in zip(feeds, iterations, strict=True):
            with torch.no_grad():
                output, info = model(torch.from_numpy(feed["hidden_states"]), return_routing_info=True)
            np.testing.assert_array_equal(np.asarray(iteration["output"]), output.numpy())
            np.testing.assert_array_equal(np.asarray(iteration["expert_weights"]), info.weights.numpy())
