"""Untrusted Hugging Face directories: what the importer refuses, through the CLI a user runs.

Each refusal is one clear error naming what is outside (exit 2, one line on stderr, no traceback), raised before
anything is allocated or written: `pimoe-export export DIR -o ...` and `pimoe-export pipeline --model DIR -o ...`
leave their outputs absent. Pickle checkpoints are never opened (the file here is not even a valid pickle).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pimoe_export.cli import main

pytest.importorskip("transformers")


def _edit_config(directory: Path, change: Callable[[dict], None]) -> Path:
    path = directory / "config.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return directory


def _copy(tiny_decoder, family: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_decoder(family), tmp_path / f"{family}-copy"))


def _pickle_only(d: Path) -> Path:
    for f in d.glob("*.safetensors"):
        f.unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle anyone should load")
    return d


def _fp8_tensor(d: Path) -> Path:
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / "model.safetensors"))
    name = next(n for n in state if n.endswith("w1.weight"))
    state[name] = state[name].to(torch.float8_e4m3fn)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def _shard_outside(d: Path) -> Path:
    from safetensors.torch import load_file

    names = list(load_file(str(d / "model.safetensors")))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "../elsewhere.safetensors"
                                                                               for n in names}}))
    (d / "model.safetensors").unlink()
    return d


def _weights_linked_out(d: Path) -> Path:
    """model.safetensors a symlink to the same file outside the directory (a valid checkpoint, read from elsewhere)."""
    outside = d.parent / "elsewhere.safetensors"
    shutil.move(d / "model.safetensors", outside)
    (d / "model.safetensors").symlink_to(outside)
    return d


def _nested_config(d: Path) -> Path:
    d.mkdir()  # deep enough for Python's recursion limit: json.loads alone raises RecursionError on it
    (d / "config.json").write_text('{"model_type": "mixtral", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return d


def _text_config(text: str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        d.mkdir()
        (d / "config.json").write_text(text)
        return d
    return make


def _raw(model_type: str, **extra) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": model_type, **extra}))
        return d
    return make


#: case -> (family of the tiny model to start from or None, how to make the directory, what the message names)
CASES: dict[str, tuple[str | None, Callable[[Path], Path], str]] = {
    "pickle checkpoint": ("mixtral", _pickle_only, "safe_serialization=True"),
    "remote code": ("mixtral", lambda d: _edit_config(d, lambda c: c.update(auto_map={"AutoModel": "x.Y"})),
                    "remote code"),
    "trust_remote_code alone": ("mixtral", lambda d: _edit_config(d, lambda c: c.update(trust_remote_code=True)),
                                "pimoe-export never runs code from a model directory"),
    "quantised weights": ("mixtral", lambda d: _edit_config(d, lambda c: c.update(
        quantization_config={"quant_method": "fp8"})),
                          "its weights are quantised (fp8); the importer reads bf16/fp16/fp32 checkpoints "
                          "(pimoe-export quantises them itself: `pimoe-export quantize`): dequantise it first"),
    "unknown model_type": (None, _raw("bert", hidden_size=32), "'bert' is not a Hugging Face MoE family"),
    "PhiMoE sparsemixer": (None, _raw("phimoe"), "sparsemixer"),
    "JetMoE attention experts": (None, _raw("jetmoe"), "attention experts"),
    "Switch capacity dropping": (None, _raw("switch_transformers"), "capacity"),
    "NLLB-MoE capacity dropping": (None, _raw("nllb-moe"), "capacity"),
    "multimodal Llama 4": (None, _raw("llama4"), "llama4_text"),
    "DBRX p != 1": ("dbrx", lambda d: _edit_config(d, lambda c: c["ffn_config"].update(
        moe_normalize_expert_weights=2.0)), "moe_normalize_expert_weights=2.0"),
    "more experts than the contract": ("mixtral", lambda d: _edit_config(d, lambda c: c.update(
        num_local_experts=2048)), "num_experts"),
    "k beyond the kept groups": ("deepseek_v3", lambda d: _edit_config(d, lambda c: c.update(
        num_experts_per_tok=6, topk_group=1)), "exceeds the experts of the kept groups"),
    "weights of another config": ("mixtral", lambda d: _edit_config(d, lambda c: c.update(intermediate_size=40)),
                                  "tensor shapes differ from config.json"),
    "fp8 tensor": ("mixtral", _fp8_tensor, "dequantise the checkpoint"),
    "a shard outside the directory": ("mixtral", _shard_outside, "directly in"),
    "weights linked from outside the directory": ("mixtral", _weights_linked_out, "outside the model directory; a "
                                                  "model directory may only name files inside itself"),
    "a config value of the wrong type": ("deepseek_v3", lambda d: _edit_config(d, lambda c: c.update(n_group=None)),
                                         "wrong type or range"),
    "a config nested past the JSON limits": (None, _nested_config,
                                            "levels; the model config is corrupt, re-download the Hugging Face "
                                            "model, or re-save the pimoe-export checkpoint"),
    "a config that is not JSON": (None, _text_config('{"model_type": "mixtral",'),
                                  "is not valid JSON (Expecting property name enclosed in double quotes: line 1 "
                                  "column 26 (char 25)); the model config is corrupt, re-download the Hugging "
                                  "Face model, or re-save the pimoe-export checkpoint"),
    "a config that is not an object": (None, _text_config('["mixtral"]'),
                                       "config.json holds a JSON list, not an object; re-download the Hugging Face "
                                       "model, or re-save the pimoe-export checkpoint"),
}


@pytest.mark.parametrize("command", ["export", "pipeline"])
@pytest.mark.parametrize("case", list(CASES))
def test_refused_by_name_exit_2_nothing_written(case: str, command: str, tiny_decoder, tmp_path, capsys) -> None:
    family, make, phrase = CASES[case]
    directory = make(_copy(tiny_decoder, family, tmp_path) if family else tmp_path / "model")
    out = tmp_path / "out"
    argv = ["export", str(directory), "-o", str(out / "model.onnx")] if command == "export" else \
        ["pipeline", "--model", str(directory), "-o", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pimoe-export {command}: error: "), err
    assert phrase in err[0], err[0]
    assert not out.exists(), sorted(out.rglob("*"))


def test_trust_remote_code_false_is_no_request_for_remote_code(tiny_decoder, tmp_path) -> None:
    """docs/models.md refuses `auto_map` / `trust_remote_code` in config.json (code from a model directory is never
    run): a config that says trust_remote_code false asks for no code, and is imported."""
    from pimoe_export.hf.importers import check_source

    directory = _edit_config(_copy(tiny_decoder, "mixtral", tmp_path), lambda c: c.update(trust_remote_code=False))
    check_source(directory)
