"""How generation batches and ends rows, on the toy numpy decoder of test_decoder_rows.py (no model): Engine.generate
prefills its prompts in one left-padded batch; a row ends at an EOS token of its settings (without a tokenizer
too); the serving batcher reports only steps that decoded rows, and trims the padding rows that leave no longer
need. Each against the decoder's own calls or each prompt run alone."""

from __future__ import annotations

import time

import numpy as np
import pytest
from test_decoder_rows import SPEC, toy_infer

from pimoe_export.errors import PiMoEInputError
from pimoe_export.runtime.decoder import ArrayDecoder
from pimoe_export.runtime.generation import ContinuousBatcher, Decoding, Request, generate
from pimoe_export.runtime.sampling import SamplingSettings

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 1, 2, 3]]


class Counting(ArrayDecoder):
    """The toy decoder, recording the (batch, sequence) of every call."""

    def __init__(self) -> None:
        super().__init__(toy_infer, SPEC, "float64", "float64")
        self.calls: list[tuple[int, int]] = []

    def forward(self, ids, mask, positions, cache, all_positions=False):
        self.calls.append(tuple(ids.shape))
        return super().forward(ids, mask, positions, cache, all_positions)


def requests(settings: SamplingSettings, prompts=PROMPTS) -> list[Request]:
    return [Request(i, list(p), settings, SPEC) for i, p in enumerate(prompts)]


def test_generate_prefills_the_prompts_in_one_batch() -> None:
    decoder = Counting()
    results = generate(decoder, requests(SamplingSettings(max_new_tokens=4, eos_token_ids=())))
    assert decoder.calls[0] == (3, 5)  # one left-padded batch of the three prompts
    assert decoder.calls[1:] == [(3, 1)] * 3  # then one token per row per step
    assert [len(r.token_ids) for r in results] == [4, 4, 4]


def test_a_row_ends_at_an_eos_token_of_its_settings_without_a_tokenizer() -> None:
    free = generate(Counting(), requests(SamplingSettings(max_new_tokens=6, eos_token_ids=())))
    tokens = free[1].token_ids
    at = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])  # a token new after the first
    eos = tokens[at]
    ended = generate(Counting(), requests(SamplingSettings(max_new_tokens=6, eos_token_ids=(eos,))))
    assert ended[1].token_ids == tokens[: at + 1] and ended[1].finish_reason == "eos" and ended[1].text is None
    for free_row, row in zip(free, ended, strict=True):  # every row ends at its own first EOS, or runs on
        cut = free_row.token_ids.index(eos) + 1 if eos in free_row.token_ids else None
        assert row.token_ids == free_row.token_ids[:cut]
        assert row.finish_reason == ("eos" if cut else "length")


def test_rows_that_leave_at_prefill_take_the_padding_only_they_needed_with_them() -> None:
    """With trim (the serving batcher's decoding), a row that ends at its first token leaves the batch, and the
    padding only it needed goes with it: the rows left keep a cache as wide as the longest of them."""
    decoding = Decoding(Counting(), trim=True)
    ending = Request(0, PROMPTS[1], SamplingSettings(max_new_tokens=1), SPEC)
    going = Request(1, PROMPTS[0], SamplingSettings(max_new_tokens=3, eos_token_ids=()), SPEC)
    decoding.admit([ending, going])
    assert decoding.active == [going]
    assert decoding.rows is not None and decoding.rows.mask.shape == (1, len(PROMPTS[0]))
    assert decoding.rows.mask.all()


def test_the_batcher_reports_only_steps_that_decoded_rows() -> None:
    steps: list[int] = []
    batcher = ContinuousBatcher(Counting(), max_rows=4, on_step=steps.append)
    batcher.start()
    try:
        time.sleep(0.2)  # idle: no step to report
        assert steps == []
        request = Request(0, PROMPTS[2], SamplingSettings(max_new_tokens=3, eos_token_ids=()), SPEC)
        batcher.submit(request)
        deadline = time.monotonic() + 30
        while request.finish_reason is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
    finally:
        batcher.stop()
    assert request.finish_reason == "length"
    assert steps and all(n >= 1 for n in steps) and sum(steps) == 2  # tokens 2 and 3 came from decode steps
    assert np.array_equal(request.tokens, generate(Counting(), [Request(0, PROMPTS[2], request.settings, SPEC)])[0]
                          .token_ids)


def test_the_batcher_decodes_at_most_max_rows_and_the_others_wait_their_turn() -> None:
    """Five requests queued before the batcher starts, max_rows 2: every decode call holds at most two rows, the
    batch is full while requests wait, and each request gets the tokens it gets alone."""
    decoder, steps = Counting(), []
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(5)]
    settings = SamplingSettings(max_new_tokens=4, eos_token_ids=())
    queued = [Request(i, list(p), settings, SPEC) for i, p in enumerate(prompts)]
    batcher = ContinuousBatcher(decoder, max_rows=2, on_step=steps.append)
    for request in queued:
        batcher.submit(request)
    batcher.start()
    try:
        deadline = time.monotonic() + 30
        while any(r.finish_reason is None for r in queued) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        batcher.stop()
    assert [r.finish_reason for r in queued] == ["length"] * 5
    assert max(b for b, _ in decoder.calls) == 2 and max(steps) == 2
    assert steps[0] == 2  # the first two were admitted together, the other three waited
    for request, prompt in zip(queued, prompts, strict=True):
        alone = generate(Counting(), [Request(0, list(prompt), settings, SPEC)])[0].token_ids
        assert np.array_equal(request.tokens, alone)


def test_a_cancelled_request_leaves_at_the_next_step_and_the_others_go_on() -> None:
    """Cancelled after its second token: the next step ends it once ("cancelled", no token), decodes only the other
    row, and nothing more is chosen for it; the other request gets the tokens it gets alone."""
    decoder, events, cancel = Counting(), [], [False]
    settings = SamplingSettings(max_new_tokens=5, eos_token_ids=())
    leaving = Request(0, PROMPTS[0], settings, SPEC, on_token=events.append, is_cancelled=lambda: cancel[0])
    staying = Request(1, PROMPTS[1], settings, SPEC)
    decoding = Decoding(decoder, trim=True)
    decoding.admit([leaving, staying])
    decoding.step()
    cancel[0] = True
    calls = len(decoder.calls)
    assert decoding.step() == 1
    assert decoding.active == [staying] and decoder.calls[calls:] == [(1, 1)]
    while decoding.active:
        decoding.step()
    assert leaving.finish_reason == "cancelled" and len(leaving.tokens) == 2
    ended = [(e.token_id is None, e.finish_reason) for e in events]
    assert ended == [(False, None), (False, None), (True, "cancelled")]
    alone = generate(Counting(), [Request(0, PROMPTS[1], settings, SPEC)])[0].token_ids
    assert staying.finish_reason == "length" and staying.tokens == alone


def test_a_request_may_fill_the_context_exactly_and_not_one_token_more() -> None:
    """A prompt and max_new_tokens that together make the context length (64) are served: every token is generated
    and no position fed to the decoder reaches the context length; one token more is refused before any decoding,
    saying how many new tokens the prompt leaves room for."""
    class Positions(Counting):
        def __init__(self) -> None:
            super().__init__()
            self.positions: list[int] = []

        def forward(self, ids, mask, positions, cache, all_positions=False):
            self.positions.extend(int(p) for p in np.asarray(positions).ravel())
            return super().forward(ids, mask, positions, cache, all_positions)

    prompt = [1, 2, 3]
    room = SPEC.context_length - len(prompt)
    decoder = Positions()
    (result,) = generate(decoder, requests(SamplingSettings(max_new_tokens=room, eos_token_ids=()), [prompt]))
    assert len(result.token_ids) == room and result.finish_reason == "length"
    assert max(decoder.positions) == SPEC.context_length - 2  # the last token generated is never fed back
    with pytest.raises(PiMoEInputError, match=rf"ask for at most {room} new tokens"):
        requests(SamplingSettings(max_new_tokens=room + 1, eos_token_ids=()), [prompt])
