"""The TensorRT-RTX Polygraphy recipe (pimoe_export.build.polygraphy_rtx): Polygraphy's own CLI builds a TensorRT-RTX
engine of an exported layer ahead of time (no GPU) with our plugins, and the plan matches the one our Python build
path (pimoe_export.build.engine_builder.build_engine) makes from the same graph and profile.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pimoe_export.errors import PiMoEError
from pimoe_export.ops import schema

pytestmark = pytest.mark.trt
PLUGINS = (schema.ROUTE, schema.DISPATCH, schema.EXPERT_MLP, schema.COMBINE)


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    from pimoe_export.export.exporter import export_onnx
    from pimoe_export.model import create_from_preset
    from pimoe_export.native.libraries import check_plugin_library, find_plugin_library
    from pimoe_export.native.tensorrt_loader import import_tensorrt

    try:
        import_tensorrt("rtx")
        check_plugin_library(str(find_plugin_library()))
    except PiMoEError as exc:
        pytest.skip(f"TensorRT-RTX or the plugin library is missing: {exc}")
    root = tmp_path_factory.mktemp("polygraphy-rtx")
    model = create_from_preset("tiny", seed=5).eval()
    export_onnx(model, root / "model.onnx")
    h = model.hidden_size
    return root, {"hidden_states": ((1, 1, h), (2, 8, h), (4, 64, h))}


def _shape_args(profile) -> list[str]:
    out = []
    for i, flag in enumerate(("--trt-min-shapes", "--trt-opt-shapes", "--trt-max-shapes")):
        out += [flag, *(f"{name}:[{','.join(map(str, shapes[i]))}]" for name, shapes in profile.items())]
    return out


def test_prepared_folder_holds_the_module_alias_and_the_library_link(tmp_path) -> None:
    from pimoe_export.build.polygraphy_rtx import polygraphy_environment, prepare_folder
    from pimoe_export.native.tensorrt_loader import rtx_library

    try:
        folder = prepare_folder(tmp_path / "rtx")
    except PiMoEError as exc:
        pytest.skip(f"TensorRT-RTX is not installed: {exc}")
    assert (folder / "libtensorrt_rtx.so").resolve() == rtx_library().resolve()
    env = polygraphy_environment(folder, {"PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"] == f"{folder}{os.pathsep}/elsewhere" and env["LD_LIBRARY_PATH"] == str(folder)
    probe = "import tensorrt_rtx, tensorrt_rtx_bindings; print(tensorrt_rtx is tensorrt_rtx_bindings)"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "True", done.stderr


@pytest.mark.slow
def test_polygraphy_convert_builds_the_rtx_engine_with_our_plugins(layer) -> None:
    from pimoe_export.build.engine_builder import build_engine

    root, profile = layer
    engine = root / "polygraphy.engine"
    argv = ["convert", str(root / "model.onnx"), "--convert-to", "trt", "-o", str(engine),
            "--compute-capabilities", "8.9", *_shape_args(profile)]
    done = subprocess.run([sys.executable, "-m", "pimoe_export.build.polygraphy_rtx", *argv], cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    plan = engine.read_bytes()
    for name in PLUGINS:
        assert name.encode() in plan, name
    reference, summary = build_engine(root / "model.onnx", profile=profile, compute_capabilities=("SM89",))
    assert set(summary.plugin_counts()) == set(PLUGINS)
    # the same graph, profile and target: plans of the same size up to tactic/metadata differences
    assert abs(len(plan) - len(reference)) <= 0.1 * len(reference), (len(plan), len(reference))
