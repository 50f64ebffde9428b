"""A model source's random feeds (smoke runs, benchmarks) look like its calibration feeds: floats standard normal,
integers over the whole range the calibration uses, both ends included (a 0/1 mask gets ones, ids reach the
largest id seen)."""

from __future__ import annotations

import numpy as np
from torch import nn

from pimoe_export.model import create_from_preset
from pimoe_export.model.source import model_source


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.moe = create_from_preset("tiny", seed=3)

    def forward(self, hidden_states, attention_mask, token_ids):
        return self.moe(hidden_states)


def test_integer_inputs_cover_the_calibrations_range_ends_included() -> None:
    rng = np.random.default_rng(0)
    calibration = [{"hidden_states": rng.standard_normal((2, 6, 16)).astype(np.float32),
                    "attention_mask": np.ones((2, 6), np.int64),
                    "token_ids": np.array([[0, 3, 7, 7, 1, 2]] * 2, np.int64)}]
    calibration[0]["attention_mask"][1, 4:] = 0
    source = model_source(Wrapped(), calibration)
    feed = source.random_feed(4, 64, 1)
    assert {k: (v.shape, v.dtype) for k, v in feed.items()} == {
        "hidden_states": ((4, 64, 16), np.float32), "attention_mask": ((4, 64), np.int64),
        "token_ids": ((4, 64), np.int64)}
    assert set(np.unique(feed["attention_mask"])) == {0, 1}
    assert feed["token_ids"].min() == 0 and feed["token_ids"].max() == 7
    zero = model_source(Wrapped(), [{**calibration[0], "token_ids": np.zeros((2, 6), np.int64)}])
    assert (zero.random_feed(2, 8, 1)["token_ids"] == 0).all()  # a range of one value: that value
