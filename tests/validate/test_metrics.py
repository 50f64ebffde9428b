"""Parity metrics (error statistics, routing agreement, the comparison settings and verdict) on constructed inputs
whose answer is worked out by hand.

The other tests only see these functions where they cannot be wrong (identical routings, outputs that agree): a
metric that reports 100% agreement or zero error for everything passes them. Here every input is built so that
each statistic has a known, non-trivial value (fast, numpy only; with tests/quantize/test_calibrate.py these are
the tests scripts/mutate_py.sh runs against the mutants of pimoe_export/validate and the calibration thresholds).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pimoe_export.interface import (
    LAYER_EXPERT_IDS,
    LAYER_EXPERT_WEIGHTS,
    LAYER_OUTPUT,
    GraphInterface,
    TensorInterface,
    Tolerances,
    layer_interface,
)
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
