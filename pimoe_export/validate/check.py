"""Parity check: the PyTorch reference against an artefact, one code path for every artefact.

    reference runner (PyTorch, fp32)  ─┐
                                       ├─ Polygraphy Comparator.run ─► compare (tolerances, verdict) ─► report
    artefact runner (ONNX or a unit)  ─┘

:func:`check_onnx` runs a bare ONNX graph on ONNX Runtime with the build tree's op library; :func:`check_unit` runs
exactly what a unit ships (its library, its engine) through our :class:`Engine`, after verifying it. Both go
through :func:`run_check`. The inputs and the PyTorch outputs are saved in Polygraphy's formats (``inputs.json``,
``pytorch_outputs.json``), so the comparison can be replayed with Polygraphy's CLI (docs/precision.md).
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pimoe_export._files import OutputDir
from pimoe_export.errors import ArtifactError
from pimoe_export.interface import (
    LAYER_OUTPUT,
    MAX_KERNEL_REL_L2,
    MODEL_MASK_INPUT,
    GraphInterface,
    Tolerances,
    read_metadata,
    tolerances_for,
)
from pimoe_export.validate.compare import (
    Compared,
    compare_settings,
    kernel_vs_fake_quant,
    layer_quantization_error,
    per_expert_error,
    polygraphy_accuracy,
    polygraphy_cli_args,
    verdict,
)
from pimoe_export.validate.reference import PyTorchRunner, make_inputs
from pimoe_export.validate.report import CheckReport, write_report
from pimoe_export.validate.report import plots as write_plots

DEFAULT_SHAPES: tuple[tuple[int, int], ...] = ((1, 1), (2, 16), (4, 64))
#: what a check writes into its report directory
REPORT_FILES = ("inputs.json", "pytorch_outputs.json", "report.json", "report.md", "error_histogram.png",
                "per_expert_error.png")


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
    force: bool = False,
    feeds: Sequence[dict[str, Any]] | None = None,
) -> CheckReport:
    """Compare the PyTorch ``model`` with the ONNX graph at ``onnx_path`` on ONNX Runtime (CPU)."""
    from pimoe_export.native.libraries import check_ort_library, find_ort_library, import_onnxruntime
    from pimoe_export.ops.validation import check_graph
    from pimoe_export.validate.runners import onnx_runner

    onnx_path = Path(onnx_path)
    meta = read_metadata(onnx_path)
    check_graph(onnx_path)  # a contract violation is one clear error, before ONNX Runtime sees the graph
    lib = check_ort_library(str(find_ort_library()))
    ort = import_onnxruntime()
    interface = meta.interface
    environment = {"onnxruntime": ort.__version__, "cpu_isa": lib["cpu_isa"], "library": lib["path"],
                   "onnx": str(onnx_path)}
    return run_check(model, onnx_runner(onnx_path, threads), interface, meta.precision, "onnxruntime-cpu+pimoe",
                     out_dir, shapes=shapes, seed=seed, tolerances=tolerances, plots=plots, verbose=verbose,
                     force=force, quantized_onnx=onnx_path if meta.quantized else None, environment=environment,
                     replay=("--pimoe-onnxrt", onnx_path), feeds=feeds, layer_configs=meta.layer_configs)


def check_unit(
    model: Any,
    unit_dir: str | Path,
    out_dir: str | Path,
    *,
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    seed: int = 1234,
    plots: bool = True,
    verbose: bool = False,
    force: bool = False,
    feeds: Sequence[dict[str, Any]] | None = None,
) -> CheckReport:
    """Compare the PyTorch ``model`` with a deployable unit: verified first, then run exactly as it ships (its own
    library and ONNX or engine) through ``Engine``."""
    from pimoe_export.validate.runners import EngineRunner

    runner = EngineRunner(unit_dir)
    try:
        m = runner.engine.manifest
        onnx_path = runner.engine.unit.files["onnx"]
        environment = {"unit": str(unit_dir), "targets": m.target_sms, "library": str(
            runner.engine.unit.files.get("ort_library") or runner.engine.unit.files.get("plugin_library"))}
        return run_check(model, runner, runner.engine.interface, m.precision, f"{m.backend} {m.backend_version}",
                         out_dir, shapes=shapes, seed=seed, plots=plots, verbose=verbose, force=force,
                         quantized_onnx=onnx_path if m.precision in ("w8a8", "w8a8_dynamic") else None,
                         environment=environment, replay=("--pimoe-unit", Path(unit_dir)), feeds=feeds,
                         layer_configs=m.layer_configs)
    finally:
        runner.close()


def check_layers(model: Any, layer_configs: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """The artefact's PiMoE layer configs, refused unless ``model`` holds the same layers (module paths, hidden
    sizes): a check compares an artefact with the model it was exported from."""
    from pimoe_export.model.source import moe_layers

    layers = moe_layers(model)
    if layer_configs is None:
        return {path: layer.config.to_dict() for path, layer in layers.items()}
    fix = "check an artefact against the checkpoint it was exported from"
    if sorted(layers) != sorted(layer_configs):
        raise ArtifactError(f"the checkpoint's PiMoE layers {sorted(layers)} are not the artefact's "
                            f"{sorted(layer_configs)}: {fix}")
    for path, layer in layers.items():
        expected = layer_configs[path].get("hidden_size")
        if layer.hidden_size != expected:
            where = f" of {path}" if path else ""
            raise ArtifactError(f"the checkpoint's hidden size{where} {layer.hidden_size} does not match the "
                                f"artefact's {expected}: {fix}")
    return layer_configs


def _save_compared(results: Any, compared: Compared, feeds: list[dict[str, Any]],
                   out: OutputDir) -> tuple[list[Any], dict[str, str]]:
    """The compared outputs of both runners as Polygraphy RunResults entries; the inputs and the reference's
    outputs saved in Polygraphy's formats (what a replay loads)."""
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json

    entries = []
    for (name, iterations) in results:
        entry = RunResults()
        entry.append((name, [IterationResult({k: it[k] for k in compared.values}, runner_name=name)
                             for it in iterations]))
        entries.append(entry)
    files = {"inputs": str(out.claim("inputs.json")), "pytorch_outputs": str(out.claim("pytorch_outputs.json"))}
    save_json(feeds, files["inputs"])
    entries[0].save(files["pytorch_outputs"])
    return entries, files


def run_check(
    model: Any,
    runner: Any,
    interface: GraphInterface,
    precision: str,
    backend: str,
    out_dir: str | Path,
    *,
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    seed: int = 1234,
    tolerances: Tolerances | None = None,
    plots: bool = True,
    verbose: bool = False,
    force: bool = False,
    quantized_onnx: Path | None = None,
    environment: dict[str, Any] | None = None,
    replay: tuple[str, Path] | None = None,
    feeds: Sequence[dict[str, Any]] | None = None,
    layer_configs: dict[str, dict[str, Any]] | None = None,
) -> CheckReport:
    """The PyTorch ``model`` against any Polygraphy ``runner`` of an artefact with the given interface.

    ``layer_configs``: the artefact's PiMoE layer configs by module path (checked against the model's layers;
    default: the model's own).

    ``replay``: the ``polygraphy run`` runner option and model path that re-run this artefact (the report then
    gives the command that replays the comparison from the saved inputs and PyTorch outputs). ``feeds``: the inputs
    (default: random inputs of the interface at ``shapes``; a whole model with integer inputs needs real ones)."""
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    if not verbose:  # Polygraphy's per-iteration tables are useful when debugging, noise otherwise
        G_LOGGER.module_severity = G_LOGGER.ERROR
    compared = Compared.of(interface)
    layer_configs = check_layers(model, layer_configs)
    reference_runner = PyTorchRunner(model, interface)
    tolerances = tolerances or tolerances_for(precision, moe_layers=len(layer_configs))
    out = OutputDir(out_dir, force=force, command="check")
    out.refuse_foreign(list(REPORT_FILES))
    if feeds is None:
        feeds = make_inputs(interface, shapes, seed)
    else:
        feeds = [dict(f) for f in feeds]
        shapes = sorted({tuple(int(d) for d in next(iter(f.values())).shape[:2]) for f in feeds})
    results = Comparator.run([reference_runner, runner], data_loader=feeds)
    reference, actual = ([dict(it) for it in entry[1]] for entry in results)
    entries, files = _save_compared(results, compared, feeds, out)
    settings = compare_settings(tolerances, reference, compared)
    masks = [np.asarray(f[MODEL_MASK_INPUT]) for f in feeds] if all(MODEL_MASK_INPUT in f for f in feeds) else None
    result = verdict(reference, actual, tolerances, polygraphy_accuracy(*entries, settings), compared, masks)
    kernel, layer_error = {}, {}
    if quantized_onnx is not None:
        layer_error = layer_quantization_error(model, quantized_onnx, feeds)
    if quantized_onnx is not None and len(compared.routing) == 1 == len(layer_configs):
        kernel = kernel_vs_fake_quant(model, quantized_onnx, feeds, actual, MAX_KERNEL_REL_L2, compared)
        if not kernel[LAYER_OUTPUT]["rel_l2"] <= MAX_KERNEL_REL_L2:
            result.failures.append(f"kernels differ from the fake-quant reference: rel L2 "
                                   f"{kernel[LAYER_OUTPUT]['rel_l2']:.2e} > {MAX_KERNEL_REL_L2}")
    report = CheckReport(
        backend=backend, precision=precision, shapes=[tuple(s) for s in shapes], tolerances=tolerances,
        output_stats=result.output_stats, routing_agreement=result.routing_agreement,
        polygraphy_passed=result.polygraphy_passed, passed=result.passed, failures=result.failures,
        per_expert_mean_abs=per_expert_error(reference, actual, compared) if len(compared.routing) == 1 else {},
        kernel_vs_fake_quant=kernel, primary=compared.primary, routing_by_layer=result.routing_by_layer or {},
        embedding=result.embedding or {}, layer_output_error=layer_error,
        environment={**(environment or {}), "machine": platform.machine(), "python": platform.python_version()},
        files=files,
        replay=[] if replay is None else ["polygraphy", "run", str(replay[1].resolve()), replay[0], "--load-inputs",
                                          str(Path(files["inputs"]).resolve()), "--load-outputs",
                                          str(Path(files["pytorch_outputs"]).resolve()),
                                          *polygraphy_cli_args(settings)],
    )
    if plots:
        report.files.update(write_plots(reference, actual, report.per_expert_mean_abs, out, compared.primary))
    write_report(report, out)
    return report

