"""Deployable units and their manifests.

A *unit* is one directory holding everything one backend needs to serve a PiMoE layer, and a
``manifest.json`` that describes and fingerprints it:

- ``onnxruntime`` units: ``model.onnx`` + ``libpimoe_ort.so`` (CPU; the embedded default backend)
- ``tensorrt`` / ``tensorrt-rtx`` units: ``model.engine`` + ``libpimoe_trt_plugins.so`` (+ the source
  ``model.onnx`` for provenance and rebuilds)

The manifest records the backend flavour and version, target SMs, precision, the optimisation profile, the
op-contract version, the PiMoE config and the sha256 of every artefact. :func:`verify` checks all of it
*before* anything is loaded, and every failure says how to rebuild.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pimoe_export._files import read_format_json, sha256_file
from pimoe_export.errors import ArtifactError
from pimoe_export.ops.schema import CONTRACT_VERSION

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "pimoe-export-unit/1"
BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-rtx")


@dataclass
class Artifact:
    role: str  # "onnx" | "engine" | "plugin_library" | "ort_library"
    file: str  # relative to the unit directory
    sha256: str
    bytes: int

    @classmethod
    def of(cls, unit_dir: Path, role: str, path: Path) -> Artifact:
        return cls(role, path.name, sha256_file(path), path.stat().st_size)


@dataclass(frozen=True)
class Profile:
    """Token-shape range the unit accepts: hidden_states [batch, sequence, H]."""

    min_shape: tuple[int, int]
    opt_shape: tuple[int, int]
    max_shape: tuple[int, int]

    def check(self, batch: int, sequence: int) -> str:
        """Empty string when [batch, sequence] is inside the profile, else the problem."""
        lo, hi = self.min_shape, self.max_shape
        if lo[0] <= batch <= hi[0] and lo[1] <= sequence <= hi[1]:
            return ""
        return (f"input [batch={batch}, sequence={sequence}] is outside this unit's profile "
                f"[{lo[0]}..{hi[0]}] x [{lo[1]}..{hi[1]}]")


@dataclass
class Manifest:
    backend: str
    precision: str
    profile: Profile
    config: dict[str, Any]
    artifacts: list[Artifact]
    backend_version: str = ""
    target_sms: list[str] = field(default_factory=list)
    build_options: dict[str, Any] = field(default_factory=dict)
    io: dict[str, Any] = field(default_factory=dict)
    source_onnx_sha256: str = ""
    contract_version: int = CONTRACT_VERSION
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    host: dict[str, str] = field(default_factory=lambda: {"machine": platform.machine(),
                                                          "python": platform.python_version()})
    format: str = MANIFEST_FORMAT

    def artifact(self, role: str) -> Artifact:
        for art in self.artifacts:
            if art.role == role:
                return art
        raise ArtifactError(f"the manifest lists no {role!r} artefact")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        try:
            profile = Profile(**{k: tuple(v) for k, v in data["profile"].items()})
            artifacts = [Artifact(**a) for a in data["artifacts"]]
            fields = {k: v for k, v in data.items() if k not in ("profile", "artifacts")}
            return cls(profile=profile, artifacts=artifacts, **fields)
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"malformed manifest ({type(exc).__name__}: {exc}); rebuild the unit") from None

    def write(self, unit_dir: Path) -> Path:
        path = unit_dir / MANIFEST_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def read_manifest(unit_dir: str | Path) -> Manifest:
    unit_dir = Path(unit_dir)
    path = unit_dir / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{unit_dir} is not a pimoe-export unit: {MANIFEST_FILE} is missing. Create one with "
                            f"`pimoe-export build MODEL.onnx -o {unit_dir}` or `pimoe-export pipeline`")
    manifest = Manifest.from_dict(read_format_json(path, MANIFEST_FORMAT, "manifest", "rebuild the unit"))
    if manifest.backend not in BACKENDS:
        raise ArtifactError(f"{path}: unknown backend {manifest.backend!r} (known: {BACKENDS})")
    return manifest


def rebuild_hint(manifest: Manifest, unit_dir: Path) -> str:
    if manifest.backend == "onnxruntime":
        return "re-create the unit with `pimoe-export pipeline` (or `pimoe-export package-ort`)"
    return f"rebuild it: `pimoe-export build {unit_dir / 'model.onnx'} -o {unit_dir}` on the target machine"


def verify(unit_dir: str | Path, *, backend_version: str | None = None, device_sm: str | None = None) -> Manifest:
    """Check a unit before loading anything from it: manifest format, op-contract version, every artefact's
    sha256, and (when given) the installed backend version and the device's SM. Raises ArtifactError."""
    unit_dir = Path(unit_dir)
    manifest = read_manifest(unit_dir)
    hint = rebuild_hint(manifest, unit_dir)
    if manifest.contract_version != CONTRACT_VERSION:
        raise ArtifactError(f"{unit_dir} was built for op contract v{manifest.contract_version}; this package "
                            f"implements v{CONTRACT_VERSION}: {hint}")
    for art in manifest.artifacts:
        path = unit_dir / art.file
        if not path.is_file():
            raise ArtifactError(f"{unit_dir}: {art.role} artefact {art.file} is missing: {hint}")
        if path.stat().st_size != art.bytes or sha256_file(path) != art.sha256:
            raise ArtifactError(f"{unit_dir}: {art.file} does not match its manifest sha256 (modified, corrupt or "
                                f"replaced): {hint}")
    # engines are tied to the exact TensorRT version that built them (ONNX Runtime units are not)
    if (backend_version is not None and manifest.backend_version and manifest.backend_version != backend_version
            and manifest.backend != "onnxruntime"):
            raise ArtifactError(f"{unit_dir} was built with {manifest.backend} {manifest.backend_version}, this "
                                f"machine has {backend_version}: {hint}")
    if device_sm is not None and manifest.target_sms and device_sm not in manifest.target_sms:
        raise ArtifactError(f"{unit_dir} targets {manifest.target_sms}, this GPU is {device_sm}: {hint}")
    return manifest


def copy_artifact(src: str | Path, unit_dir: Path, name: str | None = None) -> Path:
    src = Path(src)
    if not src.is_file():
        raise ArtifactError(f"{src} does not exist")
    dst = unit_dir / (name or src.name)
    if src.resolve() != dst.resolve():
        shutil.copy2(src, dst)
    return dst
