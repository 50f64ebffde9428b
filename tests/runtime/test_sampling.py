"""Token choice and streamed text with known answers (pimoe_export/runtime/sampling.py, runtime/tokenizer.py)."""

from __future__ import annotations

import numpy as np
import pytest

from pimoe_export.errors import PiMoEInputError, RunError
from pimoe_export.runtime.sampling import SamplingSettings, choose, row_generator
from pimoe_export.runtime.tokenizer import TextStream

DRAWS = 20000


def frequencies(logits, settings: SamplingSettings, seed: int = 0) -> np.ndarray:
    generator = row_generator(seed, 0)
    counts = np.bincount([choose(np.asarray(logits, np.float32), settings, generator) for _ in range(DRAWS)],
                         minlength=len(logits))
    return counts / DRAWS


def test_greedy_is_the_first_argmax() -> None:
    assert choose(np.array([0.1, 3.0, 3.0, -1.0], np.float32), SamplingSettings(), None) == 1
    assert choose(np.array([-5.0, -4.0], np.float32), SamplingSettings(temperature=0.0), None) == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("settings", [SamplingSettings(), SamplingSettings(temperature=1.0)], ids=["greedy", "sample"])
def test_nan_or_positive_infinite_logits_are_an_error_not_a_token(bad: float, settings: SamplingSettings) -> None:
    logits = np.array([0.1, bad, 3.0, -1.0], np.float32)
    with pytest.raises(RunError, match="NaN or \\+inf logits"):
        choose(logits, settings, row_generator(0, 0))


def test_negative_infinite_logits_are_masked_tokens() -> None:
    logits = np.array([-np.inf, 0.0, -np.inf, 1.0], np.float32)
    assert choose(logits, SamplingSettings(), None) == 3
    assert frequencies(logits, SamplingSettings(temperature=1.0))[[0, 2]].sum() == 0


def test_sampling_follows_the_softmax_of_the_scaled_logits() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert np.allclose(frequencies(logits, SamplingSettings(temperature=1.0)), [0.5, 0.3, 0.15, 0.05], atol=0.012)
    # temperature 2: p ~ sqrt(p0)
    hot = np.sqrt([0.5, 0.3, 0.15, 0.05])
    assert np.allclose(frequencies(logits, SamplingSettings(temperature=2.0)), hot / hot.sum(), atol=0.012)


def test_top_k_keeps_the_k_largest_and_their_ties() -> None:
    assert np.allclose(frequencies([0.0, 1.0, 2.0, 3.0], SamplingSettings(temperature=1.0, top_k=1))[3], 1.0)
    kept = frequencies([3.0, 2.0, 2.0, 1.0], SamplingSettings(temperature=1.0, top_k=2))
    assert kept[3] == 0 and np.all(kept[:3] > 0)  # the tie with the 2nd largest stays
    expected = np.exp([3.0, 2.0, 2.0])
    assert np.allclose(kept[:3], expected / expected.sum(), atol=0.012)


def test_top_p_keeps_the_smallest_head_reaching_p() -> None:
    logits = np.log([0.5, 0.3, 0.2])
    assert np.allclose(frequencies(logits, SamplingSettings(temperature=1.0, top_p=0.7)), [0.625, 0.375, 0.0],
                       atol=0.012)
    assert frequencies(logits, SamplingSettings(temperature=1.0, top_p=0.01))[0] == 1.0


def test_top_p_breaks_ties_by_the_lower_id() -> None:
    """Equal probabilities rank lower id first (the module's step 4): with four equal tokens, top-p 0.5 keeps exactly
    ids 0 and 1, each drawn half the time."""
    kept = frequencies([1.0, 1.0, 1.0, 1.0], SamplingSettings(temperature=1.0, top_p=0.5))
    assert kept[2] == kept[3] == 0 and np.allclose(kept[:2], [0.5, 0.5], atol=0.012)
    assert frequencies([0.0, 2.0, 2.0, 2.0], SamplingSettings(temperature=1.0, top_p=0.01))[1] == 1.0


def test_the_same_seed_draws_the_same_tokens() -> None:
    logits = np.random.default_rng(3).standard_normal(50).astype(np.float32)
    settings = SamplingSettings(temperature=0.8, top_k=20, top_p=0.9)
    runs = [[choose(logits, settings, g) for _ in range(200)] for g in (row_generator(7, 0), row_generator(7, 0))]
    assert runs[0] == runs[1]
    other = [choose(logits, settings, row_generator(7, 1)) for _ in range(200)]
    assert other != runs[0]


def test_settings_are_checked() -> None:
    for kwargs in ({"max_new_tokens": 0}, {"temperature": float("nan")}, {"top_k": -1}, {"top_p": 1.5},
                   {"seed": 2**63}, {"stop": ("",)}, {"stop_token_ids": ((),)}):
        with pytest.raises(PiMoEInputError):
            SamplingSettings(**kwargs)


class CharTokenizer:
    """Token i is character PIECES[i]; a byte-level piece decodes to U+FFFD until its character is complete."""

    PIECES = ("a", "b", "c", "\xe2", "\x82\xac", " ", "d")

    def decode(self, ids):
        return b"".join(self.PIECES[i].encode("latin-1") for i in ids).decode("utf-8", errors="replace")


def test_text_stream_holds_back_incomplete_characters_and_stop_prefixes() -> None:
    stream = TextStream(CharTokenizer(), stop=("cd",))
    assert stream.push(0) == ("a", False)
    assert stream.push(3) == ("", False)  # first byte of the euro sign
    assert stream.push(4) == ("\u20ac", False)
    assert stream.push(2) == ("", False)  # "c" may begin "cd"
    assert stream.push(1) == ("cb", False)  # it did not
    assert stream.push(2) == ("", False)
    assert stream.push(6) == ("", True)  # "cd": the text ends before it
    assert stream.text == "a\u20accb"
    flushed = TextStream(CharTokenizer(), stop=("cd",))
    flushed.push(0)
    flushed.push(2)
    assert flushed.push(None) == ("c", False)  # the end of a row shows what was held back
