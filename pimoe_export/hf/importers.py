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

#: the model families, tried in order; the last recognises every directory
IMPORTERS: tuple[Importer, ...] = (MOEFIED_ENCODER, LAYER_CHECKPOINT)


def importer_for(directory: str | Path) -> Importer:
    return next(i for i in IMPORTERS if i.recognises(Path(directory)))


def check_source(directory: str | Path, text: str | Path | None = None) -> None:
    """Check a model directory (and calibration text) before a command writes anything."""
    importer_for(directory).check(Path(directory), None if text is None else Path(text))


def load_source(directory: str | Path, *, text: str | Path | None = None, seed: int = 0) -> ModelSource:
    """The model in ``directory`` as a source (``text``: calibration/evaluation sentences for text models)."""
    return importer_for(directory).load(Path(directory), None if text is None else Path(text), seed)
