"""Checkpoints: ``config.json`` + ``model.safetensors``. No pickle anywhere.

``config.json`` = {"format": "pimoe-export/1", "architecture": class name, "config": its config dict (PiMoEConfig,
or MoEBlockConfig for a MoE block), "weights_sha256": hash of model.safetensors, "extra": architecture-specific JSON
state}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pimoe_export._files import read_format_json, sha256_file
from pimoe_export.errors import ArtifactError
from pimoe_export.model.config import PiMoEConfig
from pimoe_export.model.moe_block import MoEBlock, MoEBlockConfig

if TYPE_CHECKING:
    from pimoe_export.model.system import PiMoESystem

    Layer = PiMoESystem | MoEBlock

CHECKPOINT_FORMAT = "pimoe-export/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _architectures() -> dict[str, tuple[type[Layer], Any]]:
    """Each architecture a checkpoint may name: its class and the config class its "config" is read with."""
    from pimoe_export.model.adaptive import AdaptivePiMoE
    from pimoe_export.model.system import PiMoESystem

    return {"PiMoESystem": (PiMoESystem, PiMoEConfig), "AdaptivePiMoE": (AdaptivePiMoE, PiMoEConfig),
            "MoEBlock": (MoEBlock, MoEBlockConfig)}


def save_pretrained(model: Layer, directory: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    weights = directory / WEIGHTS_FILE
    save_file(state, str(weights), metadata={"format": CHECKPOINT_FORMAT})
    extra_state = getattr(model, "extra_state_json", None)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "architecture": type(model).__name__,
        "config": model.config.to_dict(),
        "weights_sha256": sha256_file(weights),
        "extra": extra_state() if callable(extra_state) else {},
    }
    (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return directory


def read_checkpoint_config(directory: str | Path) -> dict[str, Any]:
    """Parse and validate ``config.json`` of a checkpoint directory."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ArtifactError(
            f"{directory} is not a pimoe-export checkpoint: {CONFIG_FILE} is missing; create one with "
            f"`pimoe-export create --preset NAME -o {directory}` or model.save_pretrained()"
        )
    return read_format_json(path, CHECKPOINT_FORMAT, "checkpoint", "re-save it",
                            fields={"architecture": str, "config": dict})


def load_pretrained(directory: str | Path, map_location: str | torch.device = "cpu") -> Layer:
    """Rebuild the model saved by :func:`save_pretrained`, verifying the weights' hash first."""
    directory = Path(directory)
    payload = read_checkpoint_config(directory)
    architectures = _architectures()
    arch = payload.get("architecture")
    if arch not in architectures:
        raise ArtifactError(f"{directory}: unknown architecture {arch!r}; known: {sorted(architectures)}")
    cls, config_cls = architectures[arch]
    config = config_cls.from_dict(payload.get("config", {}))
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"{directory}: {WEIGHTS_FILE} is missing; the checkpoint is incomplete, re-save it")
    recorded = payload.get("weights_sha256")
    if not isinstance(recorded, str) or not recorded:
        raise ArtifactError(f"{directory / CONFIG_FILE} records no weights_sha256 (the hash of {WEIGHTS_FILE}), so "
                            "the weights cannot be checked; re-save the model")
    digest = sha256_file(weights)
    if digest != recorded:
        raise ArtifactError(
            f"{weights}: sha256 {digest[:16]}… does not match config.json ({recorded[:16]}…);"
            " the weights were modified or belong to another checkpoint — re-save the model"
        )
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{weights}: cannot read safetensors ({exc})") from None
    try:
        model = cls(config=config, **_extra_kwargs(payload))
    except TypeError as exc:
        raise ArtifactError(f"{directory}/config.json: its 'extra' settings do not fit {arch} ({exc}); re-save the "
                            "model") from None
    expected = model.state_dict()
    wrong = [f"{name} {tuple(tensor.shape)} (expected {tuple(expected[name].shape)})" for name, tensor in state.items()
             if name in expected and tuple(tensor.shape) != tuple(expected[name].shape)]
    if wrong:
        raise ArtifactError(f"{weights} does not match the config in config.json: {', '.join(wrong[:5])}; the "
                            "checkpoint was edited or mixes two models, re-save it")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(
            f"{weights} does not match the architecture in config.json: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    restore = getattr(model, "load_extra_state_json", None)
    if callable(restore):
        restore(payload.get("extra", {}))
    model.to(map_location)
    model.eval()
    return model


def _extra_kwargs(payload: dict[str, Any]) -> dict[str, Any]:
    extra = payload.get("extra") or {}
    kwargs = extra.get("init_kwargs", {}) if isinstance(extra, dict) else None
    if not isinstance(kwargs, dict):
        raise ArtifactError("config.json: 'extra' must be an object whose 'init_kwargs' is an object; re-save the "
                            "model")
    return dict(kwargs)
