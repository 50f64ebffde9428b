"""The pipeline's branches that the preset run of test_pipeline_steps.py does not take, each on a tiny model in
seconds: a model directory with its calibration text, a checkpoint that asks for pruning (magnitude or structured)
or for an fp16 graph, the engines step with a TensorRT builder, engine units in the runtime and check steps, what a
step reports when it fails, and the options a run hands its steps.

Where the property is the pipeline's own control flow (which graph goes to which builder, which unit is checked
through its Engine), the heavy function the step calls is replaced by a recorder; where it is a result (a pruned
checkpoint, an fp16 graph), the result is compared with an independent reference: the saved weights themselves,
the PyTorch module's own output."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import pimoe_export.hf.importers as importers
from pimoe_export._files import OutputDir
from pimoe_export.errors import BackendUnavailableError, OutputError, PiMoEInputError
from pimoe_export.model import PiMoESystem, create_from_preset
from pimoe_export.model.source import layer_source
from pimoe_export.ops.schema import DOMAIN
from pimoe_export.pipeline import (
    Benchmarked,
    Built,
    Checked,
    Exported,
    Loaded,
    Packaged,
    PipelineOptions,
    Quantized,
    Ran,
    Run,
    Skip,
    Step,
    Unavailable,
    run_pipeline,
    run_step,
    step_benchmark,
    step_check,
    step_engines,
    step_export,
    step_model,
    step_runtime,
)


def _tiny(seed: int = 0, **deployment) -> PiMoESystem:
    metadata = {"deployment": deployment} if deployment else {}
    return create_from_preset("tiny", seed=seed, metadata=metadata)


def _run(root: Path, **options) -> Run:
    return Run(OutputDir(root), PipelineOptions(**options))


def _expert_weights(model: PiMoESystem) -> list[torch.Tensor]:
    return [p.detach() for expert in model.experts for p in expert.parameters() if p.dim() == 2]


# ------------------------------------------------------------------------------------------ the model step
def test_the_model_step_loads_a_model_directory_in_place(tmp_path) -> None:
    """A model directory is loaded as it is (nothing saved into the output) and runs as the saved model does."""
    saved = _tiny(seed=6)
    saved.save_pretrained(tmp_path / "ckpt")
    loaded = step_model(_run(tmp_path / "out", model_dir=tmp_path / "ckpt", seed=6))
    assert loaded.model_dir == tmp_path / "ckpt" and loaded.pruning is None
    assert not (tmp_path / "out" / "model").exists()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.equal(loaded.source.module(x), saved(x))
    assert loaded.detail()["model_dir"] == str(tmp_path / "ckpt") and "pruning" not in loaded.detail()


def test_the_model_step_gives_the_importer_the_directory_text_and_seed(tmp_path, monkeypatch) -> None:
    calls = []

    def load_source(directory, *, text=None, seed=0):
        calls.append((directory, text, seed))
        return layer_source(_tiny())
    monkeypatch.setattr(importers, "load_source", load_source)
    step_model(_run(tmp_path / "out", model_dir=tmp_path / "m", calib_text=tmp_path / "t.txt", seed=9))
    assert calls == [(tmp_path / "m", tmp_path / "t.txt", 9)]


def test_calibration_text_reaches_the_importer_of_a_layer_checkpoint(tmp_path) -> None:
    """A PiMoE layer checkpoint refuses calibration text (it calibrates on hidden states): the refusal shows that
    the text the run was given reached the importer."""
    _tiny().save_pretrained(tmp_path / "ckpt")
    (tmp_path / "calib.txt").write_text("a sentence\n")
    with pytest.raises(PiMoEInputError, match="--calib applies to whole models"):
        step_model(_run(tmp_path / "out", model_dir=tmp_path / "ckpt", calib_text=tmp_path / "calib.txt"))


def test_the_model_step_notes_why_a_decoder_has_no_kv_cache(tiny_decoder, tmp_path) -> None:
    """docs/generation.md: a decoder whose cache the graph cannot carry runs without one, and "the pipeline's model
    step notes why, also in `pipeline.json`'s `model.kv_cache`". A config without an eos_token_id is such a model
    (docs/models.md); a decoder with its cache gets no note and its DecoderSpec in kv_cache."""
    pytest.importorskip("transformers")
    directory = tmp_path / "no-eos"
    shutil.copytree(tiny_decoder("mixtral"), directory)
    for name in ("config.json", "generation_config.json"):  # save_pretrained writes both
        data = json.loads((directory / name).read_text())
        data["eos_token_id"] = None
        (directory / name).write_text(json.dumps(data))
    results: dict = {}
    record = run_step(Step("model", step_model), _run(tmp_path / "out", model_dir=directory), results,
                      lambda _: None)
    assert record.status == "done", record.reason
    model = results["model"].source.module  # the DecoderLM the step loaded
    assert model.spec is None and "eos_token_id" in (model.cache_refusal or "")
    assert record.notes == [f"the graph has no KV cache (not a decoder unit): {model.cache_refusal}"]
    assert record.detail["kv_cache"] == f"none: {model.cache_refusal}"
    cached = run_step(Step("model", step_model), _run(tmp_path / "out2", model_dir=tiny_decoder("mixtral")),
                      results, lambda _: None)
    spec = results["model"].source.module.spec
    assert cached.status == "done" and cached.notes == []
    assert spec is not None and cached.detail["kv_cache"] == spec.to_dict()


@pytest.mark.parametrize("structured", [False, True])
def test_a_checkpoint_that_asks_for_pruning_is_pruned_and_saved_beside(tmp_path, structured) -> None:
    original = _tiny(seed=2, enable_pruning=True, pruning_amount=0.5, pruning_structured=structured)
    original.save_pretrained(tmp_path / "ckpt")
    loaded = step_model(_run(tmp_path / "out", model_dir=tmp_path / "ckpt"))
    assert loaded.model_dir == tmp_path / "out" / "model.pruned"
    pruned = PiMoESystem.from_pretrained(loaded.model_dir)
    x = torch.randn(2, 4, 16)
    with torch.no_grad():  # the saved checkpoint is the pruned model the later steps export
        assert torch.equal(pruned(x), loaded.source.module(x))
        assert not torch.equal(pruned(x), original(x))
    report = loaded.pruning
    assert loaded.detail()["pruning"] == report
    assert report["method"] == ("structured" if structured else "magnitude") and report["amount"] == 0.5
    weights = _expert_weights(pruned)
    nonzero = sum(int((w != 0).sum()) for w in weights)
    before = sum(w.numel() for w in _expert_weights(original))
    if structured:  # hidden units removed: the experts are narrower, their weights not zeroed
        assert pruned.config.expert_widths != original.config.expert_widths
        assert sum(w.numel() for w in weights) < before
    else:  # half of every expert's weights zeroed in place, the shapes kept
        assert [w.shape for w in weights] == [w.shape for w in _expert_weights(original)]
        assert nonzero <= before // 2 + len(weights)
    assert report["nonzero_after"] < report["nonzero_before"]
    assert (tmp_path / "ckpt").is_dir() and torch.equal(
        PiMoESystem.from_pretrained(tmp_path / "ckpt")(x), original(x))  # the user's directory untouched


def test_a_preset_without_pruning_is_saved_into_the_output(tmp_path) -> None:
    loaded = step_model(_run(tmp_path / "out", preset="tiny", seed=1))
    assert loaded.model_dir == tmp_path / "out" / "model" and loaded.pruning is None
    assert not (tmp_path / "out" / "model.pruned").exists()


# ------------------------------------------------------------------------------------------ the export step
def test_a_checkpoint_that_asks_for_fp16_gets_an_fp16_graph_of_the_same_model(tmp_path) -> None:
    import onnx

    from pimoe_export.errors import PluginLoadError
    from pimoe_export.runtime.ort import create_session

    model = _tiny(seed=4, export_precision="fp16")
    exported = step_export(_run(tmp_path), Loaded(layer_source(model), tmp_path))
    assert set(exported.graphs) == {"fp32", "standard", "fp16"}
    assert exported.graphs["fp16"] == tmp_path / "model.fp16.onnx"
    assert exported.detail()["onnx_fp16"] == str(tmp_path / "model.fp16.onnx")
    graph = onnx.load(exported.graphs["fp16"]).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert onnx.load(exported.graphs["fp32"]).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # the benchmark's baseline holds standard ops only; the deployable graphs the pimoe ops
    domains = {k: {n.domain for n in onnx.load(exported.graphs[k]).graph.node} for k in exported.graphs}
    assert DOMAIN not in domains["standard"] and DOMAIN in domains["fp32"] and DOMAIN in domains["fp16"]
    assert exported.pimoe_nodes == {"pimoe::PiMoERoute": 1, "pimoe::PiMoEDispatch": 1, "pimoe::PiMoEExpertMLP": 3,
                                    "pimoe::PiMoECombine": 1}
    x = np.random.default_rng(0).standard_normal((2, 8, 16)).astype(np.float32)
    try:
        session = create_session(exported.graphs["fp16"])
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")
    y = session.run(None, {"hidden_states": x.astype(np.float16)})[0].astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-2  # the same model, in half precision


def test_an_fp32_checkpoint_gets_no_fp16_graph(tmp_path) -> None:
    exported = step_export(_run(tmp_path), Loaded(layer_source(_tiny(export_precision="fp32")), tmp_path))
    assert "fp16" not in exported.graphs and not (tmp_path / "model.fp16.onnx").exists()


# ------------------------------------------------------------------------------------------ engines, runtime, check
class _Manifest(SimpleNamespace):
    pass


def _graphs(tmp_path: Path) -> tuple[Exported, Quantized]:
    exported = Exported({"fp32": tmp_path / "model.onnx", "standard": tmp_path / "model.standard.onnx",
                         "fp16": tmp_path / "model.fp16.onnx"}, {})
    return exported, Quantized(SimpleNamespace(onnx_path=tmp_path / "model.int8.onnx"))


@pytest.mark.parametrize(("flavour", "prefix"), [("tensorrt", "trt"), ("rtx", "trt-rtx")])
def test_the_engines_step_builds_every_deployable_graph(tmp_path, monkeypatch, flavour, prefix) -> None:
    import pimoe_export.build.units as units

    builds, clients = [], []

    def build_unit(path, unit_dir, *, options, force, client_dir=None):
        clients.append(client_dir)
        builds.append((Path(path), Path(unit_dir), options, force))
        return _Manifest(backend=f"backend-{Path(path).name}", backend_version="10.x", target_sms=["89"],
                         build_options={"plugin_layers": 4})
    monkeypatch.setattr(units, "detect_flavour", lambda preferred: flavour)
    monkeypatch.setattr(units, "build_unit", build_unit)
    run = _run(tmp_path / "out", model_dir=tmp_path / "ckpt")
    model = Loaded(layer_source(_tiny(builder_optimization_level=5)), tmp_path)
    exported, int8 = _graphs(tmp_path)
    built = step_engines(run, model, exported, int8)
    assert clients == [tmp_path / "ckpt"] * 3  # the model's client files (tokenizer, config) go with every unit
    names = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
    assert isinstance(built, Built)
    assert built.units == {f"{prefix}-{p}": {"backend": f"backend-{f}", "version": "10.x", "targets": ["89"],
                                             "plugin_layers": 4} for p, f in names.items()}
    assert [(p.name, d) for p, d, _, _ in builds] == [(f, tmp_path / "out" / f"{prefix}-{p}")
                                                       for p, f in names.items()]
    for _, _, options, force in builds:  # the standard-op graph is a baseline, never built
        assert options.flavour == flavour and options.optimization_level == 5 and force is True
        assert options.timing_cache == str(tmp_path / "out" / "timing.cache")
    assert run.out.owns("timing.cache")
    built = step_engines(_run(tmp_path / "out2"), model, exported, Unavailable("int8", "failed (x)"))
    assert set(built.units) == {f"{prefix}-fp32", f"{prefix}-fp16"}


def test_the_engines_step_is_skipped_without_a_builder(tmp_path, monkeypatch) -> None:
    import pimoe_export.build.units as units

    def detect(preferred):
        raise BackendUnavailableError("neither tensorrt nor tensorrt_rtx imports")
    monkeypatch.setattr(units, "detect_flavour", detect)
    exported, int8 = _graphs(tmp_path)
    skip = step_engines(_run(tmp_path / "out"), Loaded(layer_source(_tiny()), tmp_path), exported, int8)
    assert isinstance(skip, Skip)
    assert skip.reason == "no TensorRT builder installed (neither tensorrt nor tensorrt_rtx imports)"


class _FakeEngine:
    def __init__(self, backend: str, value: float, dims: tuple[int, ...] = (1, 4, 16)) -> None:
        self.backend, self.value, self.dims = backend, value, dims
        self.interface = SimpleNamespace(inputs=[SimpleNamespace(name="hidden_states", dtype="float16")])
        self.fed: dict = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def run_named(self, feed):
        self.fed = feed
        return {"output": np.full(self.dims, self.value, np.float32)}


def test_the_runtime_step_runs_every_unit_and_engine_unit(tmp_path, monkeypatch) -> None:
    from pimoe_export.runtime.engine import Engine

    engines = {"ort-fp32": _FakeEngine("onnxruntime", 1.0), "trt-fp16": _FakeEngine("tensorrt", 2.0),
               "trt-rtx-int8": None}

    def load(directory):
        engine = engines[Path(directory).name]
        if engine is None:
            raise BackendUnavailableError("no RTX GPU here; build on one; more detail")
        return engine
    monkeypatch.setattr(Engine, "load", staticmethod(load))
    source = layer_source(_tiny())
    ran = step_runtime(_run(tmp_path), Loaded(source, tmp_path), Packaged({"ort-fp32": {}}),
                       Built({"trt-fp16": {}, "trt-rtx-int8": {}}))
    assert ran.engine_units == ("trt-fp16",)  # loaded and not ONNX Runtime
    assert ran.units["trt-rtx-int8"] == {"loaded": False, "reason": "no RTX GPU here"}
    assert ran.units["trt-fp16"] == {"loaded": True, "backend": "tensorrt", "outputs": {"output": [1, 4, 16]}}
    fed = engines["trt-fp16"].fed["hidden_states"]  # the source's smoke feed, in the unit's input dtype
    assert fed.dtype == np.float16 and np.array_equal(fed, source.smoke_feed()["hidden_states"].astype(np.float16))
    ran = step_runtime(_run(tmp_path), Loaded(source, tmp_path), Packaged({"ort-fp32": {}}),
                       Unavailable("engines", "was skipped (no builder)"))
    assert list(ran.units) == ["ort-fp32"] and ran.engine_units == ()


def test_the_runtime_step_refuses_non_finite_outputs(tmp_path, monkeypatch) -> None:
    from pimoe_export.runtime.engine import Engine

    monkeypatch.setattr(Engine, "load", staticmethod(lambda directory: _FakeEngine("onnxruntime", np.nan)))
    with pytest.raises(RuntimeError, match="ort-fp32: non-finite outputs on finite inputs"):
        step_runtime(_run(tmp_path), Loaded(layer_source(_tiny()), tmp_path), Packaged({"ort-fp32": {}}),
                     Unavailable("engines", "was skipped"))


def _report(passed: bool, precision: str, failures=()) -> SimpleNamespace:
    stats = SimpleNamespace(to_dict=lambda: {"rel_l2": 0.0})
    return SimpleNamespace(passed=passed, precision=precision, backend="b", routing_agreement=1.0,
                           output_stats={"output": stats}, primary="output", routing_by_layer={}, embedding=None,
                           failures=list(failures), files={"json": f"{precision}/report.json"})


def test_the_check_step_checks_every_graph_and_every_engine_unit(tmp_path, monkeypatch) -> None:
    import pimoe_export.validate.check as check

    calls, models = [], []

    def check_onnx(model, path, out, *, force, feeds):
        calls.append(("onnx", Path(path).name, Path(out).name, force))
        models.append((model, feeds))
        return _report(True, Path(path).name)

    def check_unit(model, unit, out, *, force, feeds):
        calls.append(("unit", Path(unit), Path(out).name, force))
        models.append((model, feeds))
        return _report(True, Path(unit).name)
    monkeypatch.setattr(check, "check_onnx", check_onnx)
    monkeypatch.setattr(check, "check_unit", check_unit)
    exported, int8 = _graphs(tmp_path)
    run = _run(tmp_path / "out")
    model = Loaded(layer_source(_tiny()), tmp_path)
    model.source.evaluation = [{"hidden_states": np.zeros((1, 2, 16), np.float32)}]
    checked = step_check(run, model, exported, int8, Ran({}, ("trt-fp16", "trt-int8")))
    assert calls == [("onnx", "model.onnx", "report", True), ("onnx", "model.fp16.onnx", "report_fp16", True),
                     ("onnx", "model.int8.onnx", "report_int8", True),
                     ("unit", tmp_path / "out" / "trt-fp16", "report_trt-fp16", True),
                     ("unit", tmp_path / "out" / "trt-int8", "report_trt-int8", True)]
    # every graph and unit is compared with the source's own module on its held-out feeds
    assert all(m is model.source.module and f is model.source.evaluation for m, f in models) and len(models) == 5
    assert list(checked.reports) == ["report", "report_fp16", "report_int8", "report_trt-fp16", "report_trt-int8"]
    assert checked.reports["report_trt-int8"]["precision"] == "trt-int8" and checked.not_checked == {}
    # each entry of the pipeline's summary carries what its report says, under the report's own field names
    entry = checked.reports["report_fp16"]
    assert entry == {"passed": True, "precision": "model.fp16.onnx", "backend": "b", "routing_agreement": 1.0,
                     "output": {"rel_l2": 0.0}, "routing_by_layer": {}, "embedding": None, "failures": [],
                     "files": {"json": "model.fp16.onnx/report.json"}}
    calls.clear()
    checked = step_check(_run(tmp_path / "out2"), model, exported, Unavailable("int8", "failed (x)"),
                         Unavailable("runtime", "failed (RuntimeError: y)"))
    assert [c[2] for c in calls] == ["report", "report_fp16"]
    assert checked.not_checked == {"engine units": "the runtime step failed (RuntimeError: y)"}


def test_the_check_step_fails_naming_every_failed_report(tmp_path, monkeypatch) -> None:
    import pimoe_export.validate.check as check

    def check_onnx(model, path, out, *, force, feeds):
        name = Path(path).name
        return _report(name != "model.onnx" and name != "model.int8.onnx", name, [f"{name} is off"])
    monkeypatch.setattr(check, "check_onnx", check_onnx)
    exported, int8 = _graphs(tmp_path)
    with pytest.raises(RuntimeError) as info:
        step_check(_run(tmp_path / "out"), Loaded(layer_source(_tiny()), tmp_path), exported, int8, Ran({}, ()))
    assert str(info.value) == ("parity check failed: [\"report: ['model.onnx is off']\", "
                               "\"report_int8: ['model.int8.onnx is off']\"]")


def test_the_benchmark_step_times_the_variants_that_exist(tmp_path, monkeypatch) -> None:
    import pimoe_export.bench.summary as summary

    seen = {}

    def benchmark_source(source, variants, tokens, repeats):
        seen.update(variants=dict(variants), tokens=tokens, repeats=repeats)
        return [{"tokens": t, "pytorch_ms": 1.0, **{f"{v}_ms": 2.0 for v in variants}} for t in tokens]
    monkeypatch.setattr(summary, "benchmark_source", benchmark_source)
    run = _run(tmp_path / "out", bench_repeats=3)
    exported = Exported({"fp32": tmp_path / "a.onnx"}, {})
    result = step_benchmark(run, Loaded(layer_source(_tiny()), tmp_path), exported, Unavailable("int8", "failed"))
    assert seen == {"variants": {"ort_pimoe_ops": tmp_path / "a.onnx"}, "tokens": (1, 16, 128), "repeats": 3}
    assert isinstance(result, Benchmarked) and result.markdown == tmp_path / "out" / "benchmark.md"
    assert json.loads((tmp_path / "out" / "benchmark.json").read_text()) == result.rows
    assert "Median of 3 runs per point" in result.markdown.read_text()


# ------------------------------------------------------------------------------------------ running the steps
def test_the_options_a_run_hands_its_steps(tmp_path) -> None:
    seen = []
    step = Step("a", lambda run: seen.append(run) or Skip("seen"))
    run_pipeline(output=str(tmp_path / "out"), preset="tiny", model_dir=str(tmp_path / "m"), seed=7,
                 bench_repeats=3, progress=False, calib_text=str(tmp_path / "t.txt"), int8_mode="w8a8_dynamic",
                 steps=(step,))
    (run,) = seen
    assert run.options == PipelineOptions("tiny", tmp_path / "m", 7, 3, tmp_path / "t.txt", "w8a8_dynamic")
    assert run.root == tmp_path / "out"
    run_pipeline(output=tmp_path / "out", preset="tiny", model_dir=None, progress=False, steps=(step,))
    assert seen[1].options == PipelineOptions("tiny")  # no directory, no text: None, not Path("None")


def test_progress_names_a_failure_and_the_notes_of_a_step(tmp_path, capsys) -> None:
    class WithNotes:
        def detail(self):
            return {}

        def notes(self):
            return ["the a step said something"]

    def fail(run):
        raise ValueError("a broke")
    steps = (Step("a", fail), Step("b", lambda run, a: WithNotes(), uses=("a",)),
             Step("c", lambda run, a: WithNotes(), uses=("a",)))
    summary = run_pipeline(output=tmp_path / "out", preset="tiny", model_dir=None, steps=steps)
    out = capsys.readouterr().out
    assert "FAILED (" in out and "): ValueError: a broke" in out
    done = [line for line in out.splitlines() if line.startswith("      ok")]
    assert len(done) == 2 and all(re.fullmatch(r"      ok \(\d+\.\d s\)", line) for line in done), done
    assert "      note: the a step said something" in out
    assert "pipeline FAILED; skipped: none" in out and not summary["passed"]
    notes = {s["name"]: s.get("notes") for s in summary["steps"]}
    # a step whose own notes name the step it lacked is not told again
    assert notes["b"] == ["the a step said something"] and notes["c"] == notes["b"]


def test_a_step_without_notes_that_lacked_a_failed_step_says_so_once_per_step(tmp_path) -> None:
    results: dict = {"a": Unavailable("a", "failed (x)"), "b": Unavailable("b", "was skipped (y)")}
    record = run_step(Step("c", lambda run, a, b: Checked({}), uses=("a", "b")), _run(tmp_path), results,
                      lambda _: None)
    assert record.status == "done" and record.notes == ["ran without the a step's result: it failed (x)"]


def test_a_graph_is_claimed_with_its_external_data_file(tmp_path) -> None:
    (tmp_path / "model.onnx.data").write_text("the user's")
    run = _run(tmp_path)
    with pytest.raises(OutputError, match=r"model\.onnx\.data exists and was not written by pimoe-export"):
        run.claim_graph("model.onnx")
    assert not run.out.owns("model.onnx")
    assert Run(OutputDir(tmp_path / "b"), PipelineOptions()).claim_graph("x.onnx") == tmp_path / "b" / "x.onnx"


def test_the_units_step_ships_the_model_directorys_client_files(tmp_path, monkeypatch) -> None:
    """pipeline --model DIR: each ONNX Runtime unit gets the tokenizer and config files of DIR (docs/generation.md:
    a decoder unit carries what its clients read), where the graphs themselves are written into the output folder,
    which holds none of them; without --model there is no model directory to ship from."""
    import pimoe_export.build.units as units
    from pimoe_export.pipeline import step_units

    calls: list[tuple[Path, Path, object]] = []

    def package_ort(onnx_path, unit_dir, *, force=False, client_dir=None, **kwargs):
        calls.append((Path(onnx_path), Path(unit_dir), client_dir))
        return SimpleNamespace(backend="onnxruntime", precision="fp32")

    monkeypatch.setattr(units, "package_ort", package_ort)
    export = Exported({"fp32": tmp_path / "out" / "model.onnx"}, {})
    model_dir = tmp_path / "hf-model"
    step_units(_run(tmp_path / "out", model_dir=model_dir), export, Unavailable("int8", "skipped"))
    assert calls == [(tmp_path / "out" / "model.onnx", tmp_path / "out" / "ort-fp32", model_dir)]
    step_units(_run(tmp_path / "out2"), export, Unavailable("int8", "skipped"))
    assert calls[-1][2] is None
