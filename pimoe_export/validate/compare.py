"""Comparison of a parity check, apart from any backend: Polygraphy's accuracy comparison with per-output
tolerances, then our own verdict (error statistics, cosine, top-k routing agreement) and diagnostics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pimoe_export.interface import LAYER_EXPERT_IDS, LAYER_EXPERT_WEIGHTS, LAYER_OUTPUT, Tolerances
from pimoe_export.validate.metrics import ErrorStats, error_stats, merge_stats, routing_agreement

#: compared elementwise; routing ids are compared by routing_agreement() instead
COMPARED = (LAYER_OUTPUT, LAYER_EXPERT_WEIGHTS)

Outputs = list[dict[str, np.ndarray]]


@dataclass
class Verdict:
    polygraphy_passed: bool
    output_stats: dict[str, ErrorStats]
    routing_agreement: float
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures


def compare_settings(tolerances: Tolerances, ref_outputs: Outputs) -> dict[str, Any]:
    """Polygraphy ``SimpleCompareFunc`` settings of a check: ``atol`` of the output scales with max|reference|."""
    ref_max = max((float(np.max(np.abs(r[LAYER_OUTPUT]))) for r in ref_outputs if r[LAYER_OUTPUT].size), default=1.0)
    return {
        "rtol": {name: tolerances.rtol for name in COMPARED},
        "atol": {LAYER_OUTPUT: tolerances.atol_rel * ref_max, LAYER_EXPERT_WEIGHTS: tolerances.atol_rel},
        "check_error_stat": tolerances.check_error_stat,
        "error_quantile": tolerances.error_quantile,
    }


def polygraphy_cli_args(settings: dict[str, Any]) -> list[str]:
    """The same settings as ``polygraphy run`` arguments (floats written so they read back exactly)."""
    args = ["--rtol", *(f"{k}:{v!r}" for k, v in settings["rtol"].items()),
            "--atol", *(f"{k}:{v!r}" for k, v in settings["atol"].items()),
            "--check-error-stat", settings["check_error_stat"]]
    if settings["check_error_stat"] == "quantile":
        args += ["--error-quantile", repr(settings["error_quantile"])]
    return args


def polygraphy_accuracy(reference: Any, actual: Any, settings: dict[str, Any]) -> bool:
    """``Comparator.compare_accuracy`` of two RunResults entries (reference first) on the compared outputs."""
    from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc

    results = RunResults()
    results.extend(reference)
    results.extend(actual)
    return bool(Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(**settings)))


def verdict(reference: Outputs, actual: Outputs, tolerances: Tolerances, polygraphy_passed: bool) -> Verdict:
    """Error statistics, routing agreement and the list of failed criteria."""
    stats = {name: merge_stats([error_stats(r[name], a[name]) for r, a in zip(reference, actual, strict=True)])
             for name in COMPARED}
    ref_ids = np.concatenate([r[LAYER_EXPERT_IDS].reshape(-1, r[LAYER_EXPERT_IDS].shape[-1]) for r in reference])
    got_ids = np.concatenate([a[LAYER_EXPERT_IDS].reshape(-1, a[LAYER_EXPERT_IDS].shape[-1]) for a in actual])
    agreement = routing_agreement(ref_ids, got_ids)
    failures = []
    if not polygraphy_passed:
        failures.append(f"Polygraphy accuracy check failed (rtol={tolerances.rtol}, "
                        f"atol={tolerances.atol_rel}*max|ref|, {tolerances.check_error_stat})")
    if not stats[LAYER_OUTPUT].cosine >= tolerances.min_cosine:
        failures.append(f"output cosine {stats[LAYER_OUTPUT].cosine:.8f} < {tolerances.min_cosine}")
    if not agreement >= tolerances.min_routing_agreement:
        failures.append(f"routing agreement {agreement:.4%} < {tolerances.min_routing_agreement:.4%}")
    return Verdict(polygraphy_passed, stats, agreement, failures)


def per_expert_error(reference: Outputs, actual: Outputs) -> dict[int, float]:
    """Mean |error| of the output grouped by each token's reference top-1 expert."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for r, a in zip(reference, actual, strict=True):
        top1 = r[LAYER_EXPERT_IDS][..., 0].reshape(-1)
        err = np.abs(a[LAYER_OUTPUT].astype(np.float64) - r[LAYER_OUTPUT]).reshape(len(top1), -1).mean(axis=1)
        for e, v in zip(top1.tolist(), err.tolist(), strict=True):
            sums[e] = sums.get(e, 0.0) + v
            counts[e] = counts.get(e, 0) + 1
    return {e: sums[e] / counts[e] for e in sorted(sums)}


def kernel_vs_fake_quant(model: Any, onnx_path: Any, feeds: list[dict[str, np.ndarray]], actual: Outputs,
                         max_rel_l2: float) -> dict[str, Any]:
    """A quantised graph's outputs against the fake-quant PyTorch reference of the same codes and scales (the
    kernels' error alone; the comparison with the fp32 model is quantisation + kernel error)."""
    import torch

    from pimoe_export.quantize.int8 import FakeQuantPiMoE, read_quant_params

    reference = FakeQuantPiMoE(model.float().eval(), read_quant_params(onnx_path)).eval()
    outs, ids = [], []
    with torch.no_grad():
        for feed in feeds:
            (x,) = feed.values()
            y, i, _ = reference(torch.from_numpy(np.asarray(x, np.float32)))
            outs.append(y.numpy())
            ids.append(i.numpy().reshape(-1, i.shape[-1]))
    stats = merge_stats([error_stats(r, a[LAYER_OUTPUT]) for r, a in zip(outs, actual, strict=True)])
    got = np.concatenate([a[LAYER_EXPERT_IDS].reshape(-1, a[LAYER_EXPERT_IDS].shape[-1]) for a in actual])
    return {LAYER_OUTPUT: stats.to_dict(), "routing_agreement": routing_agreement(np.concatenate(ids), got),
            "max_rel_l2": max_rel_l2}
