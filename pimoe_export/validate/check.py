"""Parity check: PyTorch reference vs a backend, compared with Polygraphy, reported as JSON + Markdown (+ PNG).

PyTorch outputs are saved as Polygraphy ``RunResults`` (``pytorch_outputs.json``, loadable with
``polygraphy run ... --load-outputs``); the ONNX Runtime side runs through Polygraphy's ``OnnxrtRunner`` over a
session that has our op library registered; ``Comparator.compare_accuracy`` applies per-output tolerances.
On top of Polygraphy's verdict we report max/mean abs error, relative L2, cosine and top-k routing agreement.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pimoe_export.validate.metrics import ErrorStats, error_stats, merge_stats, routing_agreement

DEFAULT_SHAPES: tuple[tuple[int, int], ...] = ((1, 1), (2, 16), (4, 64))
QUANTIZED = ("w8a8", "w8a8_dynamic")
#: kernels vs fake-quant reference: the same integer math; what remains is fp32 rounding in LayerNorm and the
#: activations, which can move an activation code by one step at a rounding boundary
MAX_KERNEL_REL_L2 = 2e-3


@dataclass(frozen=True)
class Tolerances:
    """Pass criteria for one precision.

    Polygraphy's elementwise check passes an element when |a - r| <= atol or |a - r| <= rtol * |r|;
    ``atol`` is ``atol_rel * max|r|`` so it scales with the layer's output. ``check_error_stat`` chooses
    what must pass: every element ("elemwise") or a quantile of them (tokens whose routing flipped differ by
    a whole expert and are counted by ``min_routing_agreement`` instead).
    """

    rtol: float
    atol_rel: float
    min_cosine: float
    min_routing_agreement: float
    check_error_stat: str = "elemwise"
    error_quantile: float = 0.99

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TOLERANCES: dict[str, Tolerances] = {
    # fp32 graph vs fp32 PyTorch: same math, different summation orders and exp/erf implementations
    "fp32": Tolerances(rtol=1e-5, atol_rel=1e-5, min_cosine=0.999999, min_routing_agreement=1.0),
    # fp16 I/O and weights, fp32 accumulation, fp32 router fed fp16-rounded inputs
    "fp16": Tolerances(rtol=1e-2, atol_rel=1e-2, min_cosine=0.999, min_routing_agreement=0.98,
                       check_error_stat="quantile", error_quantile=0.98),
    # W8A8 experts (fp32 router); see docs/precision.md
    "w8a8": Tolerances(rtol=5e-2, atol_rel=5e-2, min_cosine=0.999, min_routing_agreement=1.0,
                       check_error_stat="quantile", error_quantile=0.99),
}
TOLERANCES["w8a8_dynamic"] = TOLERANCES["w8a8"]


@dataclass
class CheckReport:
    backend: str
    precision: str
    shapes: list[tuple[int, int]]
    tolerances: Tolerances
    output_stats: dict[str, ErrorStats]
    routing_agreement: float
    polygraphy_passed: bool
    passed: bool
    failures: list[str] = field(default_factory=list)
    per_expert_mean_abs: dict[int, float] = field(default_factory=dict)
    # quantised graphs: the kernels vs the fake-quant PyTorch reference of the same integer math (kernel error
    # alone; the comparison with the fp32 model above is quantisation + kernel error)
    kernel_vs_fake_quant: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "precision": self.precision,
            "shapes": [list(s) for s in self.shapes],
            "tolerances": self.tolerances.to_dict(),
            "outputs": {k: v.to_dict() for k, v in self.output_stats.items()},
            "routing_agreement": self.routing_agreement,
            "polygraphy_passed": self.polygraphy_passed,
            "passed": self.passed,
            "failures": self.failures,
            "per_expert_mean_abs": {str(k): v for k, v in self.per_expert_mean_abs.items()},
            "kernel_vs_fake_quant": self.kernel_vs_fake_quant,
            "environment": self.environment,
            "files": self.files,
        }


def make_inputs(hidden_size: int, shapes: Iterable[tuple[int, int]], seed: int, dtype: Any) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{"hidden_states": rng.standard_normal((b, s, hidden_size)).astype(dtype)} for b, s in shapes]


def pytorch_reference(model: Any, feeds: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Outputs of the fp32 PyTorch model for each feed (inputs upcast to fp32)."""
    import torch

    outputs = []
    model = model.float().eval()
    tracking = model.track_stats
    model.track_stats = False
    try:
        with torch.no_grad():
            for feed in feeds:
                x = torch.from_numpy(np.asarray(feed["hidden_states"], dtype=np.float32))
                y, info = model(x, return_routing_info=True)
                outputs.append({"output": y.numpy(), "expert_ids": info.ids.numpy(),
                                "expert_weights": info.weights.float().numpy()})
    finally:
        model.track_stats = tracking
    return outputs


def _polygraphy_compare(
    reference: list[dict[str, np.ndarray]],
    tolerances: Tolerances,
    out_dir: Path,
    verbose: bool,
    *,
    runner: Any = None,
    feeds: list[dict[str, np.ndarray]] | None = None,
    actual: list[dict[str, np.ndarray]] | None = None,
    runner_name: str = "backend",
) -> tuple[bool, list[dict[str, np.ndarray]], dict[str, str]]:
    """Save the PyTorch outputs as Polygraphy RunResults and compare a backend with them.

    The backend is a Polygraphy ``runner`` run on ``feeds`` (ONNX Runtime), or ``actual`` outputs already computed
    (units run through their Engine). Returns (passed, the backend's outputs, files written).
    """
    from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.logger import G_LOGGER

    if not verbose:  # Polygraphy's per-iteration tables are useful when debugging, noise otherwise
        G_LOGGER.module_severity = G_LOGGER.ERROR

    # routing ids are compared by routing_agreement(), not elementwise
    compared = ("output", "expert_weights")
    ref_results = RunResults()
    ref_results.append(("pytorch", [IterationResult({k: r[k] for k in compared}, runner_name="pytorch")
                                    for r in reference]))
    ref_path = out_dir / "pytorch_outputs.json"
    ref_results.save(str(ref_path))
    if runner is not None:
        backend_results = Comparator.run([runner], data_loader=feeds)
        actual = [dict(iteration) for iteration in backend_results[0][1]]
    else:
        assert actual is not None
        backend_results = RunResults()
        backend_results.append((runner_name, [IterationResult({k: a[k] for k in compared}, runner_name=runner_name)
                                              for a in actual]))
    all_results = RunResults()
    all_results.extend(ref_results)
    all_results.extend(backend_results)
    ref_max = max((float(np.max(np.abs(r["output"]))) for r in reference if r["output"].size), default=1.0)
    compare = SimpleCompareFunc(
        rtol={name: tolerances.rtol for name in compared},
        atol={"output": tolerances.atol_rel * ref_max, "expert_weights": tolerances.atol_rel},
        check_error_stat=tolerances.check_error_stat,
        error_quantile=tolerances.error_quantile,
    )
    accuracy = Comparator.compare_accuracy(all_results, compare_func=compare)
    return bool(accuracy), actual, {"pytorch_outputs": str(ref_path)}


def _verdict(
    reference: list[dict[str, np.ndarray]], actual: list[dict[str, np.ndarray]], tolerances: Tolerances,
    poly_passed: bool,
) -> tuple[dict[str, ErrorStats], float, list[str]]:
    """Error statistics, routing agreement and the list of failed criteria."""
    stats = {
        name: merge_stats([error_stats(r[name], a[name]) for r, a in zip(reference, actual, strict=True)])
        for name in ("output", "expert_weights")
    }
    ref_ids = np.concatenate([r["expert_ids"].reshape(-1, r["expert_ids"].shape[-1]) for r in reference])
    got_ids = np.concatenate([a["expert_ids"].reshape(-1, a["expert_ids"].shape[-1]) for a in actual])
    agreement = routing_agreement(ref_ids, got_ids)
    failures = []
    if not poly_passed:
        failures.append(f"Polygraphy accuracy check failed (rtol={tolerances.rtol}, "
                        f"atol={tolerances.atol_rel}*max|ref|, {tolerances.check_error_stat})")
    if not stats["output"].cosine >= tolerances.min_cosine:
        failures.append(f"output cosine {stats['output'].cosine:.8f} < {tolerances.min_cosine}")
    if not agreement >= tolerances.min_routing_agreement:
        failures.append(f"routing agreement {agreement:.4%} < {tolerances.min_routing_agreement:.4%}")
    return stats, agreement, failures


def check_onnx(
    model: Any,
    onnx_path: str | Path,
    out_dir: str | Path,
    *,
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    seed: int = 1234,
    tolerances: Tolerances | None = None,
    threads: int | None = None,
    plots: bool = True,
    verbose: bool = False,
) -> CheckReport:
    """Compare the PyTorch ``model`` with the ONNX graph at ``onnx_path`` on ONNX Runtime (CPU)."""
    import onnx

    from pimoe_export.runtime.ort import check_ort_library, create_session, find_ort_library

    if not Path(onnx_path).is_file():
        from pimoe_export.errors import ArtifactError

        raise ArtifactError(f"{onnx_path} does not exist; write it with `pimoe-export export` or "
                            "`pimoe-export quantize`")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    precision = meta.get("pimoe.precision", "fp32")
    tolerances = tolerances or TOLERANCES.get(precision, TOLERANCES["fp32"])
    session = create_session(onnx_path, threads=threads)
    input_dtype = np.float16 if "float16" in session.get_inputs()[0].type else np.float32
    feeds = make_inputs(model.hidden_size, shapes, seed, input_dtype)
    reference = pytorch_reference(model, feeds)
    from polygraphy.backend.onnxrt import OnnxrtRunner

    poly_passed, actual, files = _polygraphy_compare(reference, tolerances, out_dir, verbose,
                                                     runner=OnnxrtRunner(session, name="onnxrt-pimoe"), feeds=feeds)
    stats, agreement, failures = _verdict(reference, actual, tolerances, poly_passed)
    per_expert = _per_expert_error(reference, actual)
    kernel = {}
    if precision in QUANTIZED:
        kernel = _kernel_vs_fake_quant(model, onnx_path, feeds, actual)
        if not kernel["output"]["rel_l2"] <= MAX_KERNEL_REL_L2:
            failures.append(f"kernels differ from the fake-quant reference: rel L2 {kernel['output']['rel_l2']:.2e} "
                            f"> {MAX_KERNEL_REL_L2}")
    lib = check_ort_library(str(find_ort_library()))
    report = CheckReport(
        backend="onnxruntime-cpu+pimoe",
        precision=precision,
        shapes=[tuple(s) for s in shapes],
        tolerances=tolerances,
        output_stats=stats,
        routing_agreement=agreement,
        polygraphy_passed=poly_passed,
        passed=not failures,
        failures=failures,
        per_expert_mean_abs=per_expert,
        kernel_vs_fake_quant=kernel,
        environment=_environment(lib, str(onnx_path)),
        files=files,
    )
    if plots:
        report.files.update(_plots(reference, actual, per_expert, out_dir))
    write_report(report, out_dir)
    return report


def check_unit(
    model: Any,
    unit_dir: str | Path,
    out_dir: str | Path,
    *,
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    seed: int = 1234,
    plots: bool = True,
    verbose: bool = False,
) -> CheckReport:
    """Compare the PyTorch ``model`` with a deployable unit (its manifest verified first).

    ONNX Runtime units go through :func:`check_onnx` (Polygraphy's OnnxrtRunner); TensorRT units run through the
    unit's ``Engine`` (Polygraphy's TrtRunner, one per thread), and their outputs are compared with the saved
    PyTorch RunResults by ``Comparator.compare_accuracy`` with the same tolerances.
    """
    from pimoe_export.build.manifest import read_manifest
    from pimoe_export.runtime.engine import Engine

    unit_dir = Path(unit_dir)
    manifest = read_manifest(unit_dir)
    if manifest.backend == "onnxruntime":
        return check_onnx(model, unit_dir / manifest.artifact("onnx").file, out_dir, shapes=shapes, seed=seed,
                          plots=plots, verbose=verbose)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    engine = Engine.load(unit_dir)
    precision = manifest.precision
    tolerances = TOLERANCES.get(precision, TOLERANCES["fp32"])
    feeds = make_inputs(model.hidden_size, shapes, seed, engine.input_dtype)
    reference = pytorch_reference(model, feeds)
    actual = []
    for feed in feeds:
        y, ids, w = engine.run(feed["hidden_states"], routing=True)
        actual.append({"output": y, "expert_ids": ids, "expert_weights": w})
    engine.close()
    poly_passed, actual, files = _polygraphy_compare(reference, tolerances, out_dir, verbose, actual=actual,
                                                     runner_name=manifest.backend)
    stats, agreement, failures = _verdict(reference, actual, tolerances, poly_passed)
    report = CheckReport(
        backend=f"{manifest.backend} {manifest.backend_version}", precision=precision,
        shapes=[tuple(s) for s in shapes],
        tolerances=tolerances, output_stats=stats, routing_agreement=agreement, polygraphy_passed=poly_passed,
        passed=not failures, failures=failures, per_expert_mean_abs=_per_expert_error(reference, actual),
        environment={"unit": str(unit_dir), "targets": manifest.target_sms, "machine": platform.machine()},
        files=files,
    )
    if plots:
        report.files.update(_plots(reference, actual, report.per_expert_mean_abs, out_dir))
    write_report(report, out_dir)
    return report


def _kernel_vs_fake_quant(model: Any, onnx_path: str | Path, feeds: list[dict[str, np.ndarray]],
                          actual: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    import torch

    from pimoe_export.quantize.int8 import FakeQuantPiMoE, read_quant_params

    reference = FakeQuantPiMoE(model.float().eval(), read_quant_params(onnx_path)).eval()
    outs, ids = [], []
    with torch.no_grad():
        for feed in feeds:
            y, i, _ = reference(torch.from_numpy(np.asarray(feed["hidden_states"], np.float32)))
            outs.append(y.numpy())
            ids.append(i.numpy().reshape(-1, i.shape[-1]))
    stats = merge_stats([error_stats(r, a["output"]) for r, a in zip(outs, actual, strict=True)])
    got = np.concatenate([a["expert_ids"].reshape(-1, a["expert_ids"].shape[-1]) for a in actual])
    return {"output": stats.to_dict(), "routing_agreement": routing_agreement(np.concatenate(ids), got),
            "max_rel_l2": MAX_KERNEL_REL_L2}


def _per_expert_error(reference: list[dict[str, np.ndarray]], actual: list[dict[str, np.ndarray]]) -> dict[int, float]:
    """Mean |error| of the output grouped by each token's reference top-1 expert."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for r, a in zip(reference, actual, strict=True):
        top1 = r["expert_ids"][..., 0].reshape(-1)
        err = np.abs(a["output"].astype(np.float64) - r["output"]).reshape(len(top1), -1).mean(axis=1)
        for e, v in zip(top1.tolist(), err.tolist(), strict=True):
            sums[e] = sums.get(e, 0.0) + v
            counts[e] = counts.get(e, 0) + 1
    return {e: sums[e] / counts[e] for e in sorted(sums)}


def _environment(lib: dict[str, Any], onnx_path: str) -> dict[str, Any]:
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "cpu_isa": lib["cpu_isa"], "library": lib["path"],
            "onnx": onnx_path, "machine": platform.machine(), "python": platform.python_version()}


def _plots(reference, actual, per_expert: dict[int, float], out_dir: Path) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional; the JSON/Markdown report is complete without them
        return {}
    errors = np.concatenate([np.abs(a["output"].astype(np.float64) - r["output"]).ravel()
                             for r, a in zip(reference, actual, strict=True)])
    files = {}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    positive = errors[errors > 0]
    if positive.size:
        ax.hist(np.log10(positive), bins=60, color="#3a7")
        ax.set_xlabel("log10 |output error|")
    else:
        ax.text(0.5, 0.5, "all errors are exactly 0", ha="center", va="center")
    ax.set_ylabel("elements")
    ax.set_title(f"output error histogram ({errors.size} elements, {int((errors == 0).sum())} exact)")
    fig.tight_layout()
    path = out_dir / "error_histogram.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files["error_histogram"] = str(path)
    if per_expert:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([str(e) for e in per_expert], list(per_expert.values()), color="#37a")
        ax.set_xlabel("top-1 expert")
        ax.set_ylabel("mean |output error|")
        ax.set_title("error per expert")
        fig.tight_layout()
        path = out_dir / "per_expert_error.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files["per_expert_error"] = str(path)
    return files


def write_report(report: CheckReport, out_dir: Path) -> None:
    report.files["json"] = str(out_dir / "report.json")
    report.files["markdown"] = str(out_dir / "report.md")
    (out_dir / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    lines = [
        f"# pimoe-export parity report: {report.backend}, {report.precision}",
        "",
        f"**{'PASSED' if report.passed else 'FAILED'}** — reference: PyTorch fp32 model; shapes [batch, seq] "
        f"{report.shapes}",
        "",
        "| output | max abs | mean abs | rel L2 | cosine | max abs(ref) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in report.output_stats.items():
        lines.append(f"| {name} | {s.max_abs:.3e} | {s.mean_abs:.3e} | {s.rel_l2:.3e} | {s.cosine:.8f} | "
                     f"{s.ref_max_abs:.3e} |")
    t = report.tolerances
    lines += [
        "",
        f"Top-k routing agreement (tokens whose expert set is unchanged): **{report.routing_agreement:.4%}** "
        f"(required ≥ {t.min_routing_agreement:.2%})",
        "",
        f"Polygraphy `Comparator.compare_accuracy`: {'passed' if report.polygraphy_passed else 'failed'} "
        f"(rtol {t.rtol}, atol {t.atol_rel} × max|ref|, check_error_stat={t.check_error_stat}"
        + (f", quantile {t.error_quantile}" if t.check_error_stat == "quantile" else "") + ")",
        "",
    ]
    if report.kernel_vs_fake_quant:
        k = report.kernel_vs_fake_quant["output"]
        lines += [
            "## Kernel error alone: backend vs the fake-quant PyTorch reference (same integer math)",
            "",
            "| output | max abs | mean abs | rel L2 | cosine |",
            "|---|---|---|---|---|",
            f"| output | {k['max_abs']:.3e} | {k['mean_abs']:.3e} | {k['rel_l2']:.3e} | {k['cosine']:.8f} |",
            "",
            f"Routing agreement with the fake-quant reference: {report.kernel_vs_fake_quant['routing_agreement']:.4%}; "
            f"required rel L2 ≤ {report.kernel_vs_fake_quant['max_rel_l2']}. The table above (vs the fp32 model) is "
            "quantisation error plus kernel error.",
            "",
        ]
    if report.failures:
        lines += ["## Failures", ""] + [f"- {f}" for f in report.failures] + [""]
    if report.per_expert_mean_abs:
        lines += ["## Mean |error| by top-1 expert", "", "| expert | mean abs |", "|---|---|"]
        lines += [f"| {e} | {v:.3e} |" for e, v in report.per_expert_mean_abs.items()] + [""]
    lines += ["## Environment", ""] + [f"- {k}: {v}" for k, v in report.environment.items()] + [""]
    lines += ["## Files", ""] + [f"- {k}: {Path(v).name}" for k, v in report.files.items()] + [""]
    (out_dir / "report.md").write_text("\n".join(lines))
