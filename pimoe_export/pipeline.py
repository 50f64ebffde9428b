"""`pimoe-export pipeline`: the whole job, step by step, into one output directory: one step table for a bare PiMoE
layer and a whole model alike (both are a :class:`~pimoe_export.model.source.ModelSource`).

    model ──► export ──► int8 ──► units ──► engines ──► runtime ──► check ──► benchmark
    Loaded    Exported   Quantized Packaged  Built       Ran         Checked   Benchmarked

Each step is a function of the :class:`Run` (output directory, options) and of the typed results of the earlier
steps it names: it NEEDS some (without one it cannot run: it fails, saying which step failed) and USES others (it
runs without them and says what it could not do: the check step reports that the engine units were not checked
when the runtime step failed). It returns its own typed result, or a :class:`Skip` with the reason.
``pipeline.json`` records every step as done / skipped / failed, with its notes. The record says ``"status":
"running"`` from the first moment and the verdict is written last, so an interrupted run (Ctrl-C, SIGTERM, a kill)
is never reported as passed; a skipped step never counts as a pass. Every entry the pipeline writes is claimed in
the output directory first: files there that pimoe-export did not write are left alone unless ``force``.
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
from pimoe_export.artifacts.manifest import MANIFEST_FILE
from pimoe_export.interface import external_data_name

RECORD = "pipeline.json"
#: every entry a pipeline run may write into its output directory (checked before the first step)
GRAPH_FILES = ("model.onnx", "model.standard.onnx", "model.fp16.onnx", "model.int8.onnx")
ENTRIES = [RECORD, "model", "model.pruned", *GRAPH_FILES, *(external_data_name(g) for g in GRAPH_FILES),
           "ort-fp32", "ort-fp16", "ort-int8", "timing.cache", "report", "report_fp16", "report_int8",
           "benchmark.md", "benchmark.json",
           *[f"{kind}-{p}" for kind in ("trt", "trt-rtx") for p in ("fp32", "fp16", "int8")],
           *[f"report_{kind}-{p}" for kind in ("trt", "trt-rtx") for p in ("fp32", "fp16", "int8")]]
#: the graphs a run may export, their files, units and report directories
GRAPHS = {"fp32": ("model.onnx", "ort-fp32", "report"), "fp16": ("model.fp16.onnx", "ort-fp16", "report_fp16"),
          "int8": ("model.int8.onnx", "ort-int8", "report_int8")}


@dataclass(frozen=True)
class PipelineOptions:
    preset: str | None = None
    model_dir: Path | None = None
    seed: int = 0
    bench_repeats: int = 20
    calib_text: Path | None = None  # text models: calibration/evaluation sentences
    int8_mode: str = "w8a8"  # static ("w8a8") or dynamic per-row ("w8a8_dynamic") activation scales


@dataclass
class Run:
    """What every step may read: the output directory and the options of the run."""

    out: OutputDir
    options: PipelineOptions

    @property
    def root(self) -> Path:
        return self.out.root

    def claim_graph(self, name: str) -> Path:
        """An ONNX file of the run and the external-data file a graph past 2 GB writes beside it."""
        self.out.claim(external_data_name(name))
        return self.out.claim(name)


@dataclass(frozen=True)
class Skip:
    """A step that did not apply here (the reason is recorded; the pipeline can still pass)."""

    reason: str


@dataclass(frozen=True)
class Unavailable:
    """The result of an earlier step that has none: it failed or was skipped (``reason`` says which and why)."""

    step: str
    reason: str


# ------------------------------------------------------------------------------------------ step results
@dataclass(frozen=True)
class Loaded:
    source: Any  # ModelSource
    model_dir: Path
    pruning: dict[str, Any] | None = None

    def detail(self) -> dict[str, Any]:
        extra = {} if self.pruning is None else {"pruning": self.pruning}
        return {"model_dir": str(self.model_dir), **self.source.describe(), **extra}

    def notes(self) -> list[str]:
        """A decoder whose KV cache the graph cannot carry (its importer says why: ``kv_cache``)."""
        cache = self.source.describe().get("kv_cache")
        return [f"the graph has no KV cache (not a decoder unit): {cache.removeprefix('none: ')}"] \
            if isinstance(cache, str) else []


@dataclass(frozen=True)
class Exported:
    graphs: dict[str, Path]  # "fp32" (custom ops), "standard", "fp16"
    pimoe_nodes: dict[str, int]

    def detail(self) -> dict[str, Any]:
        detail = {"onnx": str(self.graphs["fp32"])}
        if "standard" in self.graphs:
            detail["onnx_standard_ops"] = str(self.graphs["standard"])
        detail["pimoe_nodes"] = self.pimoe_nodes
        if "fp16" in self.graphs:
            detail["onnx_fp16"] = str(self.graphs["fp16"])
        return detail


@dataclass(frozen=True)
class Quantized:
    result: Any  # QuantizeResult

    @property
    def onnx(self) -> Path:
        return self.result.onnx_path

    def detail(self) -> dict[str, Any]:
        return self.result.summary()


@dataclass(frozen=True)
class Packaged:
    units: dict[str, dict[str, Any]]  # unit name -> what it is

    def detail(self) -> dict[str, Any]:
        return self.units


@dataclass(frozen=True)
class Built(Packaged):
    pass


@dataclass(frozen=True)
class Ran:
    units: dict[str, dict[str, Any]]
    engine_units: tuple[str, ...]  # units of a TensorRT flavour this machine ran

    def detail(self) -> dict[str, Any]:
        return self.units


@dataclass(frozen=True)
class Checked:
    reports: dict[str, dict[str, Any]]
    not_checked: dict[str, str] = field(default_factory=dict)  # what could not be checked, and why

    def detail(self) -> dict[str, Any]:
        return {**self.reports, **({"not_checked": self.not_checked} if self.not_checked else {})}

    def notes(self) -> list[str]:
        return [f"{what} not checked: {why}" for what, why in self.not_checked.items()]


@dataclass(frozen=True)
class Benchmarked:
    rows: list[dict[str, Any]]
    markdown: Path

    def detail(self) -> dict[str, Any]:
        return {"rows": self.rows, "markdown": str(self.markdown)}


# ------------------------------------------------------------------------------------------ steps
def step_model(run: Run) -> Loaded:
    from pimoe_export.hf.importers import load_source
    from pimoe_export.model.factory import create_from_preset
    from pimoe_export.model.source import layer_source

    options = run.options
    if options.model_dir is not None:
        source = load_source(options.model_dir, text=options.calib_text, seed=options.seed)
        model_dir = options.model_dir
    else:
        source = layer_source(create_from_preset(options.preset, seed=options.seed))
        model_dir = run.out.claim_dir("model").root
        source.save(model_dir)
    if not source.settings.enable_pruning:
        return Loaded(source, model_dir)
    pruning = prune(source)  # EnhancedPiMoEIntegration(enable_pruning=True): prune before export
    model_dir = run.out.claim_dir("model.pruned").root
    source.save(model_dir)
    return Loaded(source, model_dir, pruning)


def prune(source: Any) -> dict[str, Any]:
    """Prune every PiMoE layer as the source's deployment settings say; one report over them all."""
    import torch

    from pimoe_export.model.pruning import magnitude_prune, merge_reports, structured_prune

    settings = source.settings
    method = structured_prune if settings.pruning_structured else magnitude_prune
    reports = {}
    for path, layer in source.layers.items():
        probe = torch.randn(2, 32, layer.hidden_size, generator=torch.Generator().manual_seed(0))
        reports[path] = method(layer, settings.pruning_amount, probe)
    return merge_reports(reports).to_dict()


def step_export(run: Run, model: Loaded) -> Exported:
    from pimoe_export.export.exporter import export_source

    source = model.source
    custom = export_source(source, run.claim_graph("model.onnx"))
    graphs = {"fp32": custom.path}
    if source.standard_ops:  # the plugin-free baseline the benchmark times
        graphs["standard"] = export_source(source, run.claim_graph("model.standard.onnx"), standard_ops=True).path
    if source.settings.export_precision == "fp16":  # optimization_level advanced/maximum
        graphs["fp16"] = export_source(source, run.claim_graph("model.fp16.onnx"), precision="fp16").path
    return Exported(graphs, {k: v for k, v in custom.node_counts.items() if k.startswith("pimoe::")})


def step_int8(run: Run, model: Loaded, export: Exported) -> Quantized:
    from pimoe_export.quantize import quantize_model

    return Quantized(quantize_model(model.source, run.claim_graph("model.int8.onnx"),
                                    method=model.source.settings.calibration_method, fp32_onnx=export.graphs["fp32"],
                                    mode=run.options.int8_mode))


def _graphs(export: Exported, int8: Quantized | Unavailable) -> dict[str, Path]:
    """The deployable graphs of the run: fp32 and fp16 custom-op exports, and the INT8 graph when there is one."""
    graphs = {k: v for k, v in export.graphs.items() if k in GRAPHS}
    if isinstance(int8, Quantized):
        graphs["int8"] = int8.onnx
    return graphs


def step_units(run: Run, export: Exported, int8: Quantized | Unavailable) -> Packaged:
    from pimoe_export.build.units import package_ort

    units = {}
    for key, path in _graphs(export, int8).items():
        name = GRAPHS[key][1]
        # a decoder unit ships the model directory's tokenizer and config files (and a genai_config.json where
        # GenAI can describe the decoder: build/clients.py)
        manifest = package_ort(path, run.out.claim_dir(name).root, force=True,
                               client_dir=run.options.model_dir)
        units[name] = {"backend": manifest.backend, "precision": manifest.precision,
                       "manifest": str(run.root / name / MANIFEST_FILE)}
    return Packaged(units)


def step_engines(run: Run, model: Loaded, export: Exported, int8: Quantized | Unavailable) -> Built | Skip:
    from pimoe_export.build.units import BuildOptions, build_unit, detect_flavour
    from pimoe_export.errors import BackendUnavailableError

    try:
        flavour = detect_flavour("auto")
    except BackendUnavailableError as exc:
        return Skip(f"no TensorRT builder installed ({exc})")
    built = {}
    for precision, path in _graphs(export, int8).items():
        name = f"{'trt' if flavour == 'tensorrt' else 'trt-rtx'}-{precision}"
        options = BuildOptions(flavour=flavour, optimization_level=model.source.settings.builder_optimization_level,
                               timing_cache=str(run.out.claim("timing.cache")))
        manifest = build_unit(path, run.out.claim_dir(name).root, options=options, force=True,
                              client_dir=run.options.model_dir)
        built[name] = {"backend": manifest.backend, "version": manifest.backend_version,
                       "targets": manifest.target_sms, "plugin_layers": manifest.build_options["plugin_layers"]}
    return Built(built)


def step_runtime(run: Run, model: Loaded, units: Packaged, engines: Built | Unavailable) -> Ran:
    from pimoe_export.errors import BackendUnavailableError
    from pimoe_export.runtime.engine import Engine

    feed = model.source.smoke_feed()
    loaded, engine_units = {}, []
    for name in [*units.units, *(engines.units if isinstance(engines, Built) else {})]:
        try:
            engine = Engine.load(run.root / name)
        except BackendUnavailableError as exc:  # e.g. an RTX engine on a machine without an RTX GPU
            loaded[name] = {"loaded": False, "reason": str(exc).split(";")[0]}
            continue
        with engine:
            outputs = engine.run_named({t.name: np.asarray(feed[t.name]).astype(t.dtype)
                                        for t in engine.interface.inputs})
            if not all(np.isfinite(v).all() for v in outputs.values()):
                raise RuntimeError(f"{name}: non-finite outputs on finite inputs")
            loaded[name] = {"loaded": True, "backend": engine.backend,
                            "outputs": {k: list(v.shape) for k, v in outputs.items()}}
            if engine.backend != "onnxruntime":
                engine_units.append(name)
    return Ran(loaded, tuple(engine_units))


def step_check(run: Run, model: Loaded, export: Exported, int8: Quantized | Unavailable,
               runtime: Ran | Unavailable) -> Checked:
    from pimoe_export.validate.check import check_onnx, check_unit

    source = model.source
    feeds = source.evaluation  # None: random inputs of the graph interface
    checks: list[tuple[str, Callable[[Path], Any]]] = [
        (GRAPHS[key][2], lambda out, path=path: check_onnx(source.module, path, out, force=True, feeds=feeds))
        for key, path in _graphs(export, int8).items()]
    not_checked = {}
    if isinstance(runtime, Ran):  # engine units that this machine ran (a TensorRT GPU box), through their Engine
        checks += [(f"report_{unit}", lambda out, unit=unit: check_unit(source.module, run.root / unit, out,
                                                                        force=True, feeds=feeds))
                   for unit in runtime.engine_units]
    else:
        not_checked["engine units"] = f"the runtime step {runtime.reason}"
    reports: dict[str, Any] = {}
    failed = []
    for name, check in checks:
        rep = check(run.out.claim_dir(name).root)
        reports[name] = {"passed": rep.passed, "precision": rep.precision, "backend": rep.backend,
                         "routing_agreement": rep.routing_agreement, "output": rep.output_stats[rep.primary].to_dict(),
                         "routing_by_layer": rep.routing_by_layer, "embedding": rep.embedding,
                         "failures": rep.failures, "files": rep.files}
        if not rep.passed:
            failed.append(f"{name}: {rep.failures}")
    if failed:
        raise RuntimeError(f"parity check failed: {failed}")
    return Checked(reports, not_checked)


def step_benchmark(run: Run, model: Loaded, export: Exported, int8: Quantized | Unavailable) -> Benchmarked:
    from pimoe_export.bench.summary import benchmark_source, render_markdown

    variants = {"ort_pimoe_ops": export.graphs["fp32"]}
    if "standard" in export.graphs:
        variants["ort_standard_ops"] = export.graphs["standard"]
    if isinstance(int8, Quantized):
        variants["ort_pimoe_int8"] = int8.onnx
    repeats = run.options.bench_repeats
    rows = benchmark_source(model.source, variants, tokens=(1, 16, 128), repeats=repeats)
    markdown, data = run.out.claim("benchmark.md"), run.out.claim("benchmark.json")
    markdown.write_text(render_markdown(rows, repeats))
    data.write_text(json.dumps(rows, indent=2) + "\n")
    return Benchmarked(rows, markdown)


@dataclass(frozen=True)
class Step:
    """A step of the table: ``needs`` names the results it cannot run without, ``uses`` those it takes when they
    exist (else an :class:`Unavailable`); ``required``: later steps cannot go on after its failure."""

    name: str
    run: Callable[..., Any]
    needs: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    required: bool = False


STEPS: tuple[Step, ...] = (
    Step("model", step_model, required=True),
    Step("export", step_export, needs=("model",), required=True),
    Step("int8", step_int8, needs=("model", "export")),
    Step("units", step_units, needs=("export",), uses=("int8",), required=True),
    Step("engines", step_engines, needs=("model", "export"), uses=("int8",)),
    Step("runtime", step_runtime, needs=("model", "units"), uses=("engines",)),
    Step("check", step_check, needs=("model", "export"), uses=("int8", "runtime")),
    Step("benchmark", step_benchmark, needs=("model", "export"), uses=("int8",)),
)


# ------------------------------------------------------------------------------------------ running
@dataclass
class StepRecord:
    name: str
    status: str = "pending"  # done | skipped | failed
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "seconds": round(self.seconds, 3), "reason": self.reason,
                "detail": self.detail, **({"notes": self.notes} if self.notes else {})}


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


def run_step(step: Step, run: Run, results: dict[str, Any], log: Callable[[str], None]) -> StepRecord:
    """Run one step on the results so far (``results``: step name -> its result or an :class:`Unavailable`)."""
    record = StepRecord(step.name)
    start = time.perf_counter()
    missing = [results.get(name, Unavailable(name, "has not run")) for name in step.needs
               if not _available(results.get(name))]
    lacking = [results[name] for name in step.uses if isinstance(results.get(name), Unavailable)
               and results[name].reason.startswith("failed")]
    try:
        if missing:
            raise RuntimeError("; ".join(f"needs the {m.step} step's result, which it {m.reason}" for m in missing))
        out = step.run(run, **{name: results.get(name, Unavailable(name, "has not run"))
                               for name in (*step.needs, *step.uses)})
        if isinstance(out, Skip):
            record.status, record.reason = "skipped", out.reason
            results[step.name] = Unavailable(step.name, f"was skipped ({out.reason})")
        else:
            record.status, record.detail = "done", out.detail()
            notes = getattr(out, "notes", None)
            record.notes = list(notes()) if notes is not None else []
            results[step.name] = out
    except Exception as exc:  # recorded, reported, and the pipeline fails (KeyboardInterrupt is not caught here)
        record.status, record.reason = "failed", f"{type(exc).__name__}: {exc}"
        if not missing:
            record.detail["traceback"] = traceback.format_exc(limit=6)
        results[step.name] = Unavailable(step.name, f"failed ({record.reason})")
    if record.status == "done":  # what it did without (unless its own notes say so)
        record.notes += [f"ran without the {u.step} step's result: it {u.reason}" for u in lacking
                         if not any(f"the {u.step} step" in note for note in record.notes)]
    record.seconds = time.perf_counter() - start
    mark = {"done": "ok", "skipped": "skipped", "failed": "FAILED"}[record.status]
    log(f"      {mark} ({record.seconds:.1f} s){': ' + record.reason if record.reason else ''}")
    for note in record.notes:
        log(f"      note: {note}")
    return record


def _available(result: Any) -> bool:
    return result is not None and not isinstance(result, Unavailable)


def run_steps(run: Run, record: PipelineRecord, steps: tuple[Step, ...], log: Callable[[str], None]) -> bool:
    """Every step in order into ``record``; True when all ran without failing."""
    results: dict[str, Any] = {}
    for index, step in enumerate(steps, 1):
        log(f"[{index}/{len(steps)}] {step.name} ...")
        record.steps.append(run_step(step, run, results, log))
        record.write("running")
        if record.steps[-1].status == "failed" and step.required:
            break  # later steps need this one's artefacts
    return len(record.steps) == len(steps) and all(s.status != "failed" for s in record.steps)


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
    steps: tuple[Step, ...] = STEPS,
) -> dict[str, Any]:
    """Run every step into ``output``; returns (and writes) the pipeline record. ``model_dir``: any model directory
    an importer recognises (pimoe_export.hf.importers), ``calib_text``: its calibration sentences (text models).
    ``int8_mode``: "w8a8" (static activation scales) or "w8a8_dynamic" (per-row scales at run time)."""
    def log(text: str) -> None:
        if progress:
            print(text, flush=True)

    out = OutputDir(output, force=force, command="pipeline")
    out.refuse_foreign(ENTRIES)
    run = Run(out, PipelineOptions(preset, Path(model_dir) if model_dir else None, seed, bench_repeats,
                                   Path(calib_text) if calib_text else None, int8_mode))
    record = PipelineRecord(out)
    try:
        passed = run_steps(run, record, steps, log)
    except BaseException:
        record.write("interrupted")
        raise
    summary = record.write("finished", passed)
    log(f"pipeline {'PASSED' if passed else 'FAILED'}; skipped: "
        f"{[s.name for s in record.steps if s.status == 'skipped'] or 'none'}; summary in {record.path}")
    return summary
