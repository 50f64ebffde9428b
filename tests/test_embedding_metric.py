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
    bound = tolerances_for("w8a8", whole_model=True)
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
    assert tolerances_for("fp32", whole_model=True) is TOLERANCES["fp32"]
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
