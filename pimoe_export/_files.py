"""Files in and out, for every layer (no heavy imports: the runtime uses it).

- :func:`sha256_file`, :func:`read_format_json`: artefact fingerprints and format-checked JSON.
- :func:`resolve_inside`: the containment rule for artefacts: a path a manifest names must resolve, after
  symlinks, to a regular file inside its unit.
- :class:`OutputDir`: the ownership rule for outputs: inside a directory the user named, pimoe-export writes only
  entries it created itself (recorded in ``.pimoe-export-outputs.json``) unless ``force``; nothing is written
  outside it, and nothing is written through a symlink.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from pimoe_export.errors import ArtifactError, OutputError

#: JSON deeper than this is refused before the parser recurses (a hostile file cannot exhaust the stack)
MAX_JSON_DEPTH = 64


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _json_depth(text: str) -> int:
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def read_json(path: Path, kind: str, fix: str, max_bytes: int = 64 << 20) -> Any:
    """JSON from ``path``: an ArtifactError naming the ``kind`` of file and the ``fix`` when it cannot be read,
    is larger than ``max_bytes``, is not UTF-8, nests deeper than MAX_JSON_DEPTH or is not valid JSON."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ArtifactError(f"{path} is {size} bytes, more than a {kind} can be ({max_bytes}); {fix}")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ArtifactError(f"{path} is not UTF-8 text; the {kind} is corrupt, {fix}") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read {path} ({exc.strerror or exc}); {fix}") from None
    if _json_depth(text) > MAX_JSON_DEPTH:
        raise ArtifactError(f"{path} nests deeper than {MAX_JSON_DEPTH} levels; the {kind} is corrupt, {fix}")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); the {kind} is corrupt, {fix}") from None


def read_format_json(path: Path, fmt: str, kind: str, fix: str, fields: dict[str, type] | None = None
                     ) -> dict[str, Any]:
    """The JSON object in ``path`` whose "format" is ``fmt`` and that holds every one of ``fields`` (name: JSON
    type); an ArtifactError naming the ``kind`` of artefact (checkpoint, manifest), what is wrong and the ``fix``
    otherwise. The caller checks first that the file exists."""
    data = read_json(path, kind, fix)
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ArtifactError(f"{path}: expected format {fmt!r}, found {found!r}; {fix}")
    wrong = [f"{name!r} ({kind_of.__name__})" for name, kind_of in (fields or {}).items()
             if not isinstance(data.get(name), kind_of)]
    if wrong:
        raise ArtifactError(f"{path}: this {kind} lacks {', '.join(wrong)} or holds another type there; {fix}")
    return data


def resolve_inside(root: Path, name: Any, what: str, fix: str = "", holder: str = "unit") -> Path:
    """``root / name`` resolved (symlinks followed), which must be a regular file inside ``root``.

    ``what`` names the entry in messages (e.g. "manifest artefact 'ort_library'"), ``fix`` says what to do,
    ``holder`` what ``root`` is (a unit, a model directory). Absolute paths, ``..`` that leaves the root, symlinks to
    files elsewhere and non-files are refused with an ArtifactError.
    """
    fix = f": {fix}" if fix else ""
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise ArtifactError(f"{root}: {what} has no usable file name ({name!r}){fix}")
    relative = Path(name)
    if relative.is_absolute():
        raise ArtifactError(f"{root}: {what} names the absolute path {name!r}; a {holder} may only name files "
                            f"inside itself{fix}")
    try:
        real_root = root.resolve(strict=True)
    except OSError as exc:
        raise ArtifactError(f"{root} cannot be read ({exc.strerror or exc})") from None
    target = (root / relative).resolve()
    if target == real_root or real_root not in target.parents:
        raise ArtifactError(f"{root}: {what} ({name!r}) resolves to {target}, outside the {holder}; a {holder} may "
                            f"only name files inside itself (no '..', no symlinks to elsewhere){fix}")
    if not target.is_file():
        raise ArtifactError(f"{root}: {name} is missing ({what}; or it is not a regular file){fix}")
    return target


OWNERSHIP_FILE = ".pimoe-export-outputs.json"
OWNERSHIP_FORMAT = "pimoe-export-outputs/1"


class OutputDir:
    """A directory the user named for outputs, and the entries in it that pimoe-export wrote.

    ``claim(name)`` returns where to write the entry ``name`` (a file or a folder directly inside): an existing entry
    that pimoe-export did not write is the user's and is refused unless ``force``; a symlink is never written
    through (it is removed first when the entry may be replaced). The claim is recorded before anything is
    written, so an interrupted run can be repeated.
    """

    def __init__(self, path: str | Path, *, force: bool = False, command: str = "pimoe-export") -> None:
        self.root = Path(path)
        self.force = force
        self.command = command
        if self.root.is_symlink() and not self.root.is_dir():
            raise OutputError(f"output directory {self.root} is a dangling symlink; name a real directory")
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(f"output directory {self.root} exists and is not a directory; choose another path")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the output directory {self.root} ({exc.strerror or exc}); choose a "
                              "writable path") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise OutputError(f"the output directory {self.root} is not writable; choose a writable path")
        self.owned = self._load()

    def _record_path(self) -> Path:
        return self.root / OWNERSHIP_FILE

    def _load(self) -> dict[str, Any]:
        path = self._record_path()
        if not path.is_file() or path.is_symlink():
            return {}
        try:
            data = read_format_json(path, OWNERSHIP_FORMAT, "output record", "delete it")
        except ArtifactError:
            return {}  # an unreadable record owns nothing: every existing entry is then the user's
        entries = data.get("entries")
        return dict(entries) if isinstance(entries, dict) else {}

    def _save(self) -> None:
        record = {"format": OWNERSHIP_FORMAT, "entries": self.owned}
        path = self._record_path()
        if path.is_symlink():
            path.unlink()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)

    def owns(self, name: str) -> bool:
        return name in self.owned

    def refuse_foreign(self, names: list[str]) -> None:
        """Raise before any work when one of ``names`` exists here and is the user's (not written by pimoe-export),
        unless ``force``: a command that writes many entries fails at once, not halfway."""
        if self.force:
            return
        for name in names:
            target = self.root / name
            if (target.exists() or target.is_symlink()) and name not in self.owned:
                raise OutputError(f"{target} exists and was not written by pimoe-export; it is left alone. Pass "
                                  f"--force to replace it, or choose another output directory than {self.root}")

    def claim(self, name: str) -> Path:
        """The path of the entry ``name`` directly inside this directory, safe to (over)write."""
        if not name or "/" in name or name in (".", "..", OWNERSHIP_FILE):
            raise OutputError(f"internal: {name!r} is not an entry name")
        target = self.root / name
        exists = target.exists() or target.is_symlink()
        if exists and name not in self.owned and not self.force:
            raise OutputError(f"{target} exists and was not written by pimoe-export; it is left alone. Pass --force "
                              f"to replace it, or choose another output directory than {self.root}")
        if target.is_symlink():
            target.unlink()
        self.owned[name] = {"command": self.command, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            self._save()
        except OSError as exc:
            raise OutputError(f"cannot write into {self.root} ({exc.strerror or exc}); choose a writable path") \
                from None
        return target

    def claim_dir(self, name: str) -> OutputDir:
        """A sub-folder claimed as a whole (its own record then governs its entries)."""
        path = self.claim(name)
        if path.exists() and not path.is_dir():
            path.unlink()
        return OutputDir(path, force=True, command=self.command)


def output_file(path: str | Path, *, force: bool = False, command: str = "pimoe-export") -> Path:
    """A single output file: claimed in its folder's record (see :class:`OutputDir`)."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise OutputError(f"{path} is not a file name")
    return OutputDir(path.parent if str(path.parent) else Path("."), force=force, command=command).claim(path.name)


def output_onnx(path: str | Path, *, force: bool = False, command: str = "pimoe-export") -> Path:
    """An ONNX output file and the external-data file a graph past 2 GB writes beside it, both claimed (see
    :func:`output_file`)."""
    from pimoe_export.interface import external_data_name

    path = output_file(path, force=force, command=command)
    output_file(path.with_name(external_data_name(path.name)), force=force, command=command)
    return path
