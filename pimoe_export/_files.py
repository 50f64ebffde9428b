"""File helpers shared by checkpoints and units (no heavy imports: the runtime uses them)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pimoe_export.errors import ArtifactError


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_format_json(path: Path, fmt: str, kind: str, fix: str) -> dict[str, Any]:
    """The JSON object in ``path`` whose "format" is ``fmt``; an ArtifactError naming the ``kind`` of artefact
    (checkpoint, manifest) and the ``fix`` otherwise. The caller checks first that the file exists."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); the {kind} is corrupt, {fix}") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ArtifactError(f"{path}: expected format {fmt!r}, found {found!r}; {fix}")
    return data
