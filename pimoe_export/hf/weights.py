"""The weights of a Hugging Face model directory, read as untrusted input: safetensors only, one tensor at a time.

A directory holds ``model.safetensors``, or shards listed by ``model.safetensors.index.json`` (its ``weight_map``:
tensor name -> shard file, each a plain file name inside the directory). Every shard's header is read first (names,
dtypes, shapes; nothing else is loaded), so a checkpoint is checked against the model before any weight is
allocated; then :meth:`SafetensorsCheckpoint.tensor` reads one tensor at a time, as float32. A pickle checkpoint
(``pytorch_model.bin`` and friends) is refused with the command that converts it where the user trusts it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pimoe_export._files import read_json, resolve_inside
from pimoe_export.errors import PiMoEInputError
from pimoe_export.model.io import WEIGHTS_FILE as SAFETENSORS_FILE  # Hugging Face's single-file name too

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
        shards[name] = resolve_inside(directory, name, "a safetensors shard", "re-download the model",
                                      holder="model directory")
    return {tensor: shards[file] for tensor, file in weight_map.items()}


def _refuse_pickle(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        raise PiMoEInputError(f"{directory} holds its weights as pickle ({', '.join(pickles[:3])}), which "
                              "pimoe-export never loads (unpickling runs code from the file). Convert it to "
                              f"safetensors where you trust the checkpoint: {conversion_command(directory)}")
    raise PiMoEInputError(f"{directory} has no weights: expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} with "
                          "its shards")


#: the largest safetensors header read (bytes): the real ones are well below, a hostile one cannot exhaust memory
MAX_HEADER_BYTES = 100 << 20
#: element sizes of the safetensors dtypes (for offset checks; only FLOAT_DTYPES are ever read)
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1, "F4": 1}


def read_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, tuple[int, int]]]:
    """The tensors a safetensors file holds (names, dtypes, shapes) and their byte ranges, checked: a header of
    bounded size, known dtypes, ranges inside the file matching each shape (the format: an 8-byte little-endian
    header length, a JSON header, then the data)."""
    problem = f"{file} is not a valid safetensors file"
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
            raise PiMoEInputError(f"{problem} (header length {length}); re-download the checkpoint")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError):
            raise PiMoEInputError(f"{problem} (its header is not JSON); re-download the checkpoint") from None
    if not isinstance(header, dict):
        raise PiMoEInputError(f"{problem} (its header is not a JSON object)")
    data_bytes = size - 8 - length
    infos, ranges = {}, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
            valid = dtype in ITEMSIZE and all(d >= 0 for d in shape) and isinstance(begin, int) and \
                isinstance(end, int) and 0 <= begin <= end <= data_bytes and \
                end - begin == math.prod(shape) * ITEMSIZE[dtype]
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise PiMoEInputError(f"{problem}: tensor {name!r} has a malformed entry {str(entry)[:120]}")
        infos[name] = TensorInfo(file, dtype, shape)
        ranges[name] = (8 + length + begin, end - begin)
    return infos, ranges


class SafetensorsCheckpoint:
    """The tensors of a model directory by name (see the module docstring): headers parsed and checked up front,
    then each tensor read on its own from the file (plain reads, no memory map: a tensor's bytes live only while it
    is converted). Use as a context manager, or call :meth:`close`."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        mapping = _shard_files(self.directory)
        if mapping is None:
            single = self.directory / SAFETENSORS_FILE
            if not single.is_file():
                _refuse_pickle(self.directory)
            files = [resolve_inside(self.directory, SAFETENSORS_FILE, "the weights", "re-download the model",
                                    holder="model directory")]
        else:
            files = sorted(set(mapping.values()))
        self.tensors: dict[str, TensorInfo] = {}
        self._ranges: dict[str, tuple[int, int]] = {}
        for file in files:
            infos, ranges = read_header(file)
            for name, info in infos.items():
                if mapping is not None and mapping.get(name) != file:
                    raise PiMoEInputError(f"{file.name} holds {name!r}, which {SAFETENSORS_INDEX} places elsewhere "
                                          "(or not at all); the checkpoint is inconsistent: re-download it")
                if name in self.tensors:
                    raise PiMoEInputError(f"{name!r} is stored twice ({self.tensors[name].file.name} and "
                                          f"{file.name}); the checkpoint is inconsistent: re-download it")
                self.tensors[name] = info
                self._ranges[name] = ranges[name]
        missing = sorted(set(mapping or {}) - set(self.tensors))
        if missing:
            raise PiMoEInputError(f"{SAFETENSORS_INDEX} lists tensors its shards do not hold: {missing[:5]}; "
                                  "re-download the checkpoint")

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
        offset, length = self._ranges[name]
        raw = bytearray(length)
        with open(info.file, "rb") as handle:
            handle.seek(offset)
            if handle.readinto(raw) != length:
                raise PiMoEInputError(f"{info.file} ends inside tensor {name!r}; re-download the checkpoint")
        if not length:
            return torch.zeros(info.shape, dtype=torch.float32)
        stored = torch.frombuffer(raw, dtype=FLOAT_DTYPES[info.dtype]).reshape(info.shape)
        return stored.to(torch.float32, copy=True)

    def close(self) -> None:
        self._ranges.clear()

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
