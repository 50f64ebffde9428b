"""A model past 2 GB through the commands a user runs: `create --preset qwen3-moe` (one Qwen3-30B-A3B-shaped MoE
block, H 2048, I 768, E 128, k 8: 2.4 GB of float32 weights, seeded random), `export` and `package`.

Protobuf serialises at most 2 GiB, so the exported graph keeps its weights in one ONNX external-data file beside it
(``model.onnx.data``); ONNX Runtime runs it and gives the PyTorch block's output; the ONNX Runtime unit ships the data
file and its manifest fingerprints it (sha256 and size), so a changed byte in it refuses the unit. Everything is
written under one temporary directory removed at the end (about 7 GB of disk while it runs).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pimoe_export.errors import ArtifactError
from pimoe_export.interface import EXTERNAL_DATA_BYTES, external_data_files

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("past-2gb")
    try:
        for argv in (["create", "--preset", "qwen3-moe", "-o", str(root / "ckpt")],
                     ["export", str(root / "ckpt"), "-o", str(root / "model.onnx")],
                     ["package", str(root / "model.onnx"), "-o", str(root / "unit")]):
            # one process per command, as a user runs them: each frees its memory (export peaks at ~2x the weights)
            run = subprocess.run([sys.executable, "-m", "pimoe_export.cli", *argv], capture_output=True, text=True,
                                 cwd=ROOT, timeout=900)
            assert run.returncode == 0, (argv, run.stderr[-2000:])
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)  # keep no multi-GB leftovers in pytest's kept temp dirs


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def test_the_graph_keeps_its_weights_in_one_external_data_file(big) -> None:
    proto = onnx.load(str(big / "model.onnx"), load_external_data=False)
    assert external_data_files(proto) == ["model.onnx.data"]
    assert (big / "model.onnx").stat().st_size < 16 << 20  # nodes and metadata only
    assert (big / "model.onnx.data").stat().st_size > EXTERNAL_DATA_BYTES
    assert {n.op_type for n in proto.graph.node if n.domain == "pimoe"} >= {"PiMoERoute", "PiMoEExpertMLP"}


def test_onnx_runtime_runs_it_as_pytorch_computes_it(big) -> None:
    from pimoe_export.model.io import load_pretrained
    from pimoe_export.runtime.engine import Engine

    x = np.random.default_rng(3).standard_normal((2, 5, 2048)).astype(np.float32)
    engine = Engine.load(big / "unit")
    try:
        got = engine.run(x)
    finally:
        engine.close()
    del engine
    model = load_pretrained(big / "ckpt").eval()
    with torch.no_grad():
        want = model(torch.from_numpy(x))
        want = (want[0] if isinstance(want, tuple) else want).numpy()
    got = got[0] if isinstance(got, tuple) else got
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert got.shape == want.shape and rel <= 1e-5, rel


def test_the_unit_manifest_fingerprints_the_data_file(big) -> None:
    from pimoe_export.artifacts.manifest import verify

    unit = big / "unit"
    manifest = json.loads((unit / "manifest.json").read_text())
    data = [a for a in manifest["artifacts"] if a["role"] == "onnx_data"]
    assert len(data) == 1 and data[0]["file"] == "model.onnx.data", manifest["artifacts"]
    assert data[0]["bytes"] == (unit / "model.onnx.data").stat().st_size > EXTERNAL_DATA_BYTES
    assert data[0]["sha256"] == _sha256(unit / "model.onnx.data") == _sha256(big / "model.onnx.data")
    verify(unit)
    with open(unit / "model.onnx.data", "r+b") as handle:  # one changed byte in the weights
        handle.seek(1 << 30)
        byte = handle.read(1)
        handle.seek(1 << 30)
        handle.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ArtifactError, match=r"model\.onnx\.data does not match its manifest sha256"):
        verify(unit)
