"""reset_stats starts the lifetime routing statistics again: after it, a layer's statistics are those of a fresh
layer of the same weights that saw only what came after."""

from __future__ import annotations

import torch

from pimoe_export.model import create_from_preset


def test_statistics_after_a_reset_are_a_fresh_layers() -> None:
    gen = torch.Generator().manual_seed(0)
    before, after = torch.randn(2, 9, 16, generator=gen), torch.randn(1, 7, 16, generator=gen)
    used, fresh = create_from_preset("tiny", seed=3), create_from_preset("tiny", seed=3)
    with torch.no_grad():
        used(before)
        used.reset_stats()
        used(after)
        fresh(after)
    assert used.get_system_stats() == fresh.get_system_stats()
    assert used.get_system_stats()["total_tokens"] == 7
