"""`pimoe-export inspect`: a unit's manifest and I/O, and whether it verifies (exit 2 when it does not)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "inspect"
HELP = "show and verify a unit's manifest and I/O"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("unit_dir", type=Path, help="a unit directory (holding manifest.json)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")


def run(args: argparse.Namespace) -> int:
    from pimoe_export.artifacts.manifest import read_manifest, verify
    from pimoe_export.errors import EXIT_BAD_INPUT, ArtifactError

    manifest = read_manifest(args.unit_dir)  # a manifest that cannot be read at all is an error (exit 2)
    try:
        verify(args.unit_dir)
        status = "verified: every artefact is inside the unit, matches its sha256 and the ONNX it ships"
    except ArtifactError as exc:
        status = f"NOT VALID: {exc}"
    code = 0 if status.startswith("verified") else EXIT_BAD_INPUT
    if args.json:
        print(json.dumps({**manifest.to_dict(), "verification": status}, indent=2))
        return code
    m = manifest
    print(f"{args.unit_dir}: {m.backend} {m.backend_version}, {m.precision}, op contract v{m.contract_version}")
    print(f"  targets: {m.target_sms or 'any CPU'}; profile [batch, seq] min {m.profile.min_shape} "
          f"opt {m.profile.opt_shape} max {m.profile.max_shape}")
    print(f"  model: H={m.config.get('hidden_size')}, E={m.config.get('num_experts')}, k={m.config.get('top_k')}")
    for art in m.artifacts:
        print(f"  {art.role:15s} {art.file:28s} {art.bytes / 2**20:8.2f} MiB  sha256 {art.sha256[:16]}…")
    if m.io:
        for kind, tensors in (("input", m.interface.inputs), ("output", m.interface.outputs)):
            for t in tensors:
                print(f"  {kind:6s} {t.name:16s} {t.dtype:10s} {list(t.dims)}")
    print(f"  {status}")
    return code
