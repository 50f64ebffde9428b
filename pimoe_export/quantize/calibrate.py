"""Calibration: activation ranges of every expert layer's input, and the threshold methods.

Data flows through the PyTorch reference exactly as at inference (router in fp32, sort-based dispatch), and
each expert's layer inputs are observed: layer 0 sees the tokens routed to the expert, layer l > 0 the
hidden activations after LayerNorm and activation. Two passes: absolute maxima, then a 2048-bin histogram
of the non-zero |x| over [0, max] per (expert, layer), from which a threshold is chosen:

- ``max``: the absolute maximum (no clipping)
- ``percentile``: the ``percentile``-th percentile of |x| (default 99.99)
- ``entropy``: TensorRT-style KL divergence minimisation between the clipped histogram and its 127-level
  quantised version
- ``mse``: the threshold minimising expected squared error (rounding noise Δ²/12 inside, clipping outside)

scale = threshold / 127 (symmetric int8, codes in [-127, 127]).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pimoe_export.errors import PiMoEInputError
from pimoe_export.model import functional
from pimoe_export.model.moe_block import MoEBlock
from pimoe_export.model.system import PiMoESystem

METHODS = ("max", "percentile", "entropy", "mse")
BINS = 2048
QLEVELS = 127


# ------------------------------------------------------------------------------------------ observation
def expert_layer_inputs(model: PiMoESystem | MoEBlock, x: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(expert, layer, input rows) for every expert layer, as inference computes them (eval mode). A MoE block's
    shared expert is expert E (:meth:`MoEBlock.expert_layer_inputs`)."""
    if isinstance(model, MoEBlock):
        yield from model.expert_layer_inputs(x)
        return
    cfg = model.config
    x2 = x.reshape(-1, cfg.hidden_size)
    decision = model.router(x2)
    x_sorted, offsets, _ = functional.dispatch(x2, decision.ids, cfg.num_experts)
    bounds = offsets.tolist()
    for e, expert in enumerate(model.experts):
        h = x_sorted[bounds[e] : bounds[e + 1]].float()
        if h.shape[0] == 0:
            continue
        last = len(expert.layers) - 1
        for layer, linear in enumerate(expert.layers):
            yield e, layer, h
            if layer < last:
                h = F.linear(h, linear.weight.float(), linear.bias.float())
                if expert.norms is not None:
                    norm = expert.norms[layer]
                    h = F.layer_norm(h, (h.shape[-1],), norm.weight.float(), norm.bias.float(), expert.layer_norm_eps)
                h = functional.activation_fn(expert.activation, h)


@dataclass
class LayerStats:
    amax: float = 0.0  # max |x / smooth| over the calibration rows
    rows: int = 0
    hist: np.ndarray | None = None  # of the non-zero |x / smooth|
    channel_amax: np.ndarray | None = None  # max |x| per input channel (before smoothing)
    smooth: np.ndarray | None = None  # SmoothQuant divisor per input channel (None: no smoothing)

    @property
    def bin_width(self) -> float:
        return self.amax / BINS if self.amax > 0 else 0.0


@dataclass
class CalibrationStats:
    """Per (expert, layer) statistics of layer inputs; experts that saw no token have no entry."""

    layers: dict[tuple[int, int], LayerStats] = field(default_factory=dict)
    tokens: int = 0
    smooth_alpha: float | None = None

    def get(self, expert: int, layer: int) -> LayerStats | None:
        return self.layers.get((expert, layer))


def smoothing_factors(channel_amax: np.ndarray, weight: torch.Tensor, alpha: float) -> np.ndarray:
    """SmoothQuant: s_c = max|x_c|^alpha / max|W[:, c]|^(1 - alpha), so x / s and W * s share the range."""
    w_amax = weight.detach().float().abs().amax(dim=0).numpy()
    s = np.power(np.maximum(channel_amax, 1e-5), alpha) / np.power(np.maximum(w_amax, 1e-5), 1.0 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def layer_weight(model: PiMoESystem | MoEBlock, expert: int, layer: int) -> torch.Tensor:
    """The weight [rows, in] of one expert layer (a MoE block's shared expert: expert E)."""
    if isinstance(model, MoEBlock):
        return model.layer_weight(expert, layer)
    return model.experts[expert].layers[layer].weight


@torch.no_grad()
def collect_stats(
    model: PiMoESystem | MoEBlock, batches: list[torch.Tensor], progress: bool = False,
    smooth_alpha: float | None = None
) -> CalibrationStats:
    """Statistics of every expert layer's input. With ``smooth_alpha`` (SmoothQuant, e.g. 0.5) each layer input
    gets per-channel smoothing factors from pass 1, and the ranges/histograms describe x / smooth."""
    model = model.eval()
    tracking = model.track_stats
    model.track_stats = False
    stats = CalibrationStats(smooth_alpha=smooth_alpha or None)
    bar = _progress(progress, 2 * len(batches), "calibrating")
    try:
        for x in batches:  # pass 1: ranges
            stats.tokens += x.shape[0] * x.shape[1]
            for e, layer, h in expert_layer_inputs(model, x):
                entry = stats.layers.setdefault((e, layer), LayerStats())
                channel = h.abs().amax(dim=0).numpy()
                entry.channel_amax = channel if entry.channel_amax is None else np.maximum(entry.channel_amax, channel)
                entry.rows += h.shape[0]
            bar.update(1)
        for (e, layer), entry in stats.layers.items():
            assert entry.channel_amax is not None
            if not np.isfinite(entry.channel_amax).all():
                raise PiMoEInputError(f"the calibration data drives expert {e}'s layer {layer} input to NaN or Inf "
                                      "(an overflow of float32 on the way); scale or clean the calibration data")
            if smooth_alpha:
                weight = layer_weight(model, e, layer)
                entry.smooth = smoothing_factors(entry.channel_amax, weight, smooth_alpha)
                entry.amax = float(np.max(entry.channel_amax / entry.smooth))
            else:
                entry.amax = float(np.max(entry.channel_amax))
        for x in batches:  # pass 2: histograms of |x| over [0, amax]
            for e, layer, h in expert_layer_inputs(model, x):
                entry = stats.layers[(e, layer)]
                if entry.amax <= 0:
                    continue
                if entry.smooth is not None:
                    h = h / torch.from_numpy(entry.smooth)
                magnitudes = h.abs().flatten()
                # exact zeros (half of every post-ReLU input) quantise exactly at any scale: leaving them in
                # the histogram lets a spike at 0 drive the KL/MSE choice towards heavy clipping
                magnitudes = magnitudes[magnitudes > 0]
                counts = torch.histc(magnitudes.clamp_max(entry.amax), bins=BINS, min=0.0, max=entry.amax)
                counts = counts.double().numpy()
                entry.hist = counts if entry.hist is None else entry.hist + counts
            bar.update(1)
    finally:
        bar.close()
        model.track_stats = tracking
    return stats


def _progress(enabled: bool, total: int, desc: str) -> Any:
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, unit="batch")
        except ImportError:  # pragma: no cover
            pass

    class _Null:
        def update(self, n: int) -> None: ...
        def close(self) -> None: ...

    return _Null()


# ------------------------------------------------------------------------------------------ thresholds
def threshold(stats: LayerStats, method: str, percentile: float = 99.99) -> float:
    """Clipping threshold (>= 0) of one layer input for ``method``."""
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
    if stats.amax <= 0 or stats.hist is None or method == "max":
        return stats.amax
    hist = stats.hist
    width = stats.bin_width
    if method == "percentile":
        cdf = np.cumsum(hist) / hist.sum()
        index = int(np.searchsorted(cdf, percentile / 100.0))
        return float(min(BINS, index + 1) * width)
    if method == "mse":
        return _mse_threshold(hist, width)
    return _entropy_threshold(hist, width)


def _mse_threshold(hist: np.ndarray, width: float) -> float:
    centers = (np.arange(BINS) + 0.5) * width
    best, best_err = BINS * width, np.inf
    for i in range(32, BINS + 1, 8):
        t = i * width
        step = t / QLEVELS
        inside = hist[:i].sum() * step * step / 12.0
        clipped = np.sum(hist[i:] * (centers[i:] - t) ** 2)
        err = inside + clipped
        if err < best_err:
            best, best_err = t, err
    return float(best)


def _smooth(distribution: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """Move eps of mass onto the empty bins so KL stays finite (as MXNet/TensorRT calibrators do)."""
    zero = distribution == 0
    n_zero, n_nonzero = int(zero.sum()), int((~zero).sum())
    if n_nonzero == 0:
        return None
    out = distribution + eps * zero - (eps * n_zero / n_nonzero) * (~zero)
    return None if (out <= 0).any() else out


def _entropy_threshold(hist: np.ndarray, width: float) -> float:
    """TensorRT-style KL calibration on |x|: for each candidate clipping bin i, P = hist[:i] with the outliers
    folded into bin i-1, Q = hist[:i] merged into QLEVELS+1 levels and spread back over the non-empty bins;
    choose the i with the smallest KL(P || Q)."""
    levels = QLEVELS + 1
    best_i, best_kl = BINS, np.inf
    for i in range(levels, BINS + 1):
        sliced = hist[:i]
        p = sliced.copy()
        p[i - 1] += hist[i:].sum()
        nonzero = p > 0
        starts = np.linspace(0, i, levels + 1).astype(int)[:-1]
        merged = np.add.reduceat(sliced, starts)
        counts = np.add.reduceat(nonzero.astype(np.int64), starts)
        sizes = np.diff(np.append(starts, i))
        # a level with no non-empty bin has merged == 0 (hist >= 0 and P >= hist): 0 / 1, no masked division
        q = np.repeat(merged / np.maximum(counts, 1), sizes) * nonzero
        ps, qs = _smooth(p / p.sum()), (_smooth(q / q.sum()) if q.sum() > 0 else None)
        if ps is None or qs is None:
            continue
        kl = float(np.sum(ps * np.log(ps / qs)))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return float((best_i + 0.5) * width) if best_i < BINS else float(BINS * width)
