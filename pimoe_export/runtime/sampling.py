"""Choosing the next token from a row's logits: greedy, or sampling with temperature, top-k and top-p from a seeded
generator, written out so that the same seed gives the same tokens on every run and every backend.

Sampling, for one row (float64 throughout):

1. ``z = logits / temperature``;
2. top-k (k > 0): tokens whose z is below the k-th largest are dropped (ties with the k-th are kept, as Hugging Face's
   TopKLogitsWarper keeps them);
3. ``p = softmax(z)`` over the kept tokens;
4. top-p (< 1): tokens in order of decreasing p (ties: lower id first) are kept until their sum reaches top_p (the
   first is always kept); p is renormalised;
5. with ``u`` the row generator's next ``random()``, the token is the first one in that order whose cumulative p
   exceeds ``u``.

Greedy (temperature 0) is the argmax, the lowest id among equal maxima (numpy's and torch's argmax agree).
Each row has its own generator, seeded with (seed, row): a row's tokens do not depend on the other rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pimoe_export.errors import PiMoEInputError, RunError

#: the most new tokens one request may ask for without being told otherwise (CLI and serve default)
DEFAULT_MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class SamplingSettings:
    """How one request picks its tokens and when it stops (``stop``: strings, ``stop_token_ids``: token sequences;
    ``eos_token_ids``: None = the unit's)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[tuple[int, ...], ...] = ()
    eos_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        def integer(value: object) -> bool:
            return isinstance(value, int | np.integer) and not isinstance(value, bool)

        problems = []
        if not integer(self.max_new_tokens) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, int | float) or not math.isfinite(self.temperature) or \
                self.temperature < 0:
            problems.append(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature!r}")
        if not integer(self.top_k) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (1: off), got {self.top_p!r}")
        if self.seed is not None and (not integer(self.seed) or not 0 <= self.seed < 2**63):
            problems.append(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            problems.append(f"stop must be non-empty strings, got {self.stop!r}")
        if not all(seq and all(integer(t) and t >= 0 for t in seq) for seq in self.stop_token_ids):
            problems.append(f"stop_token_ids must be non-empty sequences of token ids, got {self.stop_token_ids!r}")
        if problems:
            raise PiMoEInputError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def row_generator(seed: int, row: int) -> np.random.Generator:
    """The generator of row ``row`` of a request seeded with ``seed``."""
    return np.random.Generator(np.random.PCG64([int(seed), int(row)]))


def fresh_seed() -> int:
    """A seed for a sampling request that gave none (reported back, so the run can be repeated)."""
    return int(np.random.SeedSequence().entropy % (2**63))


def choose(logits: np.ndarray, settings: SamplingSettings, generator: np.random.Generator | None) -> int:
    """The next token of one row from its logits [vocab] (see the module docstring)."""
    if np.isnan(logits).any() or np.isposinf(logits).any():
        raise RunError("the model produced NaN or +inf logits, so no next token can be chosen; check the unit with "
                       "`pimoe-export check` (an fp16 or INT8 unit may overflow where fp32 does not)")
    if settings.greedy:
        return int(np.argmax(logits))
    if generator is None:
        raise PiMoEInputError("sampling needs a seeded generator")
    z = logits.astype(np.float64) / float(settings.temperature)
    if settings.top_k and settings.top_k < z.size:
        kth = np.partition(z, z.size - settings.top_k)[z.size - settings.top_k]
        z = np.where(z < kth, -np.inf, z)
    z = z - np.max(z)
    p = np.exp(z)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")  # decreasing p, lower id first among equals
    ranked = p[order]
    if settings.top_p < 1:
        cumulative = np.cumsum(ranked)
        keep = int(np.searchsorted(cumulative, settings.top_p, side="left")) + 1
        ranked = ranked[:keep] / ranked[:keep].sum()
    cumulative = np.cumsum(ranked)
    index = int(np.searchsorted(cumulative, generator.random(), side="right"))
    return int(order[min(index, ranked.size - 1)])
