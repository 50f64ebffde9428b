"""The checkpoint of a MoEfied Hugging Face model: the Hugging Face ``config.json``, ``pimoe_moefy.json`` (each
PiMoE layer's config by module path) and every weight in safetensors (no pickle), with the source model's tokenizer
files copied along."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from torch import nn

from pimoe_export.errors import ArtifactError, PiMoEConfigError
from pimoe_export.hf.moefy import MoEFeedForward, encoder_layers, install_moe
from pimoe_export.model.config import PiMoEConfig
from pimoe_export.model.io import WEIGHTS_FILE
from pimoe_export.model.system import PiMoESystem

MANIFEST = "pimoe_moefy.json"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def require_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise PiMoEConfigError("moefy", "needs the `transformers` package: pip install 'pimoe-export[hf]' (or "
                               "scripts/setup.sh, which installs it)") from None
    return transformers


def save_moefied(model: nn.Module, directory: str | Path, source_dir: str | Path | None = None) -> Path:
    """The Hugging Face config, the pimoe manifest (each layer's PiMoEConfig) and all weights as safetensors;
    the source model's tokenizer files are copied along."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(str(directory / "config.json"))
    layers = {path: json.loads(layer.intermediate.moe.config.to_json()) for path, layer in encoder_layers(model)
              if isinstance(layer.intermediate, MoEFeedForward)}
    manifest = {"format": FORMAT_VERSION, "kind": "moefied-hf-encoder", "architecture": type(model).__name__,
                "layers": layers}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    save_model(model, str(directory / WEIGHTS_FILE))
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(source_dir) / name).is_file():
                shutil.copyfile(Path(source_dir) / name, directory / name)
    return directory


def is_moefied(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def load_moefied(directory: str | Path) -> nn.Module:
    """A model saved by :func:`save_moefied` (eval mode); weights loaded without pickle, every key checked."""
    from safetensors.torch import load_model

    from pimoe_export._files import read_json

    transformers = require_transformers()
    directory = Path(directory)
    manifest = read_json(directory / MANIFEST, "moefy manifest", "re-create it with `pimoe-export moefy`")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or \
            not isinstance(manifest.get("layers"), dict):
        raise PiMoEConfigError("moefy", f"{directory / MANIFEST} is not a format-{FORMAT_VERSION} pimoe moefy "
                               "manifest; re-create it with `pimoe-export moefy`")
    config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    model = transformers.AutoModel.from_config(config)
    by_path = dict(encoder_layers(model))
    for path, layer_cfg in manifest["layers"].items():
        if path not in by_path:
            raise PiMoEConfigError("moefy", f"{directory / MANIFEST} names layer {path!r}, which the model lacks")
        install_moe(by_path[path], PiMoESystem(config=PiMoEConfig.from_dict(layer_cfg)))
    if not (directory / WEIGHTS_FILE).is_file():
        raise PiMoEConfigError("moefy", f"{directory / WEIGHTS_FILE} is missing; re-create the model with moefy")
    try:
        load_model(model, str(directory / WEIGHTS_FILE), strict=True)
    except (RuntimeError, SafetensorError) as exc:  # a missing, extra or misshapen tensor, or an unreadable file
        detail = " ".join(str(exc).split())
        raise ArtifactError(f"{directory / WEIGHTS_FILE} does not hold the weights of the model {MANIFEST} describes "
                            f"({detail[:400]}); the checkpoint was edited or mixes two models: re-create it with "
                            "`pimoe-export moefy`") from None
    return model.eval()
