"""Seed 0 is a seed like any other: a sampled request with seed 0 keeps it, says so, and repeats its tokens (on the
toy decoder of test_decoder_rows.py)."""

from __future__ import annotations

from test_decoder_rows import SPEC, toy_infer

from pimoe_export.runtime.decoder import ArrayDecoder
from pimoe_export.runtime.generation import Request, generate
from pimoe_export.runtime.sampling import SamplingSettings


def sampled(seed: int | None) -> list:
    settings = SamplingSettings(max_new_tokens=12, temperature=2.0, seed=seed, eos_token_ids=())
    decoder = ArrayDecoder(toy_infer, SPEC, "float64", "float64")
    return generate(decoder, [Request(i, p, settings, SPEC) for i, p in enumerate([[1, 2, 3], [4, 5]])])


def test_seed_0_is_kept_and_repeats() -> None:
    first, again = sampled(0), sampled(0)
    assert [r.seed for r in first] == [0, 0]
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    others = [sampled(seed) for seed in (1, 2, 3)]  # seed 0's tokens are its own, not any seed's
    assert all([r.token_ids for r in other] != [r.token_ids for r in first] for other in others)
