"""A bare PiMoE layer and a whole model go through one path: the same step table, the same exporter, quantiser,
runtime call and check. And the step results are typed: a step says what it needs, and a failed step is reported
by the steps after it, never silently skipped."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from test_whole_model import TinyEncoder, feeds

from pimoe_export._files import OutputDir
from pimoe_export.model.factory import create_from_preset
from pimoe_export.model.source import layer_source, model_source
from pimoe_export.pipeline import STEPS, Loaded, PipelineOptions, Run, Unavailable, run_pipeline, run_step

STEP_NAMES = ["model", "export", "int8", "units", "engines", "runtime", "check", "benchmark"]


def _sources():
    layer = layer_source(create_from_preset("tiny", seed=2))
    model = model_source(TinyEncoder().eval(), feeds(4, ((4, 16),) * 4), evaluation=feeds(5), data="seeded ids")
    return {"layer": layer, "model": model}


@pytest.mark.slow
def test_a_layer_and_a_model_go_through_the_same_steps_and_functions(tmp_path, monkeypatch) -> None:
    import pimoe_export.export.exporter as exporter
    import pimoe_export.quantize as quantize
    import pimoe_export.validate.check as check
    from pimoe_export.runtime.engine import Engine

    assert [s.name for s in STEPS] == STEP_NAMES  # one table, no per-kind variant
    calls: dict[str, list[str]] = {}
    kind = ""

    def spy(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls.setdefault(name, []).append(kind)
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)

    for owner, name in ((exporter, "export_model"), (quantize, "quantize_model"), (check, "run_check"),
                        (Engine, "run_named")):
        spy(owner, name)
    for kind, source in _sources().items():
        run = Run(OutputDir(tmp_path / kind), PipelineOptions(bench_repeats=1))
        results: dict = {"model": Loaded(source, tmp_path)}
        records = [run_step(step, run, results, lambda _: None) for step in STEPS[1:]]
        assert all(r.status in ("done", "skipped") for r in records), [(r.name, r.reason) for r in records]
        reports = results["check"].reports
        assert {"report", "report_int8"} <= set(reports) and all(r["passed"] for r in reports.values())
        assert results["runtime"].units["ort-int8"]["loaded"]
    for name in ("export_model", "quantize_model", "run_check", "run_named"):
        assert set(calls[name]) == {"layer", "model"}, (name, calls[name])
    # the layer's graph has the layer interface, the model's its named inputs and every layer's routing
    layer_units = json.loads((tmp_path / "layer" / "ort-fp32" / "manifest.json").read_text())["io"]
    model_units = json.loads((tmp_path / "model" / "ort-fp32" / "manifest.json").read_text())["io"]
    assert [i[0] for i in layer_units["inputs"]] == ["hidden_states"]
    assert [o[0] for o in layer_units["outputs"]] == ["output", "expert_ids", "expert_weights"]
    assert [i[0] for i in model_units["inputs"]] == ["input_ids", "attention_mask"]
    assert "blocks.1.moe/expert_ids" in [o[0] for o in model_units["outputs"]]


def _failing(step: str):
    def fail(*args, **kwargs):
        raise RuntimeError(f"{step} broke")
    return tuple(dataclasses.replace(s, run=fail) if s.name == step else s for s in STEPS)


def test_a_failed_runtime_step_leaves_the_engine_units_reported_unchecked(tmp_path) -> None:
    summary = run_pipeline(output=tmp_path / "out", preset="tiny", model_dir=None, bench_repeats=1, progress=False,
                           steps=_failing("runtime"))
    steps = {s["name"]: s for s in summary["steps"]}
    assert not summary["passed"] and steps["runtime"]["status"] == "failed"
    check = steps["check"]
    assert check["status"] == "done" and check["detail"]["report"]["passed"]  # the ONNX checks still ran
    reason = "the runtime step failed (RuntimeError: runtime broke)"
    assert check["detail"]["not_checked"] == {"engine units": reason}
    assert check["notes"] == [f"engine units not checked: {reason}"]
    assert json.loads((tmp_path / "out" / "pipeline.json").read_text())["steps"][6] == check


def test_a_step_without_what_it_needs_fails_naming_it_and_one_that_uses_it_says_so(tmp_path) -> None:
    run = Run(OutputDir(tmp_path), PipelineOptions(preset="tiny"))
    results: dict = {"export": Unavailable("export", "failed (RuntimeError: no graph)")}
    needs = run_step(STEPS[3], run, results, lambda _: None)  # units need the export
    assert needs.status == "failed" and needs.reason == (
        "RuntimeError: needs the export step's result, which it failed (RuntimeError: no graph)")
    assert isinstance(results["units"], Unavailable) and results["units"].reason.startswith("failed")

    def uses(run, export, int8):
        return Loaded(layer_source(create_from_preset("tiny")), Path("."))
    step = dataclasses.replace(STEPS[3], run=uses, needs=("export",), uses=("int8",))
    results = {"export": object(), "int8": Unavailable("int8", "failed (ValueError: bad data)")}
    record = run_step(step, run, results, lambda _: None)
    assert record.status == "done"
    assert record.notes == ["ran without the int8 step's result: it failed (ValueError: bad data)"]
