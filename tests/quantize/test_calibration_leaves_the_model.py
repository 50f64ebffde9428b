"""Calibration reads a model and leaves it as it was: its routing statistics switch (on by default, so a user's
counts keep growing after a quantize) and the counts themselves."""

from __future__ import annotations

import torch

from pimoe_export.model import create_from_preset
from pimoe_export.quantize.calibrate import collect_stats


def test_collect_stats_restores_the_statistics_switch_and_counts() -> None:
    batches = [torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1))]
    model = create_from_preset("tiny", seed=3)
    assert model.track_stats is True  # the default
    model.reset_stats()
    collect_stats(model, batches, smooth_alpha=0.5)
    assert model.track_stats is True and int(model.total_tokens) == 0  # calibration counts nothing
    with torch.no_grad():
        model(batches[0])
    assert int(model.total_tokens) == 32  # and the user's own runs are counted again
    model.track_stats = False
    collect_stats(model, batches)
    assert model.track_stats is False
