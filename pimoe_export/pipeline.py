"""`pimoe-export pipeline`: the whole job, step by step, into one output directory.

model -> ONNX (custom ops + standard ops) -> INT8 -> ONNX Runtime units -> engine units (TensorRT or
TensorRT-RTX, when installed) -> runtime load of every unit -> parity reports -> benchmark summary. Every step
records done / skipped (with the reason) / failed in ``pipeline.json``; a skipped step never counts as a pass.
"""

from __future__ import annotations

import json
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class StepResult:
    name: str
    status: str = "pending"  # done | skipped | failed
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


class Pipeline:
    def __init__(self, output: Path, progress: bool) -> None:
        self.output = output
        self.progress = progress
        self.steps: list[StepResult] = []

    def log(self, text: str) -> None:
        if self.progress:
            print(text, flush=True)

    def step(self, name: str, total: int, fn: Callable[[], dict[str, Any] | str]) -> StepResult:
        index = len(self.steps) + 1
        self.log(f"[{index}/{total}] {name} ...")
        result = StepResult(name)
        start = time.perf_counter()
        try:
            out = fn()
            if isinstance(out, str):  # a reason to skip
                result.status, result.reason = "skipped", out
            else:
                result.status, result.detail = "done", out
        except Exception as exc:  # recorded, reported, and the pipeline fails
            result.status, result.reason = "failed", f"{type(exc).__name__}: {exc}"
            result.detail["traceback"] = traceback.format_exc(limit=6)
        result.seconds = time.perf_counter() - start
        self.steps.append(result)
        mark = {"done": "ok", "skipped": "skipped", "failed": "FAILED"}[result.status]
        self.log(f"      {mark} ({result.seconds:.1f} s){': ' + result.reason if result.reason else ''}")
        return result


def run_pipeline(
    *,
    output: Path,
    preset: str | None,
    model_dir: Path | None,
    seed: int = 0,
    bench_repeats: int = 20,
    progress: bool = True,
) -> dict[str, Any]:
    import torch

    from pimoe_export.bench.timing import median_ms
    from pimoe_export.export.onnx_export import export_onnx
    from pimoe_export.model.factory import create_from_preset
    from pimoe_export.model.io import load_pretrained
    from pimoe_export.model.summary import summarize
    from pimoe_export.runtime.ort import create_session
    from pimoe_export.validate.check import check_onnx

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline(output, progress)
    total = 8
    state: dict[str, Any] = {}

    def step_model() -> dict[str, Any]:
        if model_dir is not None:
            state["model"] = load_pretrained(model_dir)
            state["model_dir"] = Path(model_dir)
        else:
            assert preset is not None
            state["model"] = create_from_preset(preset, seed=seed)
            state["model_dir"] = output / "model"
            state["model"].save_pretrained(state["model_dir"])
        detail: dict[str, Any] = {}
        deployment = _deployment(state["model"])
        if deployment.get("enable_pruning"):  # EnhancedPiMoEIntegration(enable_pruning=True): prune before export
            from pimoe_export.model.pruning import magnitude_prune, structured_prune

            prune = structured_prune if deployment.get("pruning_structured", True) else magnitude_prune
            probe = torch.randn(2, 32, state["model"].hidden_size, generator=torch.Generator().manual_seed(0))
            detail["pruning"] = prune(state["model"], float(deployment.get("pruning_amount", 0.25)), probe).to_dict()
            state["model_dir"] = output / "model.pruned"
            state["model"].save_pretrained(state["model_dir"])
        summary = summarize(state["model"].config)
        return {"model_dir": str(state["model_dir"]), "params": summary["params_total"],
                "expert_groups": [g["experts"] for g in summary["expert_groups"]],
                "deployment": deployment or "none recorded (defaults)", **detail}

    def step_export() -> dict[str, Any]:
        model = state["model"]
        custom = export_onnx(model, output / "model.onnx")
        standard = export_onnx(model, output / "model.standard.onnx", standard_ops=True)
        state["onnx"] = custom.path
        state["onnx_standard"] = standard.path
        result = {"onnx": str(custom.path), "onnx_standard_ops": str(standard.path),
                  "pimoe_nodes": {k: v for k, v in custom.node_counts.items() if k.startswith("pimoe::")}}
        if _deployment(model).get("export_precision") == "fp16":  # optimization_level advanced/maximum
            state["onnx_fp16"] = export_onnx(model, output / "model.fp16.onnx", precision="fp16").path
            result["onnx_fp16"] = str(state["onnx_fp16"])
        return result

    def step_int8() -> dict[str, Any] | str:
        from pimoe_export.quantize import pipeline_step

        result = pipeline_step(state["model"], state["onnx"], output)
        state["onnx_int8"] = result.get("onnx_int8")
        return result

    def step_units() -> dict[str, Any]:
        from pimoe_export.build.units import package_ort

        units = {}
        for key, name in (("onnx", "ort-fp32"), ("onnx_fp16", "ort-fp16"), ("onnx_int8", "ort-int8")):
            if state.get(key):
                manifest = package_ort(state[key], output / name)
                units[name] = {"backend": manifest.backend, "precision": manifest.precision,
                               "manifest": str(output / name / "manifest.json")}
        state["units"] = list(units)
        return units

    def step_engines() -> dict[str, Any] | str:
        from pimoe_export.build.units import BuildOptions, build_unit, detect_flavour
        from pimoe_export.errors import BackendUnavailableError

        try:
            flavour = detect_flavour("auto")
        except BackendUnavailableError as exc:
            return f"no TensorRT builder installed ({exc})"
        deployment = _deployment(state["model"])
        built = {}
        for key, precision in (("onnx", "fp32"), ("onnx_fp16", "fp16"), ("onnx_int8", "int8")):
            if not state.get(key):
                continue
            name = f"{'trt' if flavour == 'tensorrt' else 'trt-rtx'}-{precision}"
            manifest = build_unit(state[key], output / name, options=BuildOptions(
                flavour=flavour, optimization_level=deployment.get("builder_optimization_level"),
                timing_cache=str(output / "timing.cache")))
            built[name] = {"backend": manifest.backend, "version": manifest.backend_version,
                           "targets": manifest.target_sms, "plugin_layers": manifest.build_options["plugin_layers"]}
            state["units"].append(name)
        return built

    def step_runtime() -> dict[str, Any]:
        from pimoe_export.errors import BackendUnavailableError
        from pimoe_export.runtime.engine import Engine

        x = np.random.default_rng(0).standard_normal((1, 4, state["model"].hidden_size)).astype(np.float32)
        loaded = {}
        for name in state["units"]:
            try:
                engine = Engine.load(output / name)
            except BackendUnavailableError as exc:  # e.g. an RTX engine on a machine without an RTX GPU
                loaded[name] = {"loaded": False, "reason": str(exc).split(";")[0]}
                continue
            y = engine.run(x.astype(engine.input_dtype))
            if not np.isfinite(y).all():
                raise RuntimeError(f"{name}: non-finite outputs on finite inputs")
            loaded[name] = {"loaded": True, "backend": engine.backend, "output_shape": list(y.shape)}
            if engine.backend != "onnxruntime":
                state.setdefault("runnable_engine_units", []).append(name)
            engine.close()
        return loaded

    def step_check() -> dict[str, Any]:
        from pimoe_export.validate.check import check_unit

        reports: dict[str, Any] = {}
        failed = []
        checks = [(state[key], name, None) for key, name in (("onnx", "report"), ("onnx_fp16", "report_fp16"),
                                                             ("onnx_int8", "report_int8")) if state.get(key)]
        # engine units that this machine can run (a TensorRT GPU box) are checked through their Engine
        checks += [(None, f"report_{unit}", unit) for unit in state.get("runnable_engine_units", [])]
        for onnx_path, name, unit in checks:
            if unit is None:
                rep = check_onnx(state["model"], onnx_path, output / name)
            else:
                rep = check_unit(state["model"], output / unit, output / name)
            reports[name] = {"passed": rep.passed, "precision": rep.precision, "backend": rep.backend,
                             "routing_agreement": rep.routing_agreement,
                             "output": rep.output_stats["output"].to_dict(), "failures": rep.failures,
                             "files": rep.files}
            if not rep.passed:
                failed.append(f"{name}: {rep.failures}")
        if failed:
            raise RuntimeError(f"parity check failed: {failed}")
        return reports

    def step_bench() -> dict[str, Any]:
        import gc

        model = state["model"]
        variants = {"ort_pimoe_ops": state["onnx"], "ort_standard_ops": state["onnx_standard"]}
        if state.get("onnx_int8"):
            variants["ort_pimoe_int8"] = state["onnx_int8"]
        tokens_list = (1, 16, 128)
        inputs = {t: np.random.default_rng(t).standard_normal((1, t, model.hidden_size)).astype(np.float32)
                  for t in tokens_list}
        table: dict[int, dict[str, Any]] = {t: {"tokens": t} for t in tokens_list}
        with torch.inference_mode():
            for t in tokens_list:
                xt = torch.from_numpy(inputs[t])
                table[t]["pytorch_ms"] = median_ms(lambda xt=xt: model(xt), bench_repeats)
        for name, path in variants.items():  # one live session at a time (idle ORT pools spin)
            session = create_session(path)
            for t in tokens_list:
                feeds = {"hidden_states": inputs[t]}
                table[t][f"{name}_ms"] = median_ms(lambda s=session, f=feeds: s.run(None, f), bench_repeats)
            del session
            gc.collect()
        rows = [table[t] for t in tokens_list]
        lines = ["| tokens | " + " | ".join(k[:-3] + " (ms)" for k in rows[0] if k.endswith("_ms")) + " |",
                 "|---|" + "---|" * (len(rows[0]) - 1)]
        for row in rows:
            lines.append(f"| {row['tokens']} | " + " | ".join(f"{v:.3f}" for k, v in row.items() if k.endswith("_ms"))
                         + " |")
        machine = platform.processor() or platform.machine()
        text = (f"# Benchmark summary\n\nMedian of {bench_repeats} runs per point, batch 1, {_cpu_count()} threads "
                f"available, {machine}.\n\n" + "\n".join(lines) + "\n")
        (output / "benchmark.md").write_text(text)
        (output / "benchmark.json").write_text(json.dumps(rows, indent=2) + "\n")
        return {"rows": rows, "markdown": str(output / "benchmark.md")}

    steps = (("model", step_model), ("export", step_export), ("int8", step_int8), ("units", step_units),
             ("engines", step_engines), ("runtime", step_runtime), ("check", step_check), ("benchmark", step_bench))
    for name, fn in steps:
        result = pipe.step(name, total, fn)
        if result.status == "failed" and name in ("model", "export", "units"):
            break  # later steps need these artefacts
    passed = all(s.status != "failed" for s in pipe.steps) and len(pipe.steps) == total
    summary = {
        "passed": passed,
        "output": str(output),
        "steps": [{"name": s.name, "status": s.status, "seconds": round(s.seconds, 3), "reason": s.reason,
                   "detail": s.detail} for s in pipe.steps],
    }
    (output / "pipeline.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if progress:
        print(f"pipeline {'PASSED' if passed else 'FAILED'}; "
              f"skipped: {[s.name for s in pipe.steps if s.status == 'skipped'] or 'none'}; summary in "
              f"{output / 'pipeline.json'}")
    return summary


def _deployment(model: Any) -> dict[str, Any]:
    """Deployment settings an EnhancedPiMoEIntegration recorded in the checkpoint (config.metadata)."""
    metadata = model.config.metadata
    return dict(metadata.get("deployment", {})) if isinstance(metadata, dict) else {}


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
