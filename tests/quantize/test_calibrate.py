"""Calibration (pimoe_export.quantize.calibrate) on constructed inputs whose answer is worked out by hand: the
threshold methods (max, percentile, written-out KL and MSE), SmoothQuant factors, the data readers and the expert
layer inputs calibration observes (with tests/validate/test_metrics.py: the tests scripts/mutate_py.sh runs against
the mutants of the calibration thresholds).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pimoe_export.quantize.calibrate import BINS, QLEVELS, LayerStats, smoothing_factors, threshold


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


def test_collect_stats_histograms_the_non_zero_magnitudes_in_2048_bins() -> None:
    """docs/precision.md: thresholds come "from a 2048-bin histogram of the non-zero |x| per (expert, layer). Exact
    zeros are left out of the histogram". Calibration data with half of every token's channels exactly 0: each
    (expert, layer) histogram has 2048 bins holding exactly the non-zero elements of that layer's inputs, counted
    here from the inputs themselves (expert_layer_inputs)."""
    from pimoe_export.model import create_from_preset
    from pimoe_export.quantize.calibrate import collect_stats, expert_layer_inputs

    assert BINS == 2048
    model = create_from_preset("tiny", seed=4).eval()
    x = torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(9))
    x[..., ::2] = 0.0
    non_zero: dict[tuple[int, int], int] = {}
    elements: dict[tuple[int, int], int] = {}
    with torch.no_grad():
        for e, layer, h in expert_layer_inputs(model, x):
            non_zero[(e, layer)] = non_zero.get((e, layer), 0) + int((h != 0).sum())
            elements[(e, layer)] = elements.get((e, layer), 0) + h.numel()
    stats = collect_stats(model, [x])
    assert set(stats.layers) == set(non_zero) and len(non_zero) > 4
    for key, entry in stats.layers.items():
        assert entry.hist is not None and entry.hist.shape == (2048,), key
        assert float(entry.hist.sum()) == non_zero[key], key
        if key[1] == 0:  # the tokens themselves: half of their elements are the zeros left out
            assert 2 * non_zero[key] == elements[key], key


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
