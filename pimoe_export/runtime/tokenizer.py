"""Text in and out of a decoder unit: the Hugging Face tokenizer it ships (``tokenizer.json``), read with the
``tokenizers`` library (no transformers, no torch), and incremental detokenisation for streaming."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pimoe_export.errors import ArtifactError, BackendUnavailableError

#: what a streamed text delta never ends in: the replacement character of an incomplete UTF-8 sequence (a byte-level
#: token that is the first part of a multi-byte character)
INCOMPLETE = "\ufffd"


class Tokenizer:
    """The unit's tokenizer: ``encode`` adds the special tokens the model's tokenizer adds (its post-processor, e.g.
    BOS), ``decode`` leaves special tokens out."""

    def __init__(self, path: Path) -> None:
        try:
            import tokenizers
        except ImportError:
            raise BackendUnavailableError("text in and out of a decoder unit needs the tokenizers package: pip "
                                          "install 'tokenizers>=0.19' (or pass token ids)") from None
        try:
            self._tokenizer: Any = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own Exception type for a file it cannot read
            raise ArtifactError(f"{path} is not a readable tokenizer ({exc}); re-create the unit with the model's "
                                "tokenizer.json") from None
        self.path = path

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))


class TextStream:
    """The text of one row's generated tokens as it grows: :meth:`push` returns the new text that is safe to show
    (never the start of an incomplete character, never text that could still become a stop string) and whether a
    stop string has appeared; the final text stops before the first stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.shown = 0  # characters of self.text already returned

    def push(self, token: int | None) -> tuple[str, bool]:
        """Add a token (None: nothing new, flush); returns (new text, stopped)."""
        if token is not None:
            self.ids.append(int(token))
            self.text = self.tokenizer.decode(self.ids)
        cut = self._stop_at()
        if cut is not None:
            self.text = self.text[:cut]
            return self._take(len(self.text)), True
        safe = len(self.text.rstrip(INCOMPLETE)) if token is not None else len(self.text)
        return self._take(safe - (self._held_back(safe) if token is not None else 0)), False

    def _stop_at(self) -> int | None:
        start = max(0, self.shown - max((len(s) for s in self.stop), default=0))
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _held_back(self, end: int) -> int:
        """Characters at the end of text[:end] that begin a stop string."""
        tail = self.text[:end]
        return max((n for s in self.stop for n in range(1, len(s)) if tail.endswith(s[:n])), default=0)

    def _take(self, end: int) -> str:
        end = max(end, self.shown)
        piece, self.shown = self.text[self.shown:end], end
        return piece
