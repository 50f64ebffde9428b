"""Edges of the Hugging Face side that the family and moefy tests pass by: a DBRX or Granite config's activation,
the fidelity measure over several feeds (against a numpy computation of the same definition), and a decoder
directory's source (the importer of its family, its seeded evaluation feeds)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from pimoe_export.hf.families import _dbrx_config, _granite_config


def _dbrx(act_fn) -> SimpleNamespace:
    ffn = SimpleNamespace(ffn_act_fn=act_fn, moe_num_experts=4, moe_top_k=2, ffn_hidden_size=24,
                          moe_normalize_expert_weights=1.0)
    return SimpleNamespace(d_model=16, ffn_config=ffn)


def test_a_dbrx_activation_without_a_name_is_silu_as_in_hugging_face() -> None:
    """DbrxFFNConfig's ffn_act_fn is a dict whose "name" defaults to silu."""
    assert _dbrx_config(_dbrx({})).experts.activation == "silu"
    assert _dbrx_config(_dbrx({"name": "gelu"})).experts.activation == "gelu"
    assert _dbrx_config(_dbrx(None)).experts.activation == "silu"


@pytest.mark.parametrize("family", ["granitemoe", "granitemoeshared"])
@pytest.mark.parametrize(("hidden_act", "contract"), [("gelu", "gelu"), ("relu", "relu"), ("silu", "silu")])
def test_a_granite_config_keeps_its_activation(family, hidden_act, contract) -> None:
    c = SimpleNamespace(hidden_act=hidden_act, hidden_size=16, num_local_experts=4, num_experts_per_tok=2,
                        intermediate_size=24, shared_intermediate_size=8)
    config = _granite_config(family)(c)
    assert config.experts.activation == contract
    if family == "granitemoeshared":
        assert config.shared.activation == contract and config.shared.intermediate_size == 8
    else:
        assert config.shared is None


class _Encoder(nn.Module):
    """An encoder stand-in: last_hidden_state = a fixed embedding of the ids (scaled by ``scale``)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(last_hidden_state=self.table[input_ids])


def test_embedding_fidelity_over_several_feeds_is_its_definition() -> None:
    """Cosine of mean-pooled embeddings per sentence (mean, min) and the relative L2 of the token states over the
    valid positions of every feed together, computed here in numpy."""
    from pimoe_export.hf.moefy import embedding_fidelity

    g = torch.Generator().manual_seed(0)
    ref_table = torch.randn(20, 6, generator=g)
    model_table = ref_table + 0.3 * torch.randn(20, 6, generator=g)
    feeds = [{"input_ids": torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])},
             {"input_ids": torch.tensor([[7, 8, 9]]), "attention_mask": torch.tensor([[1, 1, 1]])},
             {"input_ids": torch.tensor([[10, 11]])}]  # no mask: every position counts
    got = embedding_fidelity(_Encoder(model_table), _Encoder(ref_table), feeds)
    cos, err, norm = [], 0.0, 0.0
    for feed in feeds:
        ids = feed["input_ids"].numpy()
        mask = feed.get("attention_mask", torch.ones_like(feed["input_ids"])).numpy().astype(bool)
        for row, valid in zip(ids, mask, strict=True):
            a, b = model_table.numpy()[row[valid]].astype(np.float64), ref_table.numpy()[row[valid]].astype(np.float64)
            pa, pb = a.mean(axis=0), b.mean(axis=0)
            cos.append(pa @ pb / np.linalg.norm(pa) / np.linalg.norm(pb))
            err += float(((a - b) ** 2).sum())
            norm += float((b ** 2).sum())
    assert got["sentences"] == 4
    assert got["embedding_cosine_mean"] == pytest.approx(np.mean(cos), rel=1e-5)
    assert got["embedding_cosine_min"] == pytest.approx(np.min(cos), rel=1e-5)
    assert got["token_state_rel_l2"] == pytest.approx((err / norm) ** 0.5, rel=1e-5)


def test_a_decoder_directory_is_imported_by_its_family_with_seeded_feeds(tiny_decoder) -> None:
    from pimoe_export.hf import importers
    from pimoe_export.hf.decoder import CALIBRATION_SHAPES, CHECK_SHAPES

    directory = tiny_decoder("mixtral")
    importer = importers.importer_for(directory)
    assert importer.load is importers.decoder_source and "Hugging Face" in importer.name
    assert importer.recognises(directory)
    source = importers.load_source(directory, seed=3)
    vocab = int(source.module.config.vocab_size)
    for feeds, shapes in ((source.evaluation, CHECK_SHAPES), (source.calibration().feeds, CALIBRATION_SHAPES)):
        assert [f["input_ids"].shape for f in feeds] == [(b, s) for b, s, _ in shapes]
        assert all(f["input_ids"].min() >= 0 and f["input_ids"].max() < vocab for f in feeds)
    # the held-out feeds are not the calibration feeds, and the seed chooses both
    assert not np.array_equal(source.evaluation[0]["input_ids"], source.calibration().feeds[0]["input_ids"][:1, :5])
    again = importers.load_source(directory, seed=3)
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(again.evaluation, source.evaluation,
                                                                              strict=True))
    other = importers.load_source(directory, seed=4)
    assert not all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(other.evaluation,
                                                                                  source.evaluation, strict=True))
    # the source's random feed of a (batch, sequence): the family's seeded decoder feed, unpadded
    from pimoe_export.hf.decoder import random_decoder_feeds

    feed = source.random_feed(2, 5, 11)
    want = random_decoder_feeds(vocab, 11, ((2, 5, "none"),), source.module.spec)[0]
    assert set(feed) == set(want) and all(np.array_equal(feed[k], want[k]) for k in want)
    assert feed["input_ids"].shape == (2, 5) and feed["attention_mask"].all()
    described = ("seeded random token ids: calibration right- and left-padded, checks with no, right "
                 "and left padding (no text given)")
    assert source.calibration().description == described


def test_a_decoders_calibration_text_is_checked_before_anything_is_written(tiny_decoder, tmp_path) -> None:
    """check_source (what export and pipeline run before their first output): no text is fine; a text file that
    is not there is refused naming it."""
    from pimoe_export.errors import PiMoEInputError
    from pimoe_export.hf import importers

    directory = tiny_decoder("mixtral")
    importers.check_source(directory, None)
    missing = tmp_path / "no-such-text.txt"
    with pytest.raises(PiMoEInputError, match=re.escape(str(missing))):
        importers.check_source(directory, missing)


def test_decoder_feed_positions_count_each_rows_real_tokens_from_zero() -> None:
    """position_ids as Hugging Face's generate makes them: each real token's count of real tokens before it (left
    padding starts a row at 0, a hole in the mask does not advance it); padded positions 0. Hand-written answers."""
    from pimoe_export.hf.decoder import decoder_feed, positions

    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 0, 1, 1]])
    want = np.array([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 2, 0, 0], [0, 0, 0, 1, 2]])
    got = positions(mask)
    assert got.dtype == np.int64 and np.array_equal(got, want)
    feed = decoder_feed(np.ones((4, 5), np.int64), mask)
    assert np.array_equal(feed["position_ids"], want) and feed["attention_mask"].dtype == np.int64
