"""Generation on a decoder unit: requests, their tokens and stops, and the loop that decodes a batch of them.

One loop serves ``Engine.generate`` (a batch of prompts, prefilled together with left padding as Hugging Face
``generate`` does, run to the end) and ``serve`` (:class:`ContinuousBatcher`: requests join and leave a running
batch between decode steps). A request ends, each row on its own, at its first end condition:

- ``eos``: it produced one of the end-of-sequence tokens (the token is kept in ``token_ids``, not in the text);
- ``stop``: its tokens end with one of ``stop_token_ids``, or its text holds one of the ``stop`` strings (the text
  ends before it);
- ``length``: ``max_new_tokens`` tokens (a request that would run past the unit's context is refused up front);
- ``cancelled``: its ``is_cancelled()`` said so (a client that hung up); its cache is freed at the next step.

Streaming: ``on_token`` receives a :class:`TokenEvent` for every token of every row as it is chosen (its text piece:
see tokenizer.TextStream), the last one of a row with its ``finish_reason``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from pimoe_export.errors import PiMoEError, PiMoEInputError
from pimoe_export.interface import DecoderSpec
from pimoe_export.runtime.decoder import Decoder, Rows
from pimoe_export.runtime.sampling import SamplingSettings, choose, fresh_seed, row_generator
from pimoe_export.runtime.tokenizer import TextStream, Tokenizer

FINISH_REASONS = ("eos", "stop", "length", "cancelled", "error")


@dataclass(frozen=True)
class TokenEvent:
    """One streamed step of one request: the token chosen (None for an end without a token: cancelled, error), the
    new text it completes (None without a tokenizer) and, on a request's last event, why it ended."""

    request: int
    token_id: int | None
    text: str | None
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Generation:
    """One request's result: its prompt and new token ids, the new text (with a tokenizer), why it ended and the
    seed its sampling used (None: greedy)."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str
    seed: int | None = None


@dataclass
class Request:
    """A request being decoded (see the module docstring)."""

    index: int
    prompt: list[int]
    settings: SamplingSettings
    spec: DecoderSpec
    tokenizer: Tokenizer | None = None
    on_token: Callable[[TokenEvent], None] | None = None
    is_cancelled: Callable[[], bool] | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        check_prompt(self.prompt, self.settings, self.spec)
        if not self.settings.greedy:
            self.seed = self.settings.seed if self.settings.seed is not None else fresh_seed()
        self._generator = row_generator(self.seed, self.index) if self.seed is not None else None
        self._eos = set(self.settings.eos_token_ids if self.settings.eos_token_ids is not None
                        else self.spec.eos_token_ids)
        if self.settings.stop and self.tokenizer is None:
            raise PiMoEInputError("stop strings need the unit's tokenizer; this unit has none: pass stop_token_ids")
        self._text = TextStream(self.tokenizer, self.settings.stop) if self.tokenizer is not None else None

    def advance(self, logits: np.ndarray) -> bool:
        """Choose the next token from this row's logits [V]; True when the request has ended."""
        token = choose(logits, self.settings, self._generator)
        self.tokens.append(token)
        reason, piece = None, None
        if token in self._eos:
            reason = "eos"
            piece = self._text.push(None)[0] if self._text is not None else None
        else:
            if self._text is not None:
                piece, stopped = self._text.push(token)
                reason = "stop" if stopped else None
            if reason is None and any(self.tokens[-len(s):] == list(s) for s in self.settings.stop_token_ids):
                reason = "stop"
        if reason is None and len(self.tokens) >= self.settings.max_new_tokens:
            reason = "length"
            piece = (piece or "") + self._text.push(None)[0] if self._text is not None else None
        self.finish_reason = reason
        self._emit(TokenEvent(self.index, token, piece, reason))
        return reason is not None

    def end(self, reason: str, error: str | None = None) -> None:
        """End without a new token (cancelled, or a failed step)."""
        self.finish_reason = reason
        self._emit(TokenEvent(self.index, None, None, reason, error))

    def cancelled(self) -> bool:
        return self.is_cancelled is not None and bool(self.is_cancelled())

    def _emit(self, event: TokenEvent) -> None:
        if self.on_token is not None:
            self.on_token(event)

    def result(self) -> Generation:
        text = self._text.text if self._text is not None else None
        return Generation(list(self.prompt), list(self.tokens), text, self.finish_reason or "length", self.seed)


def check_prompt(prompt: Sequence[int], settings: SamplingSettings, spec: DecoderSpec) -> None:
    """Refuse a request the unit cannot serve: an empty prompt, a token outside the vocabulary, a prompt and
    max_new_tokens past the context length."""
    if len(prompt) == 0:
        raise PiMoEInputError("the prompt is empty: give at least one token (or some text)")
    bad = [t for t in prompt if not 0 <= int(t) < spec.vocab_size]
    if bad:
        raise PiMoEInputError(f"the prompt holds token ids outside the vocabulary [0, {spec.vocab_size}): {bad[:5]}")
    if len(prompt) + settings.max_new_tokens > spec.context_length:
        raise PiMoEInputError(f"a prompt of {len(prompt)} tokens and max_new_tokens {settings.max_new_tokens} go past "
                              f"the unit's context length {spec.context_length}: shorten the prompt or ask for at "
                              f"most {max(spec.context_length - len(prompt), 0)} new tokens")


class Decoding:
    """The requests being decoded together and their rows (``trim``: drop padding all rows share when rows leave)."""

    def __init__(self, decoder: Decoder, trim: bool = False) -> None:
        self.decoder = decoder
        self.trim = trim
        self.active: list[Request] = []
        self.rows: Rows | None = None

    def admit(self, requests: Sequence[Request], together: bool = True) -> None:
        """Prefill the requests (in one left-padded batch, or each alone) and add those not yet ended."""
        parts = [self.rows] if self.rows is not None else []
        for group in [list(requests)] if together else [[r] for r in requests]:
            rows, logits = Rows.prefill(self.decoder, [r.prompt for r in group])
            going = [i for i, r in enumerate(group) if not r.advance(logits[i])]
            if going:
                parts.append(rows if len(going) == len(group) else rows.select(self.decoder, going, self.trim))
                self.active.extend(group[i] for i in going)
        if parts:
            self.rows = parts[0] if len(parts) == 1 else Rows.merge(self.decoder, parts)

    def step(self) -> int:
        """Drop cancelled requests, then decode one token for every active one; returns how many."""
        going = []
        for i, request in enumerate(self.active):
            if request.cancelled():
                request.end("cancelled")
            else:
                going.append(i)
        self._keep(going)
        if not self.active or self.rows is None:
            return 0
        logits = self.rows.step(self.decoder, [r.tokens[-1] for r in self.active])
        decoded = len(self.active)
        self._keep([i for i, r in enumerate(self.active) if not r.advance(logits[i])])
        return decoded

    def fail(self, message: str) -> None:
        for request in self.active:
            request.end("error", message)
        self._keep([])

    def _keep(self, going: list[int]) -> None:
        if len(going) == len(self.active):
            return
        self.active = [self.active[i] for i in going]
        self.rows = self.rows.select(self.decoder, going, self.trim) if going and self.rows is not None else None


def generate(decoder: Decoder, requests: Sequence[Request]) -> list[Generation]:
    """Decode a batch of requests to the end (Engine.generate)."""
    decoding = Decoding(decoder)
    decoding.admit(requests, together=True)
    while decoding.active:
        decoding.step()
    return [r.result() for r in requests]


class ContinuousBatcher:
    """Requests from many callers decoded in one batch per step (``serve``): a request joins after its own prefill
    (prefilled alone, so its first token is what Engine.generate gives it) and leaves when it ends or is cancelled;
    at most ``max_rows`` are decoded at once, the others wait in order. Runs on its own thread."""

    def __init__(self, decoder: Decoder, max_rows: int = 8, on_step: Callable[[int], None] | None = None) -> None:
        self.decoding = Decoding(decoder, trim=True)
        self.max_rows = max(1, max_rows)
        self.on_step = on_step
        self._waiting: queue.Queue[Request] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pimoe-generate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request) -> None:
        if self._stop.is_set():
            raise PiMoEInputError("the generator is stopping; retry on another server")
        self._waiting.put(request)

    def stop(self, timeout: float | None = 30) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _admit_waiting(self) -> None:
        new: list[Request] = []
        while len(self.decoding.active) + len(new) < self.max_rows:
            try:
                request = self._waiting.get(timeout=0.05 if not (self.decoding.active or new) else 0)
            except queue.Empty:
                break
            if request.cancelled():
                request.end("cancelled")
            else:
                new.append(request)
        for request in new:
            try:
                self.decoding.admit([request])
            except Exception as exc:  # its prefill failed: that request ends with the error, the
                # batcher thread goes on (an exception escaping here would leave every client waiting)
                request.end("error", str(exc) if isinstance(exc, PiMoEError) else f"internal error: {exc!r}")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit_waiting()
                rows = self.decoding.step()
                if rows and self.on_step is not None:
                    self.on_step(rows)
            except Exception as exc:  # a step that failed: those requests end with the error, the
                # batcher thread goes on (an exception escaping here would leave every client waiting)
                self.decoding.fail(str(exc) if isinstance(exc, PiMoEError) else f"internal error: {exc!r}")
        self.decoding.fail("the server is stopping")
        while not self._waiting.empty():
            self._waiting.get().end("error", "the server is stopping")
