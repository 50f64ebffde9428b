"""The whole-model check's sentence-embedding criterion on constructed inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from pimoe_export.interface import MODEL_TOLERANCES, TOLERANCES, tolerances_for
from pimoe_export.validate.compare import Compared, verdict
from pimoe_export.validate.metrics import pooled_embedding_cosine


def test_pooled_cosine_known_angles_and_padding() -> None:
    ref = np.zeros((3, 4, 2))
    out = np.zeros((3, 4, 2))
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    ref[0, :2] = [[1, 0], [1, 0]]
    out[0, :2] = [[1, 0], [1, 2]]  # pooled (1, 1) vs (1, 0): cos 45 degrees
    ref[1, 0], out[1, 0] = [0, 3], [0, -5]  # opposite
    ref[:, 2:] = 1e6  # padded positions: must not count
    out[:, 2:] = -7e6
    cos = pooled_embedding_cosine(ref, out, mask)
    np.testing.assert_allclose(cos, [1 / np.sqrt(2), -1.0, 0.0], rtol=0, atol=1e-12)  # no valid token: 0
    assert pooled_embedding_cosine(ref, ref, np.ones((3, 4)))[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\[B, S, H\]"):
        pooled_embedding_cosine(ref[0], out[0], mask[0])


def _outputs(states: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [{"last_hidden_state": states, "layer/expert_ids": np.zeros((*states.shape[:2], 2), np.int32),
             "layer/expert_weights": np.full((*states.shape[:2], 2), 0.5, np.float32)}]


def test_verdict_holds_the_mean_embedding_cosine_to_the_model_tolerance() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((8, 6, 16))
    mask = np.ones((8, 6), np.int64)
    compared = Compared("last_hidden_state", ("last_hidden_state", "layer/expert_weights"),
                        (("layer/expert_ids", "layer/expert_weights"),))
    bound = tolerances_for("w8a8", moe_layers=2)
    assert bound is MODEL_TOLERANCES["w8a8"] and bound.min_embedding_cosine == 0.999
    # one sequence rotated so that its pooled cosine is 0.99, the others exact: mean = (7 + 0.99) / 8 < 0.999
    bad = ref.copy()
    pooled = bad[0].mean(0)
    orth = rng.standard_normal(16)
    orth -= orth @ pooled / (pooled @ pooled) * pooled
    orth *= np.linalg.norm(pooled) / np.linalg.norm(orth)
    bad[0] += (np.tan(np.arccos(0.99)) * orth)[None, :]
    got = verdict(_outputs(ref), _outputs(bad), bound, True, compared, [mask])
    assert got.embedding is not None
    assert got.embedding["min_cosine"] == pytest.approx(0.99, abs=1e-9)
    assert got.embedding["mean_cosine"] == pytest.approx((7 + 0.99) / 8, abs=1e-9)
    assert any("embedding cosine" in f for f in got.failures)
    # exact outputs pass the embedding criterion
    ok = verdict(_outputs(ref), _outputs(ref), bound, True, compared, [mask])
    assert ok.embedding["mean_cosine"] == pytest.approx(1.0) and not ok.failures
    # without masks (a layer, or a model without attention_mask) there is no embedding criterion
    assert verdict(_outputs(ref), _outputs(bad), bound, True, compared).embedding is None


def test_bare_layers_keep_their_tolerances() -> None:
    for precision in ("fp32", "fp16", "w8a8", "w8a8_dynamic"):
        assert tolerances_for(precision) is TOLERANCES[precision]
    assert tolerances_for("fp32", moe_layers=2) is TOLERANCES["fp32"]
    assert TOLERANCES["fp32"].min_embedding_cosine is None  # falls back to min_cosine


def test_embedding_agreement_needs_states_over_the_mask() -> None:
    from pimoe_export.validate.compare import embedding_agreement

    states = [{"y": np.ones((2, 5, 4))}]
    assert embedding_agreement(states, states, "y", [np.ones((2, 4))]) is None  # sequence lengths differ
    assert embedding_agreement([{"y": np.ones((2, 5))}], [{"y": np.ones((2, 5))}], "y", [np.ones((2, 5))]) is None
    half = [{"y": np.concatenate([np.ones((2, 5, 2)), np.zeros((2, 5, 2))], axis=-1)}]
    other = [{"y": np.concatenate([np.ones((2, 5, 2)), np.ones((2, 5, 2))], axis=-1)}]
    got = embedding_agreement(half, other, "y", [np.ones((2, 5))])
    assert got == {"output": "y", "sequences": 2, "mean_cosine": pytest.approx(1 / np.sqrt(2)),
                   "min_cosine": pytest.approx(1 / np.sqrt(2))}


def test_pooled_cosine_zero_embeddings_and_small_norms() -> None:
    """The docstring's zero cases, each on its own sequence, and pooled vectors of norm <= 1 (a cosine is not
    clamped by the norms' size): both pooled embeddings zero -> 1; exactly one zero (the other of norm exactly 1)
    -> 0; norms 0.5 and 0.5 -> (0.3*0.4 + 0.4*0.3) / 0.25 = 0.96; norm 1 against norm 0.5 -> 0.6."""
    ref = np.zeros((5, 2, 2))
    out = np.zeros((5, 2, 2))
    mask = np.ones((5, 2))
    # sequence 0: both zero over valid tokens (the tokens cancel: +v and -v)
    ref[0] = [[2.0, 1.0], [-2.0, -1.0]]
    out[0] = [[0.5, 0.5], [-0.5, -0.5]]
    ref[1] = [[0.0, 1.0], [0.0, 1.0]]  # pooled (0, 1), norm 1; out zero
    out[2] = [[1.0, 0.0], [1.0, 0.0]]  # ref zero; pooled out (1, 0), norm 1
    ref[3], out[3] = [[0.3, 0.4], [0.3, 0.4]], [[0.4, 0.3], [0.4, 0.3]]
    ref[4], out[4] = [[1.0, 0.0], [1.0, 0.0]], [[0.3, 0.4], [0.3, 0.4]]
    cos = pooled_embedding_cosine(ref, out, mask)
    np.testing.assert_allclose(cos, [1.0, 0.0, 0.0, 0.96, 0.6], rtol=0, atol=1e-12)
    # and the reverse direction: the metric is symmetric
    np.testing.assert_allclose(pooled_embedding_cosine(out, ref, mask), cos, rtol=0, atol=1e-12)


def test_pooled_cosine_refuses_states_of_different_shapes() -> None:
    """[2, 4, 3] against [2, 4, 1] would broadcast into a number; each mismatch alone is refused."""
    ref = np.ones((2, 4, 3))
    mask = np.ones((2, 4))
    with pytest.raises(ValueError, match=r"\[B, S, H\] states and a \[B, S\] mask"):
        pooled_embedding_cosine(ref, np.ones((2, 4, 1)), mask)  # states differ, mask right
    with pytest.raises(ValueError, match=r"\[B, S, H\]"):
        pooled_embedding_cosine(ref, ref, np.ones((2, 3)))  # mask of another length
    with pytest.raises(ValueError, match=r"\[B, S, H\]"):
        pooled_embedding_cosine(np.ones((2, 4)), np.ones((2, 4)), mask)  # 2-D states, mask of their shape


def test_embedding_agreement_pairs_every_feed_and_an_empty_batch() -> None:
    from pimoe_export.validate.compare import embedding_agreement

    two = [{"y": np.ones((1, 3, 2))}, {"y": np.ones((1, 3, 2))}]
    masks = [np.ones((1, 3)), np.ones((1, 3))]
    assert embedding_agreement(two, two, "y", masks)["sequences"] == 2
    with pytest.raises(ValueError):  # an actual output missing for the second feed is an error, not skipped
        embedding_agreement(two, two[:1], "y", masks)
    # a batch of zero sequences: nothing disagrees (the same convention as error_stats of empty arrays)
    empty = [{"y": np.zeros((0, 3, 2))}]
    assert embedding_agreement(empty, empty, "y", [np.zeros((0, 3))]) == {
        "output": "y", "sequences": 0, "mean_cosine": 1.0, "min_cosine": 1.0}


def test_verdict_embedding_bound_falls_back_and_is_inclusive() -> None:
    """Without ``min_embedding_cosine`` the bound is ``min_cosine``; a mean equal to the bound passes. The states
    are chosen so every cosine is exactly 1.0 in floating point (pooled (3, 4): 25 / (5 * 5))."""
    import dataclasses

    from pimoe_export.interface import TOLERANCES

    states = np.tile(np.array([3.0, 4.0]), (2, 3, 1))  # [2, 3, 2]
    mask = np.ones((2, 3))
    compared = Compared("last_hidden_state", ("last_hidden_state", "layer/expert_weights"),
                        (("layer/expert_ids", "layer/expert_weights"),))
    fp32 = TOLERANCES["fp32"]
    got = verdict(_outputs(states), _outputs(states), fp32, True, compared, [mask])
    assert got.embedding["required_mean_cosine"] == fp32.min_cosine and not got.failures
    exact = dataclasses.replace(fp32, min_embedding_cosine=1.0)
    got = verdict(_outputs(states), _outputs(states), exact, True, compared, [mask])
    assert got.embedding["mean_cosine"] == 1.0 and not got.failures
    above = dataclasses.replace(fp32, min_embedding_cosine=float(np.nextafter(1.0, 2.0)))
    assert any("embedding cosine" in f for f in verdict(_outputs(states), _outputs(states), above, True, compared,
                                                         [mask]).failures)
