"""The batch state of generation (pimoe_export.runtime.decoder.Rows) on a toy numpy decoder, against each prompt
run alone with positions written out by hand.

The toy decoder is an attention-free stand-in whose cache holds one key per position, key = f(token, position), and
whose logits are a masked sum over the cache: a left-padded batch gives each row the logits of that row alone only
when the padding is masked, the positions count the real tokens, and the cache rows and columns travel with their
row through prefill, step, select (with and without trimming shared padding) and merge. The Hugging Face
comparisons of test_generate.py (slow) check the same on real decoders."""

from __future__ import annotations

import numpy as np
import pytest

from pimoe_export.interface import (
    DECODER_LOGITS,
    DECODER_POSITIONS_INPUT,
    MODEL_IDS_INPUT,
    MODEL_MASK_INPUT,
    DecoderSpec,
)
from pimoe_export.runtime.decoder import ArrayDecoder, Rows, prompt_positions

VOCAB, HEADS, DIM = 11, 1, 3
SPEC = DecoderSpec(model_type="toy", num_layers=1, num_attention_heads=1, num_kv_heads=HEADS, head_dim=DIM,
                   hidden_size=DIM, vocab_size=VOCAB, context_length=64, eos_token_ids=(0,), pad_token_id=10)
PAST, PRESENT = SPEC.past_names, SPEC.present_names
W = np.random.default_rng(0).standard_normal((DIM, VOCAB))


def _key(token: int, position: int) -> np.ndarray:
    return np.array([np.sin(token + 0.3 * position), np.cos(0.7 * token), 0.1 * position + 0.01 * token])


def toy_infer(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ids, mask, positions = feeds[MODEL_IDS_INPUT], feeds[MODEL_MASK_INPUT], feeds[DECODER_POSITIONS_INPUT]
    assert positions.dtype == np.int64 and mask.shape[1] == feeds[PAST[0]].shape[2] + ids.shape[1]
    keys = np.array([[_key(t, p) for t, p in zip(row, pos, strict=True)] for row, pos in zip(ids, positions,
                                                                                            strict=True)])
    present = np.concatenate([feeds[PAST[0]], keys[:, None]], axis=2)  # [B, 1, P + S, DIM]
    logits = np.zeros((*ids.shape, VOCAB))
    for s in range(ids.shape[1]):  # causal: position s sees the cache up to itself, padding masked out
        seen = present[:, 0, : feeds[PAST[0]].shape[2] + s + 1] * mask[:, : feeds[PAST[0]].shape[2] + s + 1, None]
        logits[:, s] = seen.sum(axis=1) @ W
    return {DECODER_LOGITS: logits, **{name: present for name in PRESENT}}


def alone(prompt: list[int], then: list[int]) -> list[np.ndarray]:
    """Logits after the prompt and after each next token, the prompt run unpadded at positions 0, 1, ... (the
    decoder returns float32 logits: compared at float32 rounding)."""
    out = []
    keys = [_key(t, p) for p, t in enumerate(prompt)]
    out.append(np.sum(keys, axis=0) @ W)
    for i, t in enumerate(then):
        keys.append(_key(t, len(prompt) + i))
        out.append(np.sum(keys, axis=0) @ W)
    return out


@pytest.fixture
def decoder() -> ArrayDecoder:
    return ArrayDecoder(toy_infer, SPEC, "float64", "float64")


def test_prompt_positions_count_the_real_tokens_before_each_one() -> None:
    rng = np.random.default_rng(3)
    lengths = [5, 1, 3, 0, 5]
    mask = np.array([[0] * (5 - n) + [1] * n for n in lengths])
    positions = prompt_positions(mask)
    expected = [[1 if not m else sum(row[:j]) for j, m in enumerate(row)] for row in mask.tolist()]
    assert positions.dtype == np.int64 and positions.tolist() == expected
    mask = rng.integers(0, 2, (4, 9))  # any mask, as Hugging Face computes it: cumsum - 1, 1 at padding
    expected = [[1 if not m else sum(row[:j]) for j, m in enumerate(row)] for row in mask.tolist()]
    assert prompt_positions(mask).tolist() == expected


def test_a_left_padded_batch_gives_each_row_its_logits_alone(decoder) -> None:
    prompts = [[1, 2, 3, 4], [5], [6, 7]]
    rows, logits = Rows.prefill(decoder, prompts)
    then = [[3, 4], [9, 1], [2, 2]]
    got = [[logits[i]] for i in range(3)]
    for step in range(2):
        logits = rows.step(decoder, [t[step] for t in then])
        for i in range(3):
            got[i].append(logits[i])
    for i, prompt in enumerate(prompts):
        np.testing.assert_allclose(got[i], alone(prompt, then[i]), rtol=1e-5, atol=1e-5)
    assert rows.positions.tolist() == [6, 3, 4]  # the next token's position: the real tokens so far


@pytest.mark.parametrize("trim", [False, True])
def test_rows_that_leave_and_batches_that_merge_keep_every_rows_logits(decoder, trim) -> None:
    prompts = [[1, 2, 3, 4, 5, 6], [5], [6, 7]]
    rows, _ = Rows.prefill(decoder, prompts)
    rows.step(decoder, [1, 2, 3])
    kept = rows.select(decoder, [2, 1], trim=trim)  # the long row leaves; order as given
    assert kept.positions.tolist() == [3, 2]
    # with trim the padding both remaining rows share (the long prompt's width) is dropped, cache included
    width = 3 if trim else 7
    assert kept.mask.tolist() == [[0] * (width - 3) + [1] * 3, [0] * (width - 2) + [1] * 2]
    assert all(c.shape[2] == width for c in decoder.to_numpy(kept.cache))
    new, first = Rows.prefill(decoder, [[8, 8, 8, 8]])
    merged = Rows.merge(decoder, [kept, new])
    assert merged.mask.shape == (3, max(width, 4)) and merged.positions.tolist() == [3, 2, 4]
    logits = merged.step(decoder, [4, 4, 9])
    np.testing.assert_allclose(logits[0], alone([6, 7], [3, 4])[-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[1], alone([5], [2, 4])[-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[2], alone([8, 8, 8, 8], [9])[-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(first[0], alone([8, 8, 8, 8], [])[0], rtol=1e-5, atol=1e-5)
