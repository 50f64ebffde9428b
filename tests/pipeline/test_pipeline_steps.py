"""The pipeline's step table and record, each step's result on the tiny preset (one run of the real steps, no
TensorRT builder needed: engines are skipped or built where one exists), and what a run records when a step fails,
is skipped or is interrupted.

Fake steps exercise the table (needs, uses, required); the real run is checked against the files it wrote: every
unit's manifest, the reports' verdicts, the benchmark's variants and rows."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pimoe_export._files import OutputDir
from pimoe_export.errors import OutputError
from pimoe_export.pipeline import (
    ENTRIES,
    GRAPHS,
    STEPS,
    Checked,
    Exported,
    PipelineOptions,
    PipelineRecord,
    Run,
    Skip,
    Step,
    StepRecord,
    Unavailable,
    _graphs,
    run_pipeline,
    run_steps,
)


def test_the_step_table() -> None:
    """The order, and what each step needs (fails without) and uses (runs without, saying so)."""
    table = [(s.name, s.needs, s.uses, s.required) for s in STEPS]
    assert table == [
        ("model", (), (), True),
        ("export", ("model",), (), True),
        ("int8", ("model", "export"), (), False),
        ("units", ("export",), ("int8",), True),
        ("engines", ("model", "export"), ("int8",), False),
        ("runtime", ("model", "units"), ("engines",), False),
        ("check", ("model", "export"), ("int8", "runtime"), False),
        ("benchmark", ("model", "export"), ("int8",), False),
    ]
    assert GRAPHS == {"fp32": ("model.onnx", "ort-fp32", "report"),
                      "fp16": ("model.fp16.onnx", "ort-fp16", "report_fp16"),
                      "int8": ("model.int8.onnx", "ort-int8", "report_int8")}
    for files in GRAPHS.values():
        assert set(files) <= set(ENTRIES)


class Result:
    def __init__(self, value: str) -> None:
        self.value = value

    def detail(self) -> dict:
        return {"value": self.value}


def fake(name: str, behaviour: str = "ok", needs=(), uses=(), required=False, seen=None) -> Step:
    def run(run, **inputs):
        if seen is not None:
            seen[name] = {k: (v.value if isinstance(v, Result) else v) for k, v in inputs.items()}
        if behaviour == "fail":
            raise ValueError(f"{name} broke")
        if behaviour == "skip":
            return Skip(f"{name} does not apply")
        if behaviour == "interrupt":
            raise KeyboardInterrupt
        return Result(name)
    return Step(name, run, tuple(needs), tuple(uses), required)


def run_fake(tmp_path: Path, steps) -> tuple[bool, PipelineRecord]:
    out = OutputDir(tmp_path / "out")
    record = PipelineRecord(out)
    return run_steps(Run(out, PipelineOptions(preset="tiny")), record, tuple(steps), lambda _: None), record


def test_a_required_failure_stops_the_run_and_an_optional_one_does_not(tmp_path) -> None:
    passed, record = run_fake(tmp_path / "a", [fake("a", required=True), fake("b", "fail"), fake("c", needs=["a"])])
    assert not passed and [s.status for s in record.steps] == ["done", "failed", "done"]
    assert record.steps[1].reason == "ValueError: b broke" and "Traceback" in record.steps[1].detail["traceback"]
    passed, record = run_fake(tmp_path / "b", [fake("a"), fake("b", "fail", required=True), fake("c")])
    assert not passed and [s.name for s in record.steps] == ["a", "b"]


def test_a_skipped_step_is_no_failure_and_its_users_say_what_they_lacked(tmp_path) -> None:
    seen: dict = {}
    steps = [fake("a"), fake("b", "skip"), fake("c", needs=["a"], uses=["b"], seen=seen),
             fake("d", needs=["b"]), fake("e", "fail"), fake("f", uses=["e"])]
    passed, record = run_fake(tmp_path, steps)
    status = {s.name: s for s in record.steps}
    assert status["b"].status == "skipped" and status["b"].reason == "b does not apply"
    assert seen["c"]["a"] == "a" and seen["c"]["b"] == Unavailable("b", "was skipped (b does not apply)")
    assert status["c"].status == "done" and status["c"].notes == []  # a skip is not a failure to report
    assert status["d"].status == "failed"
    assert status["d"].reason == "RuntimeError: needs the b step's result, which it was skipped (b does not apply)"
    assert "traceback" not in status["d"].detail
    assert status["f"].status == "done"
    assert status["f"].notes == ["ran without the e step's result: it failed (ValueError: e broke)"]
    assert not passed  # e failed


def test_a_run_of_done_and_skipped_steps_passes(tmp_path) -> None:
    passed, record = run_fake(tmp_path, [fake("a"), fake("b", "skip"), fake("c", uses=["b"])])
    assert passed
    data = json.loads(record.path.read_text())
    assert data["status"] == "running" and not data["passed"]  # the verdict is written by run_pipeline, last
    assert [s["status"] for s in data["steps"]] == ["done", "skipped", "done"]


def test_a_step_that_never_ran_is_unavailable_to_the_steps_that_need_it(tmp_path) -> None:
    passed, record = run_fake(tmp_path, [fake("b", needs=["a"])])
    assert not passed
    assert record.steps[0].reason == "RuntimeError: needs the a step's result, which it has not run"


def test_the_record_of_a_step() -> None:
    record = StepRecord("x", "done", 1.23456, {"k": 1}, "", [])
    assert record.to_dict() == {"name": "x", "status": "done", "seconds": 1.235, "reason": "", "detail": {"k": 1}}
    record.notes = ["n"]
    assert record.to_dict()["notes"] == ["n"]


def test_an_interrupted_run_is_recorded_as_interrupted_and_not_passed(tmp_path, monkeypatch) -> None:
    steps = (fake("a"), fake("b", "interrupt"), fake("c"))
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(output=tmp_path / "out", preset="tiny", model_dir=None, progress=False, steps=steps)
    data = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    assert data["status"] == "interrupted" and data["passed"] is False
    assert [s["status"] for s in data["steps"]] == ["done"]


def test_the_verdict_is_written_last(tmp_path, capsys) -> None:
    summary = run_pipeline(output=tmp_path / "ok", preset="tiny", model_dir=None, progress=True,
                           steps=(fake("a"), fake("b", "skip")))
    assert summary["status"] == "finished" and summary["passed"] is True
    assert json.loads((tmp_path / "ok" / "pipeline.json").read_text()) == summary
    out = capsys.readouterr().out
    assert "[1/2] a ..." in out and "[2/2] b ..." in out and "skipped (" in out and "): b does not apply" in out
    assert "pipeline PASSED; skipped: ['b']" in out
    summary = run_pipeline(output=tmp_path / "bad", preset="tiny", model_dir=None, progress=False,
                           steps=(fake("a", "fail"),))
    assert summary["status"] == "finished" and summary["passed"] is False
    assert capsys.readouterr().out == ""  # progress=False prints nothing


def test_a_users_file_in_the_output_is_refused_before_any_step(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "benchmark.md").write_text("mine")
    ran = []
    step = Step("a", lambda run: ran.append(1) or Result("a"))
    with pytest.raises(OutputError, match=r"benchmark\.md exists and was not written by pimoe-export"):
        run_pipeline(output=out, preset="tiny", model_dir=None, progress=False, steps=(step,))
    assert ran == [] and (out / "benchmark.md").read_text() == "mine" and not (out / "pipeline.json").exists()
    summary = run_pipeline(output=out, preset="tiny", model_dir=None, progress=False, steps=(step,), force=True)
    assert summary["passed"] and ran == [1]


def test_the_deployable_graphs_of_a_run() -> None:
    exported = Exported({"fp32": Path("a.onnx"), "standard": Path("s.onnx"), "fp16": Path("h.onnx")}, {})
    assert _graphs(exported, Unavailable("int8", "failed")) == {"fp32": Path("a.onnx"), "fp16": Path("h.onnx")}

    class Quantized:  # the step's result type, as run_step hands it on
        pass
    from pimoe_export.pipeline import Quantized as RealQuantized

    result = type("R", (), {"onnx_path": Path("q.onnx")})()
    assert _graphs(exported, RealQuantized(result))["int8"] == Path("q.onnx")
    assert "int8" not in _graphs(exported, Quantized())


def test_details_and_notes_of_the_step_results() -> None:
    exported = Exported({"fp32": Path("a.onnx"), "standard": Path("s.onnx")}, {"pimoe::PiMoERoute": 1})
    assert exported.detail() == {"onnx": "a.onnx", "onnx_standard_ops": "s.onnx",
                                 "pimoe_nodes": {"pimoe::PiMoERoute": 1}}
    assert Exported({"fp32": Path("a.onnx"), "fp16": Path("h.onnx")}, {}).detail() == \
        {"onnx": "a.onnx", "pimoe_nodes": {}, "onnx_fp16": "h.onnx"}
    checked = Checked({"report": {"passed": True}}, {"engine units": "the runtime step failed (x)"})
    assert checked.detail() == {"report": {"passed": True}, "not_checked": {"engine units":
                                                                            "the runtime step failed (x)"}}
    assert checked.notes() == ["engine units not checked: the runtime step failed (x)"]
    assert Checked({"r": {}}).detail() == {"r": {}} and Checked({}).notes() == []


# ------------------------------------------------------------------------------------------ the real steps
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The real steps on the tiny preset, seed 3, dynamic INT8, one benchmark repeat."""
    out = tmp_path_factory.mktemp("pipeline") / "tiny"
    summary = run_pipeline(output=out, preset="tiny", model_dir=None, seed=3, bench_repeats=1, progress=False,
                           int8_mode="w8a8_dynamic")
    return out, summary, {s["name"]: s for s in summary["steps"]}


def test_the_real_steps_on_the_tiny_preset(tiny_run) -> None:
    _, summary, steps = tiny_run
    assert summary["passed"], {k: (s["status"], s["reason"]) for k, s in steps.items()}
    assert list(steps) == [s.name for s in STEPS]
    assert steps["engines"]["status"] in ("done", "skipped")


def test_the_model_step_saves_the_preset_with_its_seed(tiny_run) -> None:
    import torch

    from pimoe_export.model import PiMoESystem, create_from_preset

    out, _, steps = tiny_run
    assert steps["model"]["detail"]["model_dir"] == str(out / "model")
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        assert torch.equal(PiMoESystem.from_pretrained(out / "model")(x), create_from_preset("tiny", seed=3)(x))
        assert not torch.equal(create_from_preset("tiny", seed=0)(x), create_from_preset("tiny", seed=3)(x))


def test_the_units_are_the_graphs_of_the_run(tiny_run) -> None:
    out, _, steps = tiny_run
    units = steps["units"]["detail"]
    assert set(units) == {"ort-fp32", "ort-int8"}
    for name, precision in (("ort-fp32", "fp32"), ("ort-int8", "w8a8_dynamic")):
        manifest = json.loads((out / name / "manifest.json").read_text())
        assert units[name] == {"backend": "onnxruntime", "precision": precision,
                               "manifest": str(out / name / "manifest.json")}
        assert manifest["precision"] == precision
    assert steps["int8"]["detail"]["mode"] == "w8a8_dynamic"
    assert steps["export"]["detail"]["onnx"] == str(out / "model.onnx")
    assert steps["export"]["detail"]["onnx_standard_ops"] == str(out / "model.standard.onnx")
    assert steps["export"]["detail"]["pimoe_nodes"] == {"pimoe::PiMoERoute": 1, "pimoe::PiMoEDispatch": 1,
                                                        "pimoe::PiMoEExpertMLP": 3, "pimoe::PiMoECombine": 1}
    runtime = steps["runtime"]["detail"]
    for name in units:
        assert runtime[name]["loaded"] and runtime[name]["backend"] == "onnxruntime"
        assert runtime[name]["outputs"]["output"][-1] == 16


def test_the_check_step_checks_every_graph(tiny_run) -> None:
    out, _, steps = tiny_run
    reports = steps["check"]["detail"]
    assert {"report", "report_int8"} <= set(reports)
    for name, precision in (("report", "fp32"), ("report_int8", "w8a8_dynamic")):
        assert reports[name]["passed"] and reports[name]["precision"] == precision
        saved = json.loads((out / name / "report.json").read_text())
        assert saved["passed"] and saved["precision"] == precision


def test_the_benchmark_step_times_every_variant(tiny_run) -> None:
    out, _, steps = tiny_run
    rows = json.loads((out / "benchmark.json").read_text())
    assert [r["tokens"] for r in rows] == [1, 16, 128]
    for row in rows:
        assert set(row) == {"tokens", "pytorch_ms", "ort_pimoe_ops_ms", "ort_standard_ops_ms", "ort_pimoe_int8_ms"}
        assert all(v > 0 for k, v in row.items() if k != "tokens")
    assert steps["benchmark"]["detail"] == {"rows": rows, "markdown": str(out / "benchmark.md")}
    assert "Median of 1 runs per point" in (out / "benchmark.md").read_text()


def test_a_second_run_into_the_same_directory_replaces_its_own_outputs(tiny_run) -> None:
    out, _, _ = tiny_run
    steps = tuple(s if s.name == "model" else
                  dataclasses.replace(s, run=lambda run, **kw: Skip("not this time"), needs=(), uses=())
                  for s in STEPS)
    summary = run_pipeline(output=out, preset="tiny", model_dir=None, seed=4, progress=False, steps=steps)
    assert summary["passed"] and [s["status"] for s in summary["steps"]][1:] == ["skipped"] * 7
    import torch

    from pimoe_export.model import PiMoESystem, create_from_preset

    x = torch.randn(1, 2, 16)
    with torch.no_grad():  # the model directory it wrote before is its own: replaced by the seed-4 model
        assert torch.equal(PiMoESystem.from_pretrained(out / "model")(x), create_from_preset("tiny", seed=4)(x))


def test_the_runtime_step_counts_only_tensorrt_units_as_engines(exported_layer, tmp_path) -> None:
    """An ONNX Runtime unit is loaded, run and recorded with its backend, and is not one of the engine units the
    check step compares (those are TensorRT's)."""
    from pimoe_export.build.units import package_ort
    from pimoe_export.errors import PluginLoadError
    from pimoe_export.model import create_from_preset
    from pimoe_export.model.source import layer_source
    from pimoe_export.pipeline import Loaded, Packaged, step_runtime

    model, path = exported_layer("tiny", 0)
    try:
        package_ort(path, tmp_path / "ort-fp32")
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")
    run = Run(OutputDir(tmp_path, force=True), PipelineOptions(preset="tiny"))
    ran = step_runtime(run, Loaded(layer_source(create_from_preset("tiny")), tmp_path), Packaged({"ort-fp32": {}}),
                       Unavailable("engines", "skipped"))
    assert ran.engine_units == ()
    assert ran.units["ort-fp32"]["loaded"] is True and ran.units["ort-fp32"]["backend"] == "onnxruntime"
    assert ran.units["ort-fp32"]["outputs"]["output"][-1] == model.config.hidden_size


def test_the_units_step_replaces_a_users_file_only_under_force(exported_layer, tmp_path) -> None:
    """`pipeline --force` covers the unit folders too: a user's file in ort-fp32 is replaced by the unit when the
    run was given --force, and refused by name (before anything is written there) when it was not."""
    from pimoe_export.errors import PluginLoadError
    from pimoe_export.native.libraries import find_ort_library
    from pimoe_export.pipeline import step_units

    try:
        find_ort_library()
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")
    _, path = exported_layer("tiny", 0)
    exported = Exported({"fp32": path}, {})
    for force in (False, True):
        root = tmp_path / f"force-{force}"
        (root / "ort-fp32").mkdir(parents=True)
        (root / "ort-fp32" / "manifest.json").write_text("mine")
        run = Run(OutputDir(root, force=force), PipelineOptions(preset="tiny"))
        if not force:
            with pytest.raises(OutputError, match=r"ort-fp32 exists and was not written by pimoe-export"):
                step_units(run, exported, Unavailable("int8", "skipped"))
            assert (root / "ort-fp32" / "manifest.json").read_text() == "mine"
            continue
        packaged = step_units(run, exported, Unavailable("int8", "skipped"))
        assert list(packaged.units) == ["ort-fp32"]
        assert json.loads((root / "ort-fp32" / "manifest.json").read_text())["backend"] == "onnxruntime"
