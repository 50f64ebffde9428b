"""`pimoe-export pipeline`: the whole job, step by step, into one output directory.

    model -> export -> int8 -> units -> engines -> runtime -> check -> benchmark

Each step takes the :class:`PipelineContext` (what earlier steps produced) and returns its details, or a
:class:`Skip` with the reason; ``pipeline.json`` records every step as done / skipped / failed. The record says
``"status": "running"`` from the first moment and the verdict is written last, so an interrupted run (Ctrl-C,
SIGTERM, a kill) is never reported as passed; a skipped step never counts as a pass. Every entry the pipeline
writes is claimed in the output directory first: files there that pimoe-export did not write are left alone unless
``force``.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pimoe_export._files import OutputDir

RECORD = "pipeline.json"
#: every entry a pipeline run may write into its output directory (checked before the first step)
ENTRIES = [RECORD, "model", "model.pruned", "model.onnx", "model.standard.onnx", "model.fp16.onnx", "model.int8.onnx",
           "ort-fp32", "ort-fp16", "ort-int8", "timing.cache", "report", "report_fp16", "report_int8",
           "benchmark.md", "benchmark.json",
           *[f"{kind}-{p}" for kind in ("trt", "trt-rtx") for p in ("fp32", "fp16", "int8")],
           *[f"report_{kind}-{p}" for kind in ("trt", "trt-rtx") for p in ("fp32", "fp16", "int8")]]


@dataclass(frozen=True)
class Skip:
    """A step that did not apply here (the reason is recorded; the pipeline can still pass)."""

    reason: str


@dataclass
class PipelineContext:
    """What the steps share: the output directory and the artefacts produced so far."""

    out: OutputDir
    preset: str | None
    model_dir: Path | None
    seed: int
    bench_repeats: int
    model: Any = None
    settings: Any = None  # DeploymentSettings of the checkpoint
    onnx: dict[str, Path] = field(default_factory=dict)  # "fp32", "standard", "fp16", "int8"
    units: list[str] = field(default_factory=list)
    engine_units: list[str] = field(default_factory=list)  # engine units this machine can run
    calib_text: Path | None = None  # whole models: calibration/evaluation sentences
    calibration: list[dict[str, Any]] | None = None  # whole models: feeds of the model's named inputs
    check_feeds: list[dict[str, Any]] | None = None  # whole models: held-out feeds for the parity checks
    int8_mode: str = "w8a8"  # static ("w8a8") or dynamic per-row ("w8a8_dynamic") activation scales

    @property
    def root(self) -> Path:
        return self.out.root


@dataclass
class StepRecord:
    name: str
    status: str = "pending"  # done | skipped | failed
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "seconds": round(self.seconds, 3), "reason": self.reason,
                "detail": self.detail}


# ------------------------------------------------------------------------------------------ steps
def step_model(ctx: PipelineContext) -> dict[str, Any]:
    import torch

    from pimoe_export.model.enhanced import DeploymentSettings
    from pimoe_export.model.factory import create_from_preset
    from pimoe_export.model.io import load_pretrained
    from pimoe_export.model.summary import summarize

    if ctx.model_dir is not None:
        ctx.model = load_pretrained(ctx.model_dir)
    else:
        ctx.model = create_from_preset(ctx.preset, seed=ctx.seed)
        ctx.model_dir = ctx.out.claim_dir("model").root
        ctx.model.save_pretrained(ctx.model_dir)
    ctx.settings = DeploymentSettings.of(ctx.model.config)
    detail: dict[str, Any] = {}
    if ctx.settings.enable_pruning:  # EnhancedPiMoEIntegration(enable_pruning=True): prune before export
        from pimoe_export.model.pruning import magnitude_prune, structured_prune

        prune = structured_prune if ctx.settings.pruning_structured else magnitude_prune
        probe = torch.randn(2, 32, ctx.model.hidden_size, generator=torch.Generator().manual_seed(0))
        detail["pruning"] = prune(ctx.model, ctx.settings.pruning_amount, probe).to_dict()
        ctx.model_dir = ctx.out.claim_dir("model.pruned").root
        ctx.model.save_pretrained(ctx.model_dir)
    summary = summarize(ctx.model.config)
    return {"model_dir": str(ctx.model_dir), "params": summary["params_total"],
            "expert_groups": [g["experts"] for g in summary["expert_groups"]],
            "deployment": ctx.settings.to_dict() if ctx.settings.recorded else "none recorded (defaults)", **detail}


def step_export(ctx: PipelineContext) -> dict[str, Any]:
    from pimoe_export.export.onnx_export import export_onnx

    custom = export_onnx(ctx.model, ctx.out.claim("model.onnx"))
    standard = export_onnx(ctx.model, ctx.out.claim("model.standard.onnx"), standard_ops=True)
    ctx.onnx.update(fp32=custom.path, standard=standard.path)
    result = {"onnx": str(custom.path), "onnx_standard_ops": str(standard.path),
              "pimoe_nodes": {k: v for k, v in custom.node_counts.items() if k.startswith("pimoe::")}}
    if ctx.settings.export_precision == "fp16":  # optimization_level advanced/maximum
        ctx.onnx["fp16"] = export_onnx(ctx.model, ctx.out.claim("model.fp16.onnx"), precision="fp16").path
        result["onnx_fp16"] = str(ctx.onnx["fp16"])
    return result


def step_int8(ctx: PipelineContext) -> dict[str, Any]:
    from pimoe_export.quantize import quantize_model

    result = quantize_model(ctx.model, ctx.out.claim("model.int8.onnx"), method=ctx.settings.calibration_method,
                            fp32_onnx=ctx.onnx["fp32"], mode=ctx.int8_mode)
    ctx.onnx["int8"] = result.onnx_path
    info = result.params.info
    return {"onnx_int8": str(result.onnx_path), "method": info["method"], "mode": ctx.int8_mode,
            "calibration_tokens": info["calibration_tokens"], "calibration_data": info["calibration_data"],
            "uncalibrated_experts": info["uncalibrated_experts"]}


def step_units(ctx: PipelineContext) -> dict[str, Any]:
    from pimoe_export.build.units import package_ort

    units = {}
    for key, name in (("fp32", "ort-fp32"), ("fp16", "ort-fp16"), ("int8", "ort-int8")):
        if key in ctx.onnx:
            manifest = package_ort(ctx.onnx[key], ctx.out.claim_dir(name).root, force=True)
            units[name] = {"backend": manifest.backend, "precision": manifest.precision,
                           "manifest": str(ctx.root / name / "manifest.json")}
            ctx.units.append(name)
    return units


def step_engines(ctx: PipelineContext) -> dict[str, Any] | Skip:
    from pimoe_export.build.units import BuildOptions, build_unit, detect_flavour
    from pimoe_export.errors import BackendUnavailableError

    try:
        flavour = detect_flavour("auto")
    except BackendUnavailableError as exc:
        return Skip(f"no TensorRT builder installed ({exc})")
    built = {}
    for key, precision in (("fp32", "fp32"), ("fp16", "fp16"), ("int8", "int8")):
        if key not in ctx.onnx:
            continue
        name = f"{'trt' if flavour == 'tensorrt' else 'trt-rtx'}-{precision}"
        options = BuildOptions(flavour=flavour, optimization_level=ctx.settings.builder_optimization_level,
                               timing_cache=str(ctx.out.claim("timing.cache")))
        manifest = build_unit(ctx.onnx[key], ctx.out.claim_dir(name).root, options=options, force=True)
        built[name] = {"backend": manifest.backend, "version": manifest.backend_version,
                       "targets": manifest.target_sms, "plugin_layers": manifest.build_options["plugin_layers"]}
        ctx.units.append(name)
    return built


def step_runtime(ctx: PipelineContext) -> dict[str, Any]:
    from pimoe_export.errors import BackendUnavailableError
    from pimoe_export.runtime.engine import Engine

    x = np.random.default_rng(0).standard_normal((1, 4, ctx.model.hidden_size))
    loaded = {}
    for name in ctx.units:
        try:
            engine = Engine.load(ctx.root / name)
        except BackendUnavailableError as exc:  # e.g. an RTX engine on a machine without an RTX GPU
            loaded[name] = {"loaded": False, "reason": str(exc).split(";")[0]}
            continue
        with engine:
            y = engine.run(x.astype(engine.input_dtype))
            if not np.isfinite(y).all():
                raise RuntimeError(f"{name}: non-finite outputs on finite inputs")
            loaded[name] = {"loaded": True, "backend": engine.backend, "output_shape": list(y.shape)}
            if engine.backend != "onnxruntime":
                ctx.engine_units.append(name)
    return loaded


def step_check(ctx: PipelineContext) -> dict[str, Any]:
    from pimoe_export.validate.check import check_onnx, check_unit

    feeds = ctx.check_feeds  # None: random inputs of the layer's interface
    checks: list[tuple[str, Callable[[Path], Any]]] = [
        (name, lambda out, path=ctx.onnx[key]: check_onnx(ctx.model, path, out, force=True, feeds=feeds))
        for key, name in (("fp32", "report"), ("fp16", "report_fp16"), ("int8", "report_int8")) if key in ctx.onnx]
    # engine units that this machine can run (a TensorRT GPU box) are checked through their Engine
    checks += [(f"report_{unit}", lambda out, unit=unit: check_unit(ctx.model, ctx.root / unit, out, force=True,
                                                                    feeds=feeds))
               for unit in ctx.engine_units]
    reports: dict[str, Any] = {}
    failed = []
    for name, check in checks:
        rep = check(ctx.out.claim_dir(name).root)
        reports[name] = {"passed": rep.passed, "precision": rep.precision, "backend": rep.backend,
                         "routing_agreement": rep.routing_agreement, "output": rep.output_stats[rep.primary].to_dict(),
                         "routing_by_layer": rep.routing_by_layer, "embedding": rep.embedding,
                         "failures": rep.failures, "files": rep.files}
        if not rep.passed:
            failed.append(f"{name}: {rep.failures}")
    if failed:
        raise RuntimeError(f"parity check failed: {failed}")
    return reports


def step_benchmark(ctx: PipelineContext) -> dict[str, Any]:
    from pimoe_export.bench.summary import benchmark_layer, render_markdown

    variants = {"ort_pimoe_ops": ctx.onnx["fp32"], "ort_standard_ops": ctx.onnx["standard"]}
    if "int8" in ctx.onnx:
        variants["ort_pimoe_int8"] = ctx.onnx["int8"]
    rows = benchmark_layer(ctx.model, variants, tokens=(1, 16, 128), repeats=ctx.bench_repeats)
    markdown, data = ctx.out.claim("benchmark.md"), ctx.out.claim("benchmark.json")
    markdown.write_text(render_markdown(rows, ctx.bench_repeats))
    data.write_text(json.dumps(rows, indent=2) + "\n")
    return {"rows": rows, "markdown": str(markdown)}


# ------------------------------------------------------------------------------------------ whole models
def step_whole_model(ctx: PipelineContext) -> dict[str, Any]:
    from pimoe_export.export.model_export import moe_layers
    from pimoe_export.hf.moefy import load_moefied, model_feeds
    from pimoe_export.model.enhanced import DeploymentSettings

    assert ctx.model_dir is not None
    ctx.model = load_moefied(ctx.model_dir)
    ctx.settings = DeploymentSettings()
    ctx.calibration, ctx.check_feeds, source = model_feeds(ctx.model_dir, ctx.calib_text,
                                                           int(ctx.model.config.vocab_size), ctx.seed)
    return {"model_dir": str(ctx.model_dir), "architecture": type(ctx.model).__name__,
            "pimoe_layers": sorted(moe_layers(ctx.model)), "data": source}


def step_whole_export(ctx: PipelineContext) -> dict[str, Any]:
    import torch

    from pimoe_export.export.model_export import export_model

    assert ctx.calibration is not None
    example = {k: torch.from_numpy(v[:2]) for k, v in ctx.calibration[0].items()}
    result = export_model(ctx.model, ctx.out.claim("model.onnx"), example, routing_outputs=True)
    ctx.onnx["fp32"] = result.path
    return {"onnx": str(result.path), "pimoe_nodes": {k: v for k, v in result.node_counts.items()
                                                      if k.startswith("pimoe::")}}


def step_whole_int8(ctx: PipelineContext) -> dict[str, Any]:
    from pimoe_export.quantize.model_int8 import quantize_whole_model

    assert ctx.calibration is not None
    result = quantize_whole_model(ctx.model, ctx.out.claim("model.int8.onnx"), ctx.calibration,
                                  fp32_onnx=ctx.onnx["fp32"], method=ctx.settings.calibration_method,
                                  mode=ctx.int8_mode)
    ctx.onnx["int8"] = result.onnx_path
    return {"onnx_int8": str(result.onnx_path), "layers": len(result.params), "mode": ctx.int8_mode}


def step_whole_runtime(ctx: PipelineContext) -> dict[str, Any]:
    from pimoe_export.errors import BackendUnavailableError
    from pimoe_export.runtime.engine import Engine

    assert ctx.check_feeds is not None
    loaded = {}
    for name in ctx.units:
        try:
            engine = Engine.load(ctx.root / name)
        except BackendUnavailableError as exc:
            loaded[name] = {"loaded": False, "reason": str(exc).split(";")[0]}
            continue
        with engine:
            outputs = engine.run_named(ctx.check_feeds[0])
            if not all(np.isfinite(v).all() for v in outputs.values()):
                raise RuntimeError(f"{name}: non-finite outputs on real inputs")
            loaded[name] = {"loaded": True, "backend": engine.backend,
                            "outputs": {k: list(v.shape) for k, v in outputs.items()}}
            if engine.backend != "onnxruntime":
                ctx.engine_units.append(name)
    return loaded


Step = Callable[[PipelineContext], "dict[str, Any] | Skip"]
#: (name, step, later steps need it: a failure stops the pipeline)
STEPS: tuple[tuple[str, Step, bool], ...] = (
    ("model", step_model, True), ("export", step_export, True), ("int8", step_int8, False),
    ("units", step_units, True), ("engines", step_engines, False), ("runtime", step_runtime, False),
    ("check", step_check, False), ("benchmark", step_benchmark, False),
)
#: a saved whole model (pimoe-export moefy): the same chain over named inputs, calibrated on real inputs
MODEL_STEPS: tuple[tuple[str, Step, bool], ...] = (
    ("model", step_whole_model, True), ("export", step_whole_export, True), ("int8", step_whole_int8, False),
    ("units", step_units, True), ("engines", step_engines, False), ("runtime", step_whole_runtime, False),
    ("check", step_check, False),
)


# ------------------------------------------------------------------------------------------ running
class PipelineRecord:
    """``pipeline.json``: the state of the run, rewritten after every step; the verdict comes last."""

    def __init__(self, out: OutputDir) -> None:
        self.path = out.claim(RECORD)
        self.steps: list[StepRecord] = []
        self.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.write("running")

    def write(self, status: str, passed: bool = False) -> dict[str, Any]:
        summary = {"status": status, "passed": passed, "started": self.started, "output": str(self.path.parent),
                   "steps": [s.to_dict() for s in self.steps]}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        tmp.replace(self.path)
        return summary


def run_step(name: str, step: Step, ctx: PipelineContext, log: Callable[[str], None]) -> StepRecord:
    record = StepRecord(name)
    start = time.perf_counter()
    try:
        out = step(ctx)
        if isinstance(out, Skip):
            record.status, record.reason = "skipped", out.reason
        else:
            record.status, record.detail = "done", out
    except Exception as exc:  # recorded, reported, and the pipeline fails (KeyboardInterrupt is not caught here)
        record.status, record.reason = "failed", f"{type(exc).__name__}: {exc}"
        record.detail["traceback"] = traceback.format_exc(limit=6)
    record.seconds = time.perf_counter() - start
    mark = {"done": "ok", "skipped": "skipped", "failed": "FAILED"}[record.status]
    log(f"      {mark} ({record.seconds:.1f} s){': ' + record.reason if record.reason else ''}")
    return record


def run_pipeline(
    *,
    output: Path,
    preset: str | None,
    model_dir: Path | None,
    seed: int = 0,
    bench_repeats: int = 20,
    progress: bool = True,
    force: bool = False,
    calib_text: Path | None = None,
    int8_mode: str = "w8a8",
) -> dict[str, Any]:
    """Run every step into ``output``; returns (and writes) the pipeline record. A ``model_dir`` written by
    `pimoe-export moefy` runs the whole-model chain (MODEL_STEPS), calibrated on ``calib_text`` when given.
    ``int8_mode``: "w8a8" (static activation scales) or "w8a8_dynamic" (per-row scales at run time)."""
    def log(text: str) -> None:
        if progress:
            print(text, flush=True)

    out = OutputDir(output, force=force, command="pipeline")
    out.refuse_foreign(ENTRIES)
    ctx = PipelineContext(out, preset, Path(model_dir) if model_dir else None, seed, bench_repeats,
                          calib_text=calib_text, int8_mode=int8_mode)
    from pimoe_export.hf.moefy import is_moefied

    steps = MODEL_STEPS if model_dir is not None and is_moefied(model_dir) else STEPS
    record = PipelineRecord(out)
    try:
        for index, (name, step, required) in enumerate(steps, 1):
            log(f"[{index}/{len(steps)}] {name} ...")
            record.steps.append(run_step(name, step, ctx, log))
            record.write("running")
            if record.steps[-1].status == "failed" and required:
                break  # later steps need this one's artefacts
    except BaseException:
        record.write("interrupted")
        raise
    passed = len(record.steps) == len(steps) and all(s.status != "failed" for s in record.steps)
    summary = record.write("finished", passed)
    log(f"pipeline {'PASSED' if passed else 'FAILED'}; skipped: "
        f"{[s.name for s in record.steps if s.status == 'skipped'] or 'none'}; summary in {record.path}")
    return summary
