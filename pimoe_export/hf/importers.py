"""Model directories as :class:`~pimoe_export.model.source.ModelSource`: one importer per model family, tried in
order, then pimoe-export's own PiMoE layer checkpoint.

An importer recognises its directories cheaply (a marker file, a config field), checks them before a command
writes anything, and loads a source: the module, its named inputs and example, its calibration and held-out
feeds. Adding a model family is adding an :class:`Importer` to :data:`IMPORTERS` (docs/architecture.md); export,
quantisation, the runtime and the checks take the source as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pimoe_export.errors import PiMoEInputError
from pimoe_export.interface import MODEL_IDS_INPUT, MODEL_MASK_INPUT
from pimoe_export.model.enhanced import DeploymentSettings
from pimoe_export.model.source import Calibration, ModelSource, layer_source, model_source, moe_layers


@dataclass(frozen=True)
class Importer:
    """One model family: ``recognises(directory)``, ``check(directory, text)`` (before any output is written;
    ``text``: calibration text or None) and ``load(directory, text, seed)``."""

    name: str
    recognises: Callable[[Path], bool]
    check: Callable[[Path, Path | None], None]
    load: Callable[[Path, Path | None, int], ModelSource]


# ------------------------------------------------------------------------------------------ MoEfied HF encoders
def _check_moefied(directory: Path, text: Path | None) -> None:
    from pimoe_export.hf.feeds import read_lines

    if text is not None:
        read_lines(text)


def moefied_source(directory: Path, text: Path | None = None, seed: int = 0) -> ModelSource:
    """A `pimoe-export moefy` directory: ``input_ids`` + ``attention_mask`` in; calibrated on 4 of 5 lines of
    ``text`` through the model's tokenizer, checked on the fifth (seeded random token ids without text)."""
    from pimoe_export.hf.checkpoint import load_moefied, save_moefied
    from pimoe_export.hf.feeds import model_feeds, read_lines, text_feeds

    model = load_moefied(directory)
    vocab = int(model.config.vocab_size)
    calibration, evaluation, data = model_feeds(directory, text, vocab, seed)

    def read(given: Any, max_tokens: int | None) -> Calibration:
        if not isinstance(given, (str, Path)):
            raise PiMoEInputError(f"{directory} is a text model: calibrate it with a text file (one sentence per "
                                  f"line), not {type(given).__name__}")
        return Calibration(text_feeds(directory, read_lines(given)), f"the lines of {given}")

    def random_feed(batch: int, sequence: int, feed_seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(feed_seed)
        return {MODEL_IDS_INPUT: rng.integers(0, vocab, (batch, sequence)).astype(np.int64),
                MODEL_MASK_INPUT: np.ones((batch, sequence), np.int64)}

    describe = {"architecture": type(model).__name__, "pimoe_layers": sorted(moe_layers(model)), "data": data}
    return model_source(model, calibration, evaluation=evaluation, data=data, random_feed=random_feed,
                        describe=lambda: describe, read_calibration=read,
                        save=lambda target: save_moefied(model, target, source_dir=directory))


def _is_moefied(directory: Path) -> bool:
    from pimoe_export.hf.checkpoint import is_moefied

    return is_moefied(directory)


MOEFIED_ENCODER = Importer("MoEfied Hugging Face encoder (pimoe-export moefy)", _is_moefied, _check_moefied,
                           moefied_source)


# ------------------------------------------------------------------------------------------ Hugging Face MoE decoders
def _model_type(directory: Path) -> str | None:
    """The model_type of a Hugging Face config.json in ``directory`` (None: none there, or a pimoe checkpoint's)."""
    from pimoe_export._files import read_json
    from pimoe_export.errors import ArtifactError

    path = directory / "config.json"
    if not path.is_file():
        return None
    try:  # the package's JSON limits: size, depth (a deeply nested file would otherwise raise RecursionError)
        data = read_json(path, "Hugging Face config", "re-download the model")
    except ArtifactError:
        return None  # the importer that reads it reports the problem
    if not isinstance(data, dict) or "format" in data or not isinstance(data.get("model_type"), str):
        return None
    return data["model_type"]


def _check_decoder(directory: Path, text: Path | None) -> None:
    from pimoe_export.hf.decoder import check_directory
    from pimoe_export.hf.feeds import read_lines

    check_directory(directory)
    if text is not None:
        read_lines(text)


def decoder_source(directory: Path, text: Path | None = None, seed: int = 0) -> ModelSource:
    """A Hugging Face MoE decoder directory (pimoe_export.hf.decoder): ``input_ids``, ``attention_mask``,
    ``position_ids`` and the past key/values in, ``logits``, the present key/values and every MoE layer's routing
    out (a model whose cache does not fit the decoder I/O: no cache, the reason in its description); calibrated on
    4 of 5 lines of ``text`` through the model's tokenizer (seeded random token ids without it), checked on the fifth
    (without: seeded batches with no, right and left padding). Calibration and checks run prompt steps (an empty
    past); the export example is a step with a past, so the graph serves prefill and decode."""
    from pimoe_export.hf import decoder as D
    from pimoe_export.hf.feeds import read_lines
    from pimoe_export.interface import decoder_interface, decoder_metadata

    model = D.load_decoder(directory)
    vocab, spec = int(model.config.vocab_size), model.spec
    if text is None:
        calibration = D.random_decoder_feeds(vocab, seed, D.CALIBRATION_SHAPES, spec)
        evaluation = D.random_decoder_feeds(vocab, seed + 1, D.CHECK_SHAPES, spec)
        data = ("seeded random token ids: calibration right- and left-padded, checks with no, right and left "
                "padding (no text given)")
    else:
        lines = read_lines(text)
        held, calib = lines[4::5], [line for i, line in enumerate(lines) if i % 5 != 4]
        if not held or not calib:
            raise PiMoEInputError(f"{text}: at least 5 lines are needed (4 of 5 calibrate, 1 of 5 is held out)")
        calibration = D.text_decoder_feeds(directory, calib, spec)
        evaluation = D.text_decoder_feeds(directory, held, spec)
        data = f"{len(calib)} + {len(held)} lines of {text}"

    def read(given: Any, max_tokens: int | None) -> Calibration:
        if not isinstance(given, (str, Path)):
            raise PiMoEInputError(f"{directory} is a text model: calibrate it with a text file (one sentence per "
                                  f"line), not {type(given).__name__}")
        return Calibration(D.text_decoder_feeds(directory, read_lines(given), spec), f"the lines of {given}")

    layers = moe_layers(model)
    describe = {"architecture": model.family.name, "model_type": model.family.model_type,
                "moe_layers": sorted(layers), "moe_block": next(iter(layers.values())).config.to_dict(), "data": data,
                "kv_cache": spec.to_dict() if spec is not None else f"none: {model.cache_refusal}"}
    source = model_source(model, calibration, evaluation=evaluation, data=data, describe=lambda: describe,
                          random_feed=lambda b, s, feed_seed: D.random_decoder_feeds(vocab, feed_seed,
                                                                                     ((b, s, "none"),), spec)[0],
                          read_calibration=read)
    if spec is not None:  # the decoder I/O (names, axes) and its DecoderSpec in the graph's metadata
        source.inputs = decoder_interface(spec).inputs
        source.example = D.export_example(spec, seed)
        source.metadata = decoder_metadata(spec)
        source.bounded_axes = False  # torch.export traces the cache's sizes as >= 2; the graph runs 1 and 0
    source.settings = DeploymentSettings(calibration_method=D.CALIBRATION_METHOD)
    return source


def _hf_importer(family: Any) -> Importer:
    return Importer(f"{family.name} (Hugging Face)", lambda d: _model_type(d) == family.model_type, _check_decoder,
                    decoder_source)


def _refuse(directory: Path, text: Path | None, seed: int = 0) -> ModelSource:
    from pimoe_export.hf.decoder import family_of

    family_of(directory)  # raises, naming why the model is outside what pimoe-export imports
    raise PiMoEInputError(f"{directory}: not an importable model")  # pragma: no cover


#: any other Hugging Face directory (config.json with a model_type): one error naming why it is not imported
HF_OUTSIDE = Importer("Hugging Face model outside the contract", lambda d: _model_type(d) is not None, _refuse,
                      _refuse)


# ------------------------------------------------------------------------------------------ unreadable configs
#: the fix for a config.json that is neither kind of model's: which kind it was meant to be cannot be read from it
UNREADABLE_FIX = "re-download the Hugging Face model, or re-save the pimoe-export checkpoint"


def _read_model_config(directory: Path) -> Any:
    from pimoe_export._files import read_json

    return read_json(directory / "config.json", "model config", UNREADABLE_FIX)


def _config_unreadable(directory: Path) -> bool:
    """config.json is there but holds no JSON object: neither a Hugging Face config nor a pimoe checkpoint's."""
    from pimoe_export.errors import ArtifactError

    if not (directory / "config.json").is_file():
        return False
    try:
        return not isinstance(_read_model_config(directory), dict)
    except ArtifactError:
        return True


def _refuse_unreadable(directory: Path, text: Path | None, seed: int = 0) -> ModelSource:
    from pimoe_export.errors import ArtifactError

    data = _read_model_config(directory)  # raises for a file that is not JSON, naming the fix
    raise ArtifactError(f"{directory / 'config.json'} holds a JSON {type(data).__name__}, not an object; "
                        f"{UNREADABLE_FIX}")


#: a config.json that cannot be read as an object: one error naming both fixes (rather than the checkpoint
#: reader's, for what may be a Hugging Face directory)
UNREADABLE_CONFIG = Importer("model directory with an unreadable config.json", _config_unreadable,
                             _refuse_unreadable, _refuse_unreadable)


# ------------------------------------------------------------------------------------------ PiMoE layer checkpoints
def _check_layer(directory: Path, text: Path | None) -> None:
    from pimoe_export.model.io import read_checkpoint_config

    read_checkpoint_config(directory)
    if text is not None:
        raise PiMoEInputError("--calib applies to whole models (a `pimoe-export moefy` directory); a PiMoE layer "
                              "checkpoint calibrates on seeded hidden states")


def _load_layer(directory: Path, text: Path | None, seed: int) -> ModelSource:
    from pimoe_export.model.io import load_pretrained

    _check_layer(directory, text)
    return layer_source(load_pretrained(directory))


LAYER_CHECKPOINT = Importer("PiMoE layer checkpoint (pimoe-export create / save_pretrained)", lambda _: True,
                            _check_layer, _load_layer)

def _decoder_importers() -> tuple[Importer, ...]:
    from pimoe_export.hf.families import FAMILIES

    return tuple(_hf_importer(family) for family in FAMILIES)


#: the model families, tried in order; the last recognises every directory
IMPORTERS: tuple[Importer, ...] = (MOEFIED_ENCODER, *_decoder_importers(), HF_OUTSIDE, UNREADABLE_CONFIG,
                                   LAYER_CHECKPOINT)


def importer_for(directory: str | Path) -> Importer:
    return next(i for i in IMPORTERS if i.recognises(Path(directory)))


def check_source(directory: str | Path, text: str | Path | None = None) -> None:
    """Check a model directory (and calibration text) before a command writes anything."""
    importer_for(directory).check(Path(directory), None if text is None else Path(text))


def load_source(directory: str | Path, *, text: str | Path | None = None, seed: int = 0) -> ModelSource:
    """The model in ``directory`` as a source (``text``: calibration/evaluation sentences for text models)."""
    return importer_for(directory).load(Path(directory), None if text is None else Path(text), seed)
