"""Inputs of a Hugging Face text model: lines of a text file through the model's tokenizer, seeded random token ids
where there is no text, and the 4:1 split of a text into calibration and held-out lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pimoe_export.errors import PiMoEInputError
from pimoe_export.hf.checkpoint import TOKENIZER_FILES, require_transformers
from pimoe_export.interface import MODEL_IDS_INPUT, MODEL_MASK_INPUT


def read_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file (calibration or evaluation sentences)."""
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise PiMoEInputError(f"cannot read text file {path} ({exc}); pass a UTF-8 file with one text per line") \
            from None
    lines = [line for line in lines if line]
    if not lines:
        raise PiMoEInputError(f"text file {path} has no non-empty line")
    return lines


def text_feeds(tokenizer_dir: str | Path, lines: list[str], batch: int = 16,
               max_length: int = 128) -> list[dict[str, np.ndarray]]:
    """``lines`` through the model's tokenizer (``tokenizer_dir``): batches of input_ids + attention_mask."""
    transformers = require_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise PiMoEInputError(f"{tokenizer_dir} has no usable tokenizer ({exc}); copy the model's tokenizer files "
                              f"({', '.join(TOKENIZER_FILES)}) next to it") from None
    if tokenizer.pad_token is None:  # Llama/Mistral-style tokenizers have none; the mask hides the padding anyway
        if tokenizer.eos_token is None:
            raise PiMoEInputError(f"the tokenizer in {tokenizer_dir} has neither a pad nor an EOS token to pad "
                                  "calibration batches with; set pad_token in its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
    feeds = []
    for start in range(0, len(lines), batch):
        enc = tokenizer(lines[start:start + batch], padding=True, truncation=True, max_length=max_length,
                        return_tensors="np")
        feeds.append({MODEL_IDS_INPUT: enc[MODEL_IDS_INPUT].astype(np.int64),
                      MODEL_MASK_INPUT: enc[MODEL_MASK_INPUT].astype(np.int64)})
    return feeds


def random_feeds(vocab_size: int, seed: int, shapes: tuple[tuple[int, int], ...] = ((8, 32),) * 8
                 ) -> list[dict[str, np.ndarray]]:
    """Seeded uniform token ids with right padding (every row keeps at least one token): for models without
    text, a weak stand-in for real calibration data."""
    rng = np.random.default_rng(seed)
    feeds = []
    for b, s in shapes:
        mask = np.ones((b, s), np.int64)
        for row in range(b):
            mask[row, rng.integers(1, s + 1):] = 0
        feeds.append({MODEL_IDS_INPUT: rng.integers(0, vocab_size, (b, s)).astype(np.int64), MODEL_MASK_INPUT: mask})
    return feeds


def model_feeds(directory: str | Path, text: str | Path | None, vocab_size: int,
                seed: int = 0) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]], str]:
    """(calibration feeds, held-out check feeds, a description): the text's lines split 4:1 by position, or
    seeded random tokens when there is no text."""
    if text is None:
        return random_feeds(vocab_size, seed), random_feeds(vocab_size, seed + 1, ((1, 5), (4, 24), (2, 64))), \
            "seeded random token ids (no text given)"
    lines = read_lines(text)
    held = [line for i, line in enumerate(lines) if i % 5 == 4]
    calib = [line for i, line in enumerate(lines) if i % 5 != 4]
    if not held or not calib:
        raise PiMoEInputError(f"{text}: at least 5 lines are needed (4 of 5 calibrate, 1 of 5 is held out)")
    return text_feeds(directory, calib), text_feeds(directory, held), f"{len(calib)} + {len(held)} lines of {text}"
