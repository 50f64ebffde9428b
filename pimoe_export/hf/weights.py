"""The weights of a Hugging Face model directory, read as untrusted input: safetensors only, one tensor at a time.

A directory holds ``model.safetensors``, or shards listed by ``model.safetensors.index.json`` (its ``weight_map``:
tensor name -> shard file, each a plain file name inside the directory). Every shard's header is read first (names,
dtypes, shapes; nothing else is loaded), so a checkpoint is checked against the model before any weight is
allocated; then :meth:`SafetensorsCheckpoint.tensor` reads one tensor at a time, as float32. A pickle checkpoint
(``pytorch_model.bin`` and friends) is refused with the command that converts it where the user trusts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pimoe_export._files import read_json, resolve_inside
from pimoe_export.errors import PiMoEInputError

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
#: pickle-based checkpoint files: never loaded (torch.load would run code from the file)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: weight dtypes a checkpoint may hold (safetensors spelling); each is read exactly as float32
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors spelling: F32, F16, BF16, ...
    shape: tuple[int, ...]


def conversion_command(directory: Path) -> str:
    """The command that rewrites a pickle checkpoint as safetensors (it unpickles: run it only where the checkpoint
    is trusted)."""
    return (f"python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('{directory}', "
            f"dtype='auto').save_pretrained('{directory}-safetensors', safe_serialization=True)\"")


def _shard_files(directory: Path) -> dict[str, Path] | None:
    """{tensor name: shard} from the index, or None for a single model.safetensors."""
    index = directory / SAFETENSORS_INDEX
    if not index.is_file():
        return None
    data = read_json(index, "safetensors index", "re-save the model with save_pretrained(safe_serialization=True)")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise PiMoEInputError(f"{index} has no weight_map of tensor names to shard files; re-save the model")
    shards: dict[str, Path] = {}
    for name in sorted(set(weight_map.values())):
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise PiMoEInputError(f"{index} names the shard {name!r}: shards must be .safetensors files directly in "
                                  f"{directory}")
        shards[name] = resolve_inside(directory, name, "a safetensors shard", "re-download the model")
    return {tensor: shards[file] for tensor, file in weight_map.items()}


def _refuse_pickle(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        raise PiMoEInputError(f"{directory} holds its weights as pickle ({', '.join(pickles[:3])}), which "
                              "pimoe-export never loads (unpickling runs code from the file). Convert it to "
                              f"safetensors where you trust the checkpoint: {conversion_command(directory)}")
    raise PiMoEInputError(f"{directory} has no weights: expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} with "
                          "its shards")


class SafetensorsCheckpoint:
    """The tensors of a model directory by name (see the module docstring). Use as a context manager, or call
    :meth:`close`."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        mapping = _shard_files(self.directory)
        if mapping is None:
            single = self.directory / SAFETENSORS_FILE
            if not single.is_file():
                _refuse_pickle(self.directory)
            files = [resolve_inside(self.directory, SAFETENSORS_FILE, "the weights", "re-download the model")]
        else:
            files = sorted(set(mapping.values()))
        self._handles: dict[Path, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in self._header(file).items():
                if mapping is not None and mapping.get(name) != file:
                    raise PiMoEInputError(f"{file.name} holds {name!r}, which {SAFETENSORS_INDEX} places elsewhere "
                                          "(or not at all); the checkpoint is inconsistent: re-download it")
                if name in self.tensors:
                    raise PiMoEInputError(f"{name!r} is stored twice ({self.tensors[name].file.name} and "
                                          f"{file.name}); the checkpoint is inconsistent: re-download it")
                self.tensors[name] = info
        missing = sorted(set(mapping or {}) - set(self.tensors))
        if missing:
            raise PiMoEInputError(f"{SAFETENSORS_INDEX} lists tensors its shards do not hold: {missing[:5]}; "
                                  "re-download the checkpoint")

    def _open(self, file: Path) -> Any:
        from safetensors import safe_open

        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as exc:  # safetensors raises its own error type for a bad header
                raise PiMoEInputError(f"{file} is not a readable safetensors file ({type(exc).__name__}: "
                                      f"{str(exc)[:200]}); re-download the checkpoint") from None
        return self._handles[file]

    def _header(self, file: Path) -> dict[str, TensorInfo]:
        handle = self._open(file)
        out = {}
        for name in handle.keys():  # noqa: SIM118  (a safe_open handle, not a dict)
            piece = handle.get_slice(name)
            out[name] = TensorInfo(file, str(piece.get_dtype()), tuple(int(d) for d in piece.get_shape()))
        return out

    def check_dtypes(self) -> None:
        """Every tensor is bf16, fp16 or fp32 (quantised formats are outside what the importer reads exactly)."""
        wrong = sorted({(info.dtype, name) for name, info in self.tensors.items() if info.dtype not in FLOAT_DTYPES})
        if wrong:
            raise PiMoEInputError(f"{self.directory}: tensor {wrong[0][1]!r} is {wrong[0][0]}; the importer reads "
                                  f"bf16, fp16 and fp32 weights ({len(wrong)} tensor(s) are not): dequantise the "
                                  "checkpoint first")

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor as float32 (a bf16/fp16 value converts exactly)."""
        info = self.tensors.get(name)
        if info is None:
            raise PiMoEInputError(f"{self.directory}: the checkpoint has no tensor {name!r}")
        if info.dtype not in FLOAT_DTYPES:
            raise PiMoEInputError(f"{self.directory}: tensor {name!r} is {info.dtype}, not bf16/fp16/fp32")
        return self._open(info.file).get_tensor(name).to(torch.float32)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_config(directory: str | Path) -> dict[str, Any]:
    """A Hugging Face ``config.json`` as a plain dict (read with the package's JSON limits; no code runs)."""
    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file():
        raise PiMoEInputError(f"{directory} has no config.json: not a Hugging Face model directory")
    data = read_json(path, "Hugging Face config", "re-download the model")
    if not isinstance(data, dict):
        raise PiMoEInputError(f"{path} is not a JSON object")
    return data


__all__ = ["SafetensorsCheckpoint", "TensorInfo", "conversion_command", "read_config"]
