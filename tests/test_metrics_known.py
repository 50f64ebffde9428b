"""Parity metrics and calibration thresholds on constructed inputs whose answer is worked out by hand.

The other tests only see these functions where they cannot be wrong (identical routings, outputs that agree): a
metric that reports 100% agreement or zero error for everything passes them. Here every input is built so that
each statistic has a known, non-trivial value (fast, numpy only; these are the tests scripts/mutate_py.sh runs
against the mutants of pimoe_export/validate and the calibration thresholds).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pimoe_export.interface import (
    LAYER_EXPERT_IDS,
    LAYER_EXPERT_WEIGHTS,
    LAYER_OUTPUT,
    GraphInterface,
    TensorInterface,
    Tolerances,
    element_count,
    layer_interface,
    sm_names,
    tolerances_for,
    version_tuple,
)
from pimoe_export.quantize.calibrate import BINS, QLEVELS, LayerStats, smoothing_factors, threshold
from pimoe_export.validate.compare import (
    LAYER_COMPARED,
    Compared,
    compare_settings,
    per_expert_error,
    polygraphy_cli_args,
    verdict,
)
from pimoe_export.validate.metrics import ErrorStats, error_stats, merge_stats, routing_agreement


# ------------------------------------------------------------------------------------------ error_stats
def test_error_stats_hand_computed() -> None:
    ref = np.array([[3.0, -4.0], [0.0, 0.0]], np.float32)  # |ref| = 5, max|ref| = 4 (a negative value)
    out = np.array([[3.5, -5.0], [0.0, 0.0]], np.float32)  # diff = (0.5, -1, 0, 0)
    s = error_stats(ref, out)
    assert s.max_abs == pytest.approx(1.0)
    assert s.mean_abs == pytest.approx(1.5 / 4)
    assert s.rel_l2 == pytest.approx(math.sqrt(1.25) / 5.0)
    assert s.cosine == pytest.approx((10.5 + 20.0) / (5.0 * math.sqrt(3.5**2 + 25.0)))
    assert s.ref_max_abs == pytest.approx(4.0)
    assert s.elements == 4
    assert s.to_dict()["elements"] == 4 and set(s.to_dict()) == {
        "max_abs", "mean_abs", "rel_l2", "cosine", "ref_max_abs", "elements"}


def test_error_stats_opposite_and_orthogonal() -> None:
    assert error_stats(np.array([1.0, 2.0]), np.array([-1.0, -2.0])).cosine == pytest.approx(-1.0)
    assert error_stats(np.array([1.0, 0.0]), np.array([0.0, 1.0])).cosine == pytest.approx(0.0, abs=1e-15)
    # float64 accumulation: in float32 1e8 + 1 == 1e8 and the difference would vanish
    s = error_stats(np.array([1e8], np.float64), np.array([1e8 + 1.0], np.float64))
    assert s.max_abs == 1.0


def test_error_stats_zero_norms_and_empty() -> None:
    both_zero = error_stats(np.zeros(3), np.zeros(3))
    assert (both_zero.cosine, both_zero.rel_l2, both_zero.max_abs) == (1.0, 0.0, 0.0)
    ref_zero = error_stats(np.zeros(2), np.array([3.0, 4.0]))
    assert ref_zero.cosine == 0.0
    assert ref_zero.rel_l2 == pytest.approx(5.0)  # absolute L2 when the reference is all zero
    out_zero = error_stats(np.array([3.0, 4.0]), np.zeros(2))
    assert out_zero.cosine == 0.0 and out_zero.rel_l2 == pytest.approx(1.0)
    empty = error_stats(np.zeros((0, 4)), np.zeros((0, 4)))
    assert empty == ErrorStats(0.0, 0.0, 0.0, 1.0, 0.0, 0)


def test_error_stats_nan_and_shape() -> None:
    s = error_stats(np.array([1.0, 2.0]), np.array([1.0, np.nan]))
    assert math.isnan(s.max_abs) and math.isnan(s.rel_l2) and math.isnan(s.cosine)
    with pytest.raises(ValueError, match=r"shape mismatch: reference \(2, 3\) vs actual \(2, 2\)"):
        error_stats(np.zeros((2, 3)), np.zeros((2, 2)))


def test_error_stats_refuses_same_size_different_shape() -> None:
    """A [3, 2] output against a [2, 3] reference (a transposed layout) has the same six elements: raveled, the
    two would be compared element by element as if the layouts agreed. It is refused, naming both shapes."""
    ref = np.arange(6.0).reshape(2, 3)
    with pytest.raises(ValueError, match=r"reference \(2, 3\) vs actual \(3, 2\).*same shape"):
        error_stats(ref, ref.reshape(3, 2))  # raveled these are identical: no error at all would be reported
    with pytest.raises(ValueError, match=r"reference \(6,\) vs actual \(2, 3\)"):
        error_stats(ref.ravel(), ref)
    # equal shapes still compare: one element changed by 1 (|ref| = sqrt(55))
    out = ref.copy()
    out[1, 0] += 1.0
    s = error_stats(ref, out)
    assert (s.max_abs, s.elements) == (1.0, 6)
    assert s.rel_l2 == pytest.approx(1.0 / math.sqrt(55.0))


def test_error_stats_small_reference_is_still_relative() -> None:
    """|ref| = 0.5: relative L2 divides by it (an absolute fallback only when the reference is exactly zero)."""
    s = error_stats(np.array([0.3, 0.4]), np.array([0.3, 0.5]))
    assert s.rel_l2 == pytest.approx(0.1 / 0.5)


# ------------------------------------------------------------------------------------------ routing agreement
def test_routing_agreement_counts_sets_not_order() -> None:
    ref = np.array([[0, 1], [2, 3], [1, 0], [4, 5]])
    got = np.array([[1, 0], [2, 4], [1, 0], [5, 4]])  # same set, one expert changed, identical, same set
    assert routing_agreement(ref, got) == pytest.approx(0.75)
    assert routing_agreement(got, ref) == pytest.approx(0.75)


def test_routing_agreement_batched_and_top1() -> None:
    ref = np.arange(12).reshape(2, 3, 2) % 5  # [batch, sequence, k]
    got = ref.copy()
    got[1, 2] = [4, 4]  # one token of six differs
    got[0, 0] = got[0, 0, ::-1]  # a swap within one token does not count
    assert routing_agreement(ref, got) == pytest.approx(5 / 6)
    top1 = np.array([[0], [1], [2], [3], [4]])
    assert routing_agreement(top1, np.array([[0], [1], [0], [0], [4]])) == pytest.approx(0.6)
    assert routing_agreement(top1, (top1 + 1) % 5) == 0.0


def test_routing_agreement_empty_and_shape() -> None:
    assert routing_agreement(np.zeros((0, 2), np.int32), np.zeros((0, 2), np.int32)) == 1.0
    with pytest.raises(ValueError, match=r"routing shapes differ: \(4, 2\) vs \(4, 1\)"):
        routing_agreement(np.zeros((4, 2)), np.zeros((4, 1)))
    with pytest.raises(ValueError, match="routing shapes differ"):
        routing_agreement(np.zeros((4, 2)), np.zeros((3, 2)))


# ------------------------------------------------------------------------------------------ merge_stats
def test_merge_stats_weighted() -> None:
    a = ErrorStats(max_abs=1.0, mean_abs=0.5, rel_l2=0.1, cosine=0.99, ref_max_abs=2.0, elements=10)
    b = ErrorStats(max_abs=3.0, mean_abs=0.2, rel_l2=0.3, cosine=0.9, ref_max_abs=1.0, elements=30)
    m = merge_stats([a, b])
    assert m.max_abs == 3.0 and m.ref_max_abs == 2.0 and m.cosine == 0.9 and m.elements == 40
    assert m.mean_abs == pytest.approx((0.5 * 10 + 0.2 * 30) / 40)
    assert m.rel_l2 == pytest.approx(math.sqrt((0.01 * 10 + 0.09 * 30) / 40))
    assert merge_stats([b, a]) == m
    assert merge_stats([]) == ErrorStats(0.0, 0.0, 0.0, 1.0, 0.0, 0)


def test_merge_stats_matches_whole_array() -> None:
    rng = np.random.default_rng(3)
    ref, out = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    whole = error_stats(ref, out)
    merged = merge_stats([error_stats(ref[:2], out[:2]), error_stats(ref[2:], out[2:])])
    assert merged.max_abs == whole.max_abs and merged.ref_max_abs == whole.ref_max_abs
    assert merged.mean_abs == pytest.approx(whole.mean_abs) and merged.elements == whole.elements


# ------------------------------------------------------------------------------------------ compare
def _layer_outputs(y: np.ndarray, ids: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    return {LAYER_OUTPUT: y, LAYER_EXPERT_IDS: ids, LAYER_EXPERT_WEIGHTS: w}


def test_compare_settings_scale_atol_by_reference() -> None:
    tol = Tolerances(rtol=1e-3, atol_rel=1e-2, min_cosine=0.99, min_routing_agreement=0.5,
                     check_error_stat="quantile", error_quantile=0.9)
    ref = [_layer_outputs(np.array([[1.0, -8.0]]), np.zeros((1, 1)), np.full((1, 1), 0.25)),
           _layer_outputs(np.array([[2.0, 3.0]]), np.zeros((1, 1)), np.full((1, 1), 0.5)),
           _layer_outputs(np.zeros((0, 2)), np.zeros((0, 1)), np.zeros((0, 1)))]
    s = compare_settings(tol, ref)
    assert s["rtol"] == {LAYER_OUTPUT: 1e-3, LAYER_EXPERT_WEIGHTS: 1e-3}
    assert s["atol"][LAYER_OUTPUT] == pytest.approx(8.0 * 1e-2)  # max|ref| over every batch
    assert s["atol"][LAYER_EXPERT_WEIGHTS] == pytest.approx(1e-2)  # routing weights: atol_rel itself
    assert (s["check_error_stat"], s["error_quantile"]) == ("quantile", 0.9)
    args = polygraphy_cli_args(s)
    assert args[:3] == ["--rtol", "output:0.001", "expert_weights:0.001"]
    assert args[args.index("--atol") + 1] == f"output:{8.0 * 1e-2!r}"
    assert args[-4:] == ["--check-error-stat", "quantile", "--error-quantile", "0.9"]
    elem = polygraphy_cli_args({**s, "check_error_stat": "elemwise"})
    assert "--error-quantile" not in elem and elem[-1] == "elemwise"
    # no non-empty reference at all: atol_rel * 1
    empty = [_layer_outputs(np.zeros((0, 2)), np.zeros((0, 1)), np.zeros((0, 1)))]
    assert compare_settings(tol, empty)["atol"][LAYER_OUTPUT] == pytest.approx(1e-2)


def test_verdict_reports_each_failed_criterion() -> None:
    tol = Tolerances(rtol=0.0, atol_rel=0.0, min_cosine=0.999, min_routing_agreement=0.75)
    ids = np.array([[0, 1], [2, 3], [1, 2], [0, 3]], np.int32)
    w = np.full((4, 2), 0.5, np.float32)
    y = np.arange(8, dtype=np.float32).reshape(4, 2) + 1.0
    ok = verdict([_layer_outputs(y, ids, w)], [_layer_outputs(y, ids[:, ::-1].copy(), w)], tol, True)
    assert ok.passed and ok.failures == [] and ok.routing_agreement == 1.0 and ok.routing_by_layer is None
    assert ok.output_stats[LAYER_OUTPUT].max_abs == 0.0 and ok.polygraphy_passed is True
    # a cosine of exactly the bound passes (>=): (3, 4) against itself has cosine 25 / 25 = 1 exactly
    y34 = np.array([[3.0, 4.0]], np.float32)
    at_bound = Tolerances(rtol=0.0, atol_rel=0.0, min_cosine=1.0, min_routing_agreement=1.0)
    one = [_layer_outputs(y34, ids[:1], w[:1])]
    assert verdict(one, one, at_bound, True).passed
    # a different number of batches is an error, never a comparison of the common prefix
    with pytest.raises(ValueError):
        verdict([_layer_outputs(y, ids, w)] * 2, [_layer_outputs(y, ids, w)], tol, True)

    bad_ids = ids.copy()
    bad_ids[1:3, 0] = 5  # two of four tokens change an expert: 50% < 75%
    flipped = -y  # cosine -1
    bad = verdict([_layer_outputs(y, ids, w)], [_layer_outputs(flipped, bad_ids, w * 0)], tol, False)
    assert not bad.passed and bad.routing_agreement == pytest.approx(0.5) and bad.polygraphy_passed is False
    assert len(bad.failures) == 3
    assert bad.failures[0].startswith("Polygraphy accuracy check failed")
    assert bad.failures[1].startswith("output cosine -1.0")
    assert bad.failures[2] == "routing agreement 50.0000% < 75.0000%"
    # routing weights are compared elementwise only, never by cosine
    assert bad.output_stats[LAYER_EXPERT_WEIGHTS].cosine == 0.0

    exact = Tolerances(rtol=0.0, atol_rel=0.0, min_cosine=-1.0, min_routing_agreement=0.5)
    assert verdict([_layer_outputs(y, ids, w)], [_layer_outputs(flipped, bad_ids, w)], exact, True).passed


def test_verdict_whole_model_reports_the_lowest_layer() -> None:
    outputs = (TensorInterface("last_hidden_state", "float32", ("batch", "sequence", 2)),
               TensorInterface("layer.0/expert_ids", "int64", ("batch", "sequence", 1)),
               TensorInterface("layer.0/expert_weights", "float32", ("batch", "sequence", 1)),
               TensorInterface("layerX/expert_ids", "int64", ("batch", "sequence", 1)),
               TensorInterface("layerX/expert_weights", "float32", ("batch", "sequence", 1)),
               TensorInterface("mask", "bool", ("batch", "sequence")))
    compared = Compared.of(GraphInterface((TensorInterface("input_ids", "int64", ("batch", "sequence")),), outputs))
    assert compared.primary == "last_hidden_state" and not compared.is_layer
    assert compared.values == ("last_hidden_state", "layer.0/expert_weights", "layerX/expert_weights")
    assert compared.routing == (("layer.0/expert_ids", "layer.0/expert_weights"),
                                ("layerX/expert_ids", "layerX/expert_weights"))
    ref = {"last_hidden_state": np.ones((1, 4, 2), np.float32),
           "layer.0/expert_ids": np.array([[[0], [1], [2], [3]]]), "layer.0/expert_weights": np.ones((1, 4, 1)),
           "layerX/expert_ids": np.array([[[0], [1], [2], [3]]]), "layerX/expert_weights": np.ones((1, 4, 1))}
    act = {**ref, "layerX/expert_ids": np.array([[[0], [1], [2], [0]]])}
    tol = Tolerances(rtol=0.0, atol_rel=0.0, min_cosine=0.5, min_routing_agreement=0.8)
    v = verdict([ref], [act], tol, True, compared)
    assert v.routing_by_layer == {"layer.0": 1.0, "layerX": 0.75} and v.routing_agreement == 0.75
    assert v.failures == ["routing agreement of layerX 75.0000% < 80.0000%"]


def test_verdict_without_routing_outputs() -> None:
    compared = Compared("y", ("y",), ())
    v = verdict([{"y": np.ones(3)}], [{"y": np.ones(3)}], Tolerances(0.0, 0.0, 0.5, 1.0), True, compared)
    assert v.routing_agreement == 1.0 and v.passed
    with pytest.raises(ValueError):  # two reference batches, one actual: never compare only the common prefix
        verdict([{"y": np.ones(3)}] * 2, [{"y": np.ones(3)}], Tolerances(0.0, 0.0, 0.5, 1.0), True, compared)


def test_compared_of_layer_and_without_float_output() -> None:
    layer = Compared.of(layer_interface(8, 2, "fp16"))
    assert layer == LAYER_COMPARED and layer.is_layer
    assert layer.routing_weights == frozenset({LAYER_EXPERT_WEIGHTS})
    # the layer output is the primary output wherever it is listed
    weights_first = GraphInterface((TensorInterface("x", "float32", (2,)),),
                                   (TensorInterface("extra", "float32", (2,)), TensorInterface(LAYER_OUTPUT, "float32",
                                                                                               (2,))))
    assert Compared.of(weights_first).primary == LAYER_OUTPUT
    only_ids = GraphInterface((TensorInterface("x", "float32", (2,)),), (TensorInterface("ids", "int64", (2,)),))
    with pytest.raises(ValueError, match="no floating-point output"):
        Compared.of(only_ids)


def test_per_expert_error_groups_by_reference_top1() -> None:
    ids = np.array([[[2, 0], [0, 1], [2, 1]]], np.int32)  # top-1 experts 2, 0, 2
    base = np.full((1, 3, 2), 10.0, np.float32)
    ref = _layer_outputs(base, ids, np.zeros((1, 3, 2)))
    act = _layer_outputs(base + np.array([[[1.0, 3.0], [0.5, -0.5], [-2.0, 0.0]]], np.float32), ids[..., ::-1],
                         ref[LAYER_EXPERT_WEIGHTS])
    assert per_expert_error([ref], [act]) == pytest.approx({0: 0.5, 2: (2.0 + 1.0) / 2})
    assert list(per_expert_error([ref], [act])) == [0, 2]
    with pytest.raises(ValueError):
        per_expert_error([ref, ref], [act])


# ------------------------------------------------------------------------------------------ interface helpers
def test_interface_small_helpers() -> None:
    assert version_tuple("1.21.0.dev20250101") == (1, 21, 0)
    assert version_tuple("2.13.0+cpu") == (2, 13, 0)
    assert version_tuple("1.x.3") == (1,)
    assert version_tuple("10.4.1.2") == (10, 4, 1)
    assert element_count((3, 5, 7)) == 105 and element_count(()) == 1
    assert sm_names(("80", "90")) == ["sm_80", "sm_90"]
    assert tolerances_for("w8a8_dynamic") is tolerances_for("w8a8")
    assert tolerances_for("no-such-precision") is tolerances_for("fp32")
    assert tolerances_for("fp16").error_quantile == 0.98


# ------------------------------------------------------------------------------------------ calibration thresholds
def _stats(hist: np.ndarray, amax: float) -> LayerStats:
    return LayerStats(amax=amax, rows=1, hist=hist.astype(np.float64))


def test_threshold_max_and_degenerate() -> None:
    hist = np.zeros(BINS)
    hist[10] = 5
    assert threshold(_stats(hist, 3.0), "max") == 3.0
    assert threshold(LayerStats(amax=0.0), "entropy") == 0.0
    assert threshold(LayerStats(amax=2.0, hist=None), "mse") == 2.0
    with pytest.raises(ValueError, match="calibration method must be one of"):
        threshold(_stats(hist, 3.0), "median")


def test_threshold_percentile_hand_computed() -> None:
    amax = float(BINS)  # bin width 1
    hist = np.zeros(BINS)
    hist[99] = 999.0  # 99.9% of the mass ends in bin 99
    hist[BINS - 1] = 1.0
    assert threshold(_stats(hist, amax), "percentile", 99.0) == pytest.approx(100.0)
    assert threshold(_stats(hist, amax), "percentile", 99.8) == pytest.approx(100.0)
    assert threshold(_stats(hist, amax), "percentile", 99.95) == pytest.approx(float(BINS))
    assert threshold(_stats(hist, amax * 2), "percentile", 99.0) == pytest.approx(200.0)  # scales with width
    assert threshold(_stats(hist, amax), "percentile") == pytest.approx(float(BINS))  # default 99.99
    tail = np.zeros(BINS)
    tail[99], tail[BINS - 1] = 99995.0, 5.0  # 99.995% below bin 100: the default 99.99 clips the tail
    assert threshold(_stats(tail, amax), "percentile") == pytest.approx(100.0)
    # a range below 1 is calibrated like any other (only amax == 0 short-cuts to 0)
    assert threshold(_stats(tail, 0.5), "percentile") == pytest.approx(100.0 * 0.5 / BINS)


def test_threshold_mse_and_entropy_clip_a_far_outlier() -> None:
    """2.56e6 samples spread evenly over bins 0..255 (width 1) and one sample at the far end: clipping at 256 costs
    the outlier (2047 - 256)^2 = 3.2e6 while keeping it costs everyone (2048 / 127)^2 / 12 each, 5.5e7 in all, so
    MSE clips exactly at the end of the mass; KL picks the same bin (its threshold is the bin's centre). A uniform
    histogram over the whole range is not clipped."""
    amax = float(BINS)
    hist = np.zeros(BINS)
    hist[:256] = 1e4
    hist[BINS - 1] = 1.0
    assert threshold(_stats(hist, amax), "mse") == 256.0
    assert threshold(_stats(hist, amax), "entropy") == 256.5
    uniform = np.full(BINS, 10.0)
    assert threshold(_stats(uniform, amax), "mse") >= 0.99 * BINS
    assert threshold(_stats(uniform, amax), "entropy") == float(BINS)  # no clipping is a candidate too
    assert QLEVELS == 127


def test_mse_threshold_is_the_argmin_of_its_error() -> None:
    """Independent reference: the quantisation + clipping error of every candidate threshold, summed directly."""
    rng = np.random.default_rng(0)
    hist = np.histogram(np.abs(rng.standard_t(3, size=20000)), bins=BINS, range=(0, 20.0))[0].astype(np.float64)
    width = 20.0 / BINS
    centers = (np.arange(BINS) + 0.5) * width

    def err(t: float) -> float:
        step = t / QLEVELS
        inside = centers <= t
        return float(np.sum(hist[inside]) * step**2 / 12 + np.sum(hist[~inside] * (centers[~inside] - t) ** 2))

    candidates = [i * width for i in range(32, BINS + 1, 8)]
    got = threshold(_stats(hist, 20.0), "mse")
    assert got == pytest.approx(min(candidates, key=err), rel=1e-12)
    assert got < 20.0  # a heavy tail is clipped
    # where the clipped bins' centres decide: all mass in bin 32 (clipping at 32 costs 0.25 w^2 per sample,
    # keeping it (40 / 127)^2 / 12 w^2); mass in bins 0..31 plus 0.5% in bin 40; all mass in the last bin
    for shape in ("bin32", "bin33", "bin40", "last"):
        hist = np.zeros(BINS)
        if shape == "bin32":
            hist[32] = 100.0
        elif shape == "bin33":  # clipping at 32 costs 2.25 w^2 for bin 33's centre 33.5 (0.25 if it were 32.5)
            hist[:32], hist[33] = 300.0 / 32, 1.0
        elif shape == "bin40":
            hist[:32], hist[40] = 200.0 / 32, 1.0
        else:
            hist[BINS - 1] = 100.0
        got = threshold(_stats(hist, 20.0), "mse")
        assert got == pytest.approx(min(candidates, key=err), rel=1e-12), shape
    assert threshold(_stats(hist, 20.0), "mse") == pytest.approx(20.0)


def test_smoothing_factors_formula() -> None:
    weight = torch.tensor([[1.0, -4.0, 0.0], [0.5, 2.0, 0.0]])  # max|W[:, c]| = 1, 4, 0
    channel = np.array([4.0, 1.0, 2.0])
    s = smoothing_factors(channel, weight, 0.5)
    assert s.dtype == np.float32
    assert s[0] == pytest.approx(2.0) and s[1] == pytest.approx(0.5)
    assert s[2] == pytest.approx(math.sqrt(2.0) / math.sqrt(1e-5), rel=1e-6)  # an all-zero weight column: 1e-5
    assert smoothing_factors(channel * 1e12, weight, 1.0)[0] == pytest.approx(1e4)  # clipped above
    assert smoothing_factors(channel, weight, 1.0)[:2] == pytest.approx([4.0, 1.0])
    assert smoothing_factors(np.zeros(3), weight * 1e6, 0.0)[0] == pytest.approx(1e-4)  # clipped below


def test_smoothing_of_empty_bins() -> None:
    from pimoe_export.quantize.calibrate import _smooth

    out = _smooth(np.array([0.5, 0.0, 0.5, 0.0]))
    assert out == pytest.approx([0.5 - 1e-4, 1e-4, 0.5 - 1e-4, 1e-4], abs=1e-15)
    assert out.sum() == pytest.approx(1.0)
    assert _smooth(np.array([0.25, 0.25, 0.25, 0.25])) == pytest.approx([0.25] * 4)
    assert _smooth(np.array([1.0, 0.0, 0.0])) == pytest.approx([1.0 - 2e-4, 1e-4, 1e-4])
    assert _smooth(np.zeros(4)) is None
    assert _smooth(np.array([5e-5, 0.0, 0.0, 0.0])) is None  # taking 3e-4 from 5e-5 would go negative
    assert _smooth(np.array([1e-4, 0.0])) is None  # exactly zero is not a probability either


def _kl_threshold_oracle(hist: np.ndarray, width: float) -> float:
    """docs/precision.md's KL calibration written out plainly, level by level: P = hist[:i] with the outliers
    added to bin i-1; Q = hist[:i] summed over 128 levels (bounds floor(j * i / 128)) and spread evenly over the
    level's bins that are non-empty in P; both smoothed (1e-4 moved onto the empty bins); the smallest KL wins."""

    def smooth(d: np.ndarray) -> np.ndarray | None:
        empty = d == 0
        if empty.all():
            return None
        moved = 1e-4 * empty.sum() / (~empty).sum()
        out = np.where(empty, 1e-4, d - moved)
        return None if (out <= 0).any() else out

    best, best_kl = BINS, np.inf
    for i in range(QLEVELS + 1, BINS + 1):
        p = hist[:i].astype(np.float64).copy()
        p[i - 1] += hist[i:].sum()
        bounds = np.arange(QLEVELS + 2) * i // (QLEVELS + 1)  # level j covers bins [bounds[j], bounds[j + 1])
        used = p > 0
        mass = np.diff(np.concatenate([[0.0], np.cumsum(hist[:i])])[bounds])
        count = np.diff(np.concatenate([[0], np.cumsum(used)])[bounds])
        level = np.searchsorted(bounds, np.arange(i), side="right") - 1
        q = np.where(used, mass[level] / np.maximum(count[level], 1), 0.0)
        if q.sum() <= 0:
            continue
        ps, qs = smooth(p / p.sum()), smooth(q / q.sum())
        if ps is None or qs is None:
            continue
        kl = float(np.sum(ps * np.log(ps / qs)))
        if kl < best_kl:
            best, best_kl = i, kl
    return (best + 0.5) * width if best < BINS else BINS * width


@pytest.mark.parametrize("shape", ["heavy-tail", "gaps"])
def test_entropy_threshold_matches_the_written_out_algorithm(shape) -> None:
    rng = np.random.default_rng(11)
    if shape == "heavy-tail":
        samples = np.abs(rng.standard_t(2.5, size=50000))
    else:  # three clusters and empty stretches between them (empty bins inside P and Q)
        samples = np.concatenate([rng.uniform(0.0, 1.0, 20000), rng.uniform(3.0, 3.2, 3000), [9.7, 9.9]])
    amax = float(samples.max())
    hist = np.histogram(samples, bins=BINS, range=(0.0, amax))[0].astype(np.float64)
    got = threshold(_stats(hist, amax), "entropy")
    assert got == pytest.approx(_kl_threshold_oracle(hist, amax / BINS), rel=1e-12)
    assert got < amax  # both shapes have outliers worth clipping


def test_entropy_threshold_keeps_the_range_q_represents_exactly() -> None:
    """A histogram constant on each of the 128 levels of the full range (16 bins each): at i = BINS, Q spreads each
    level's mass evenly over its bins, which is P itself, so KL = 0; every i < BINS folds the outliers into bin
    i-1, which shares its level with a bin of another count (or, at i = 128, P gains the whole tail that Q lacks):
    KL > 0. Known answer: no clipping, amax. The last level is light (1 per bin against 1000) so that a Q with the
    last two levels merged, or any other misfit at the top of the range, makes clipping it look better."""
    hist = np.full(BINS, 1000.0)
    hist[-(BINS // (QLEVELS + 1)):] = 1.0
    amax = 3.0
    assert threshold(_stats(hist, amax), "entropy") == pytest.approx(amax, rel=1e-15)


def test_entropy_threshold_with_one_sample_below_the_outliers() -> None:
    """One sample in bin 127, every other sample in the top bin. The first candidate, i = 128 (one bin per level),
    has P = the outliers folded into bin 127 and Q = that one sample: both all mass in bin 127, KL = 0, and KL is
    never below 0, so the first candidate wins: (128 + 0.5) bin widths. Q holding a single sample (sum 1) is a
    distribution like any other."""
    hist = np.zeros(BINS)
    hist[QLEVELS], hist[-1] = 1.0, 1000.0
    amax = 2.0
    assert threshold(_stats(hist, amax), "entropy") == pytest.approx((QLEVELS + 1.5) * amax / BINS, rel=1e-15)


def test_entropy_threshold_exact_tie_keeps_the_smaller_threshold() -> None:
    """All mass in bin 127 (a histogram handed in directly): every candidate i >= 128 has P = Q = that one bin, KL
    exactly 0 for all of them. On an exact tie the first (smallest) candidate wins, as in the written-out
    reference: the finest steps for the same divergence, (128 + 0.5) bin widths, not the whole range."""
    hist = np.zeros(BINS)
    hist[QLEVELS] = 50.0
    amax = 4.0
    expected = (QLEVELS + 1.5) * amax / BINS
    assert _kl_threshold_oracle(hist, amax / BINS) == pytest.approx(expected, rel=1e-15)
    assert threshold(_stats(hist, amax), "entropy") == pytest.approx(expected, rel=1e-15)


@pytest.mark.filterwarnings("error")
def test_entropy_threshold_of_a_top_bin_spike_is_quiet() -> None:
    """Every sample in the top bin: below i = BINS, Q holds nothing, so those candidates are skipped rather than
    divided by zero (which would print numpy's 'invalid value' warning during `quantize`); at i = BINS, P = Q:
    no clipping, amax."""
    hist = np.zeros(BINS)
    hist[-1] = 300.0
    assert threshold(_stats(hist, 5.0), "entropy") == pytest.approx(5.0, rel=1e-15)


# ------------------------------------------------------------------------------------------ calibration data
def test_calibration_token_limit_is_exact() -> None:
    """`quantize --calib-tokens N` promises at most N tokens: a batch that crosses the limit is cut, whatever the
    data's layout (one [N, H] array used to be taken whole)."""
    from pimoe_export.model.source import load_calibration_data

    x = np.arange(700 * 4, dtype=np.float32).reshape(700, 4)
    (cut,) = load_calibration_data(x, 4, max_tokens=300)
    assert tuple(cut.shape) == (1, 300, 4)
    np.testing.assert_array_equal(cut[0].numpy(), x[:300])  # the first tokens, in order
    batches = load_calibration_data([x[:100].reshape(2, 50, 4), x[100:400].reshape(3, 100, 4), x[400:]], 4,
                                    max_tokens=250)
    assert [tuple(b.shape) for b in batches] == [(2, 50, 4), (1, 150, 4)]
    np.testing.assert_array_equal(batches[1][0].numpy(), x[100:250])
    assert sum(b.shape[0] * b.shape[1] for b in load_calibration_data(x, 4, max_tokens=700)) == 700
    assert sum(b.shape[0] * b.shape[1] for b in load_calibration_data(x, 4)) == 700
    assert [tuple(b.shape) for b in load_calibration_data([x[:10], x[10:20]], 4, max_tokens=10)] == [(1, 10, 4)]


def test_random_calibration_data_is_seeded_and_sized() -> None:
    from pimoe_export.model.source import random_calibration_data

    a, b = random_calibration_data(8, tokens=1024, seed=3), random_calibration_data(8, tokens=1024, seed=3)
    assert [tuple(t.shape) for t in a] == [(1, 256, 8)] * 4
    assert all(np.array_equal(s.numpy(), t.numpy()) for s, t in zip(a, b, strict=True))
    assert not np.array_equal(a[0].numpy(), random_calibration_data(8, tokens=1024, seed=4)[0].numpy())
    assert len(random_calibration_data(8, tokens=100)) == 1  # at least one batch


# ------------------------------------------------------------------------------------------ CLI argument types
def test_cli_argument_types() -> None:
    import argparse

    from pimoe_export.cli._common import SEED, integer, number, shape, shapes

    assert shapes("1x1, 2x16,4x64") == [(1, 1), (2, 16), (4, 64)]
    assert shape("8x512") == (8, 512)
    assert shapes(f"{1 << 20}x1") == [(1 << 20, 1)]
    for bad, message in [("2by3", "shapes look like"), ("0x4", "must be in 1..1048576, got '0x4'"),
                         (f"{(1 << 20) + 1}x1", "1.."),
                         ("3x", "shapes look like")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            shapes(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="one batch x sequence pair"):
        shape("1x2,3x4")
    assert integer(1)("7") == 7 and integer(2, 5)("5") == 5 and integer(2, 5)("2") == 2
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be 2\.\.5, got 6"):
        integer(2, 5)("6")
    with pytest.raises(argparse.ArgumentTypeError, match="must be >= 1, got 0"):
        integer(1)("0")
    with pytest.raises(argparse.ArgumentTypeError, match="expected an integer"):
        integer(1)("1.5")
    assert SEED("0") == 0 and SEED(str(2**32 - 1)) == 2**32 - 1
    with pytest.raises(argparse.ArgumentTypeError):
        SEED(str(2**32))
    assert number(0, 100, open_low=True)("100") == 100.0 and number(0, 1)("0") == 0.0
    with pytest.raises(argparse.ArgumentTypeError, match=r"in \(0, 100\], got '0'"):
        number(0, 100, open_low=True)("0")
    for bad in ("nan", "inf", "1.5", "-0.1"):
        with pytest.raises(argparse.ArgumentTypeError, match=rf"finite number in \[0, 1\], got '{bad}'"):
            number(0, 1)(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="expected a number, got 'x'"):
        number(0, 1)("x")


def test_calibration_files_and_refusals(tmp_path) -> None:
    from pimoe_export.errors import PiMoEInputError
    from pimoe_export.model.source import load_calibration_data

    x = np.random.default_rng(2).standard_normal((6, 4)).astype(np.float32)
    np.save(tmp_path / "c.npy", x)
    (got,) = load_calibration_data(tmp_path / "c.npy", 4)
    np.testing.assert_array_equal(got[0].numpy(), x)
    np.savez(tmp_path / "two.npz", hidden_states=x, other=np.zeros((3, 4), np.float32))
    assert [tuple(t.shape) for t in load_calibration_data(tmp_path / "two.npz", 4)] == [(1, 6, 4)]  # only it
    np.savez(tmp_path / "plain.npz", a=x, b=x[:2])
    assert [tuple(t.shape) for t in load_calibration_data(tmp_path / "plain.npz", 4)] == [(1, 6, 4), (1, 2, 4)]
    np.save(tmp_path / "obj.npy", np.array([x, None], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "obj.npz", hidden_states=np.array([x, None], dtype=object))
    for pickled in ("obj.npy", "obj.npz"):  # never unpickled
        with pytest.raises(PiMoEInputError, match=rf"{pickled} cannot be read as \.np[yz] \(ValueError: .*pickle"):
            load_calibration_data(tmp_path / pickled, 4)
    (tmp_path / "c.txt").write_text("1 2 3 4")
    with pytest.raises(PiMoEInputError, match=r"c\.txt: expected \.npz, \.npy or \.safetensors"):
        load_calibration_data(tmp_path / "c.txt", 4)
    with pytest.raises(PiMoEInputError, match=r"must hold numbers .* got an array of dtype <U1"):
        load_calibration_data(np.array([["a"] * 4]), 4)
    with pytest.raises(PiMoEInputError, match=r"^calibration data contains NaN or Inf"):
        load_calibration_data(np.full((2, 4), np.inf, np.float32), 4)
    for empty in (np.zeros((0, 4), np.float32), []):
        with pytest.raises(PiMoEInputError, match=r"^calibration data is empty$"):
            load_calibration_data(empty, 4)
    assert tuple(load_calibration_data(x[:1], 4)[0].shape) == (1, 1, 4)  # one token is enough
    (t,) = load_calibration_data(torch.from_numpy(x), 4)  # a tensor is taken as it is
    np.testing.assert_array_equal(t[0].numpy(), x)
    default = random_calibration_data_default()
    assert len(default) == 16 and torch.equal(default[0], torch.randn(1, 256, 4, generator=torch.Generator()
                                                                       .manual_seed(0)))


def random_calibration_data_default():
    from pimoe_export.model.source import random_calibration_data

    return random_calibration_data(4)  # documented: 4096 standard-normal tokens, seed 0


def test_expert_layer_inputs_are_what_the_experts_compute() -> None:
    """Independent reference: each expert's own forward. The first layer's input is the tokens routed to the
    expert; the last layer applied to the last input gives the expert's output on those tokens (so every bias,
    LayerNorm weight and bias, epsilon and activation in between was applied); an expert no token reaches has no
    entry."""
    from pimoe_export.model import create_from_preset
    from pimoe_export.quantize.calibrate import expert_layer_inputs

    model = create_from_preset("tiny", seed=3, layer_norm_eps=0.1).eval()  # not LayerNorm's default epsilon
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in model.experts.parameters():  # LayerNorm weights away from 1, biases away from 0
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
        model.router.selection_bias[0] = -1e4  # expert 0 is never selected (the others still are)
    x = torch.randn(2, 24, 16, generator=gen)
    got = {(e, layer): h.clone() for e, layer, h in expert_layer_inputs(model, x)}
    with torch.no_grad():
        ids = model.router(x.reshape(-1, 16)).ids
    assert not (ids == 0).any() and not [key for key in got if key[0] == 0]
    for e in range(1, 4):
        expert = model.experts[e]
        rows = x.reshape(-1, 16)[(ids == e).any(-1)]
        assert {layer for (i, layer) in got if i == e} == set(range(len(expert.layers)))
        torch.testing.assert_close(got[(e, 0)], rows, rtol=0, atol=0)
        last = expert.layers[-1]
        with torch.no_grad():
            torch.testing.assert_close(torch.nn.functional.linear(got[(e, len(expert.layers) - 1)], last.weight,
                                                                  last.bias), expert(rows), rtol=1e-5, atol=1e-5)
