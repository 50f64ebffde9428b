"""Comparison of a parity check, apart from any backend: Polygraphy's accuracy comparison with per-output
tolerances, then our own verdict (error statistics, cosine, top-k routing agreement) and diagnostics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pimoe_export.interface import LAYER_EXPERT_IDS, LAYER_EXPERT_WEIGHTS, LAYER_OUTPUT, GraphInterface, Tolerances
from pimoe_export.validate.metrics import (
    ErrorStats,
    error_stats,
    merge_stats,
    pooled_embedding_cosine,
    routing_agreement,
)

#: a layer graph's outputs compared elementwise; routing ids are compared by routing_agreement() instead
COMPARED = (LAYER_OUTPUT, LAYER_EXPERT_WEIGHTS)

Outputs = list[dict[str, np.ndarray]]


@dataclass(frozen=True)
class Compared:
    """Which outputs a check compares. ``values``: elementwise (Polygraphy) and by error statistics, each held to the
    cosine criterion except routing weights; ``primary``: the one plotted and printed; ``routing``: one (ids,
    weights) pair per PiMoE layer, ids compared by top-k agreement."""

    primary: str
    values: tuple[str, ...]
    routing: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, interface: GraphInterface) -> Compared:
        names = interface.output_names
        routing = tuple((n, n[: -len(LAYER_EXPERT_IDS)] + LAYER_EXPERT_WEIGHTS) for n in names
                        if (n == LAYER_EXPERT_IDS or n.endswith("/" + LAYER_EXPERT_IDS))
                        and n[: -len(LAYER_EXPERT_IDS)] + LAYER_EXPERT_WEIGHTS in names)
        ids = {i for i, _ in routing}
        values = tuple(t.name for t in interface.outputs if t.name not in ids and t.dtype in ("float32", "float16"))
        if not values:
            raise ValueError(f"no floating-point output to compare among {list(names)}")
        return cls(LAYER_OUTPUT if LAYER_OUTPUT in values else values[0], values, routing)

    @property
    def routing_weights(self) -> frozenset[str]:
        return frozenset(w for _, w in self.routing)

    @property
    def is_layer(self) -> bool:
        """The outputs of the layer interface (a bare PiMoE layer's graph)."""
        return self.routing == ((LAYER_EXPERT_IDS, LAYER_EXPERT_WEIGHTS),)


LAYER_COMPARED = Compared(LAYER_OUTPUT, COMPARED, ((LAYER_EXPERT_IDS, LAYER_EXPERT_WEIGHTS),))


@dataclass
class Verdict:
    polygraphy_passed: bool
    output_stats: dict[str, ErrorStats]
    routing_agreement: float
    failures: list[str]
    routing_by_layer: dict[str, float] | None = None
    embedding: dict[str, Any] | None = None  # whole models with a mask: pooled-embedding cosine of the primary

    @property
    def passed(self) -> bool:
        return not self.failures


def _ref_max(ref_outputs: Outputs, name: str) -> float:
    return max((float(np.max(np.abs(r[name]))) for r in ref_outputs if r[name].size), default=1.0)


def compare_settings(tolerances: Tolerances, ref_outputs: Outputs,
                     compared: Compared = LAYER_COMPARED) -> dict[str, Any]:
    """Polygraphy ``SimpleCompareFunc`` settings of a check: ``atol`` of an output scales with its max|reference|
    (routing weights, in [0, 1], take ``atol_rel`` itself)."""
    return {
        "rtol": {name: tolerances.rtol for name in compared.values},
        "atol": {name: tolerances.atol_rel * (1.0 if name in compared.routing_weights else _ref_max(ref_outputs, name))
                 for name in compared.values},
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


def _flat_ids(outputs: Outputs, name: str) -> np.ndarray:
    return np.concatenate([o[name].reshape(-1, o[name].shape[-1]) for o in outputs])


def embedding_agreement(reference: Outputs, actual: Outputs, name: str,
                        masks: list[np.ndarray]) -> dict[str, Any] | None:
    """Mean-pooled embedding cosine of output ``name`` over every sequence of the check (None when the output is
    not [B, S, H] over the masks' [B, S])."""
    if any(r[name].ndim != 3 or r[name].shape[:2] != np.shape(m) for r, m in zip(reference, masks, strict=True)):
        return None
    cos = np.concatenate([pooled_embedding_cosine(r[name], a[name], m)
                          for r, a, m in zip(reference, actual, masks, strict=True)])
    return {"output": name, "sequences": int(cos.size), "mean_cosine": float(cos.mean()) if cos.size else 1.0,
            "min_cosine": float(cos.min()) if cos.size else 1.0}


def verdict(reference: Outputs, actual: Outputs, tolerances: Tolerances, polygraphy_passed: bool,
            compared: Compared = LAYER_COMPARED, masks: list[np.ndarray] | None = None) -> Verdict:
    """Error statistics, routing agreement (the lowest over the layers), with ``masks`` (each feed's attention
    mask) the pooled-embedding cosine of the primary output, and the list of failed criteria."""
    stats = {name: merge_stats([error_stats(r[name], a[name]) for r, a in zip(reference, actual, strict=True)])
             for name in compared.values}
    by_layer = {ids[: -len(LAYER_EXPERT_IDS)].rstrip("/"): routing_agreement(_flat_ids(reference, ids),
                                                                             _flat_ids(actual, ids))
                for ids, _ in compared.routing}
    agreement = min(by_layer.values(), default=1.0)
    failures = []
    if not polygraphy_passed:
        failures.append(f"Polygraphy accuracy check failed (rtol={tolerances.rtol}, "
                        f"atol={tolerances.atol_rel}*max|ref|, {tolerances.check_error_stat})")
    for name in compared.values:
        if name not in compared.routing_weights and not stats[name].cosine >= tolerances.min_cosine:
            failures.append(f"{name} cosine {stats[name].cosine:.8f} < {tolerances.min_cosine}")
    for layer, value in by_layer.items():
        if not value >= tolerances.min_routing_agreement:
            where = f" of {layer}" if layer else ""
            failures.append(f"routing agreement{where} {value:.4%} < {tolerances.min_routing_agreement:.4%}")
    embedding = None if masks is None else embedding_agreement(reference, actual, compared.primary, masks)
    if embedding is not None:
        bound = tolerances.min_embedding_cosine
        embedding["required_mean_cosine"] = tolerances.min_cosine if bound is None else bound
        if not embedding["mean_cosine"] >= embedding["required_mean_cosine"]:
            failures.append(f"{compared.primary} mean-pooled embedding cosine {embedding['mean_cosine']:.6f} < "
                            f"{embedding['required_mean_cosine']}")
    # routing by layer is reported where the layers have paths (a bare layer's routing is the one agreement)
    return Verdict(polygraphy_passed, stats, agreement, failures, by_layer if any(by_layer) else None, embedding)


def per_expert_error(reference: Outputs, actual: Outputs, compared: Compared = LAYER_COMPARED) -> dict[int, float]:
    """Mean |error| of the primary output grouped by each token's reference top-1 expert (of the graph's one PiMoE
    layer)."""
    ((ids, _),), primary = compared.routing, compared.primary
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for r, a in zip(reference, actual, strict=True):
        top1 = r[ids][..., 0].reshape(-1)
        err = np.abs(a[primary].astype(np.float64) - r[primary]).reshape(len(top1), -1).mean(axis=1)
        for e, v in zip(top1.tolist(), err.tolist(), strict=True):
            sums[e] = sums.get(e, 0.0) + v
            counts[e] = counts.get(e, 0) + 1
    return {e: sums[e] / counts[e] for e in sorted(sums)}


def kernel_vs_fake_quant(model: Any, onnx_path: Any, feeds: list[dict[str, np.ndarray]], actual: Outputs,
                         max_rel_l2: float, compared: Compared = LAYER_COMPARED) -> dict[str, Any]:
    """A quantised graph's outputs against the fake-quant PyTorch reference of the same codes and scales (the
    kernels' error alone; the comparison with the fp32 model is quantisation + kernel error): the model with its
    one MoE layer computed by :func:`~pimoe_export.quantize.int8.fake_quant_form`. (With several layers, one
    layer's kernel error moves the next layers' routing, and the comparison would no longer isolate the kernels.)"""
    import copy

    import torch

    from pimoe_export.export.tracing import ExportedLayer, flatten_outputs, replace_module
    from pimoe_export.model.source import moe_layers
    from pimoe_export.quantize.int8 import fake_quant_form, read_quant_params

    ((path, layer),) = moe_layers(model).items()
    routing: list = []
    fake = fake_quant_form(copy.deepcopy(layer).float().eval(), read_quant_params(onnx_path)).eval()
    work = replace_module(copy.deepcopy(model).float().eval(), path, ExportedLayer.around(fake, path, routing))
    outs, ids = [], []
    with torch.no_grad():
        for feed in feeds:
            routing.clear()
            inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in feed.items()}
            inputs = {k: t.float() if t.is_floating_point() else t for k, t in inputs.items()}
            outs.append(dict(flatten_outputs(work(**inputs)))[compared.primary].numpy())
            ((_, i, _),) = routing
            ids.append(i.numpy().reshape(-1, i.shape[-1]))
    name = compared.routing[0][0]
    stats = merge_stats([error_stats(r, a[compared.primary]) for r, a in zip(outs, actual, strict=True)])
    got = np.concatenate([a[name].reshape(-1, a[name].shape[-1]) for a in actual])
    return {LAYER_OUTPUT: stats.to_dict(), "routing_agreement": routing_agreement(np.concatenate(ids), got),
            "max_rel_l2": max_rel_l2}


def layer_quantization_error(model: Any, onnx_path: Any, feeds: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Each MoE layer's W8A8 output error on the inputs that reach it when the fp32 model runs ``feeds``: the layer
    with the quantised graph's own codes and scales (the fake-quant reference) against the same layer in fp32, by
    layer path in the order the layers run. It isolates every layer's quantisation error (the graph's outputs carry
    the error of all layers, compounded)."""
    import torch

    from pimoe_export.export.modules import custom_op_form
    from pimoe_export.model.moe_block import MoEBlock
    from pimoe_export.model.source import moe_layers
    from pimoe_export.quantize.capture import capture_layer_inputs
    from pimoe_export.quantize.int8 import QuantParams, fake_quant_form, read_quant_params

    params = read_quant_params(onnx_path)
    layers = moe_layers(model)
    out: dict[str, Any] = {}
    start = 0
    for path, batches in capture_layer_inputs(model, feeds).items():
        layer = layers[path]
        count = len(layer.groups()) if isinstance(layer, MoEBlock) else len(layer.config.expert_groups())
        own = QuantParams(params.mode, params.method, params.groups[start:start + count], params.info)
        start += count
        exact, quantised = custom_op_form(layer).eval(), fake_quant_form(layer, own).eval()
        with torch.no_grad():
            pairs = [(exact(x)[0].numpy(), quantised(x)[0].numpy()) for x in batches]
        stats = merge_stats([error_stats(r, a) for r, a in pairs])
        out[path] = {"rel_l2": stats.rel_l2, "cosine": stats.cosine, "max_abs": stats.max_abs,
                     "tokens": int(sum(x.shape[1] for x in batches))}
    return out
