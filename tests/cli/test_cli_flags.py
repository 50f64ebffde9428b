"""Every command's flags at values other than their defaults reach the function that does the work, unchanged and
under the right name (a flag wired to the wrong parameter is the command line's commonest bug). The work itself is
replaced by a recorder; the defaults are checked once too, against the library functions' own."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pimoe_export._files import OutputDir
from pimoe_export.cli import COMMANDS, build_parser, main
from pimoe_export.quantize import default_fp32_path


class Stop(Exception):
    """Raised by a recorder once it has what it needs (main maps it to exit 70, an internal error)."""


def recorder(seen: dict, result=None):
    def record(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        if result is None:
            raise Stop
        return result
    return record


def test_every_command_is_listed_with_its_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(COMMANDS)
    assert COMMANDS == ("create", "info", "moefy", "export", "quantize", "check", "package", "build", "inspect",
                        "generate", "triton", "serve", "pipeline")
    for name, command in sub.choices.items():
        assert command.description, name


def test_build_flags(monkeypatch, tmp_path, capsys) -> None:
    import pimoe_export.build.units as units

    seen: dict = {}
    monkeypatch.setattr(units, "build_unit", recorder(seen))
    cache = tmp_path / "timing.cache"
    argv = ["build", "m.onnx", "-o", "unit", "--plugins", "p.so", "--flavour", "rtx", "--sm", "sm80, Sm89,",
            "--min-tokens", "2x3", "--opt-tokens", "4x8", "--max-tokens", "16x128", "--opt-level", "5",
            "--timing-cache", str(cache), "--version-compatible", "--hardware-compatible", "--force"]
    assert main(argv) == 70
    (onnx, output), kwargs = seen["args"], seen["kwargs"]
    assert (onnx, output) == (Path("m.onnx"), Path("unit"))
    assert kwargs["plugin_path"] == Path("p.so") and kwargs["force"] is True
    options = kwargs["options"]
    assert options.flavour == "rtx" and options.compute_capabilities == ("SM80", "SM89")
    assert (options.profile.min_shape, options.profile.opt_shape, options.profile.max_shape) == ((2, 3), (4, 8),
                                                                                                 (16, 128))
    assert (options.optimization_level, options.timing_cache) == (5, str(cache))
    assert options.version_compatible and options.hardware_compatible
    capsys.readouterr()


def test_build_defaults(monkeypatch) -> None:
    import pimoe_export.build.units as units
    from pimoe_export.interface import DEFAULT_ENGINE_PROFILE, DEFAULT_RTX_TARGETS

    seen: dict = {}
    monkeypatch.setattr(units, "build_unit", recorder(seen))
    assert main(["build", "m.onnx", "-o", "unit"]) == 70
    options = seen["kwargs"]["options"]
    assert options.flavour == "auto" and options.compute_capabilities == DEFAULT_RTX_TARGETS
    # `build --help`: "--sm SM  TensorRT-RTX targets, comma-separated SM names (default: SM80,SM86,SM89)"
    assert DEFAULT_RTX_TARGETS == ("SM80", "SM86", "SM89")
    assert build_parser().parse_args(["build", "m.onnx", "-o", "u"]).sm == "SM80,SM86,SM89"
    assert options.profile == DEFAULT_ENGINE_PROFILE
    assert (options.optimization_level, options.timing_cache, options.version_compatible,
            options.hardware_compatible) == (None, None, False, False)
    assert seen["kwargs"]["plugin_path"] is None and seen["kwargs"]["force"] is False


class GenerateRecorder:
    """Engine.load's stand-in for `generate`: records how it was loaded and what generate was asked."""

    def __init__(self) -> None:
        self.loads: list[dict] = []
        self.calls: list[tuple[list, dict]] = []

    def load(self, unit, **kwargs) -> GenerateRecorder:
        self.loads.append({"unit": unit, **kwargs})
        return self

    def __enter__(self) -> GenerateRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def generate(self, prompts, **kwargs) -> list[SimpleNamespace]:
        self.calls.append((prompts, kwargs))
        return [SimpleNamespace(text="x", token_ids=[1], prompt_token_ids=[1], finish_reason="length", seed=None)]


def test_generate_defaults(monkeypatch, capsys) -> None:
    """`generate --help`: at most 32 new tokens (default 32), temperature 0 (greedy), top-k 0 and top-p 1 (all
    tokens), a fresh seed, no stop strings, ONNX Runtime's own thread count."""
    from pimoe_export.runtime.engine import Engine

    engine = GenerateRecorder()
    monkeypatch.setattr(Engine, "load", engine.load)
    assert main(["generate", "u", "--prompt-ids", "1,2"]) == 0
    assert engine.loads == [{"unit": Path("u"), "threads": None}]
    [(prompts, kwargs)] = engine.calls
    assert prompts == [[1, 2]]
    assert kwargs == {"max_new_tokens": 32, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": None, "stop": [],
                      "on_token": None}
    assert capsys.readouterr().out == "x\n"


def test_generate_flags(monkeypatch, capsys) -> None:
    from pimoe_export.runtime.engine import Engine

    engine = GenerateRecorder()
    monkeypatch.setattr(Engine, "load", engine.load)
    assert main(["generate", "u", "--prompt", "hi", "--prompt-ids", "3", "--stop", "a", "--stop", "b", "--threads",
                 "3", "--temperature", "0", "--top-p", "1", "--top-k", "5", "--seed", "9",
                 "--max-new-tokens", "4"]) == 0
    assert engine.loads == [{"unit": Path("u"), "threads": 3}]
    [(prompts, kwargs)] = engine.calls
    assert prompts == ["hi", [3]]
    assert kwargs == {"max_new_tokens": 4, "temperature": 0.0, "top_k": 5, "top_p": 1.0, "seed": 9,
                      "stop": ["a", "b"], "on_token": None}
    assert main(["generate", "u", "--prompt-ids", "1", "--temperature", "0.7", "--top-p", "0.9"]) == 0
    assert (engine.calls[-1][1]["temperature"], engine.calls[-1][1]["top_p"]) == (0.7, 0.9)
    capsys.readouterr()


def test_quantize_flags(monkeypatch, tmp_path, exported_layer, capsys) -> None:
    import pimoe_export.quantize as quantize

    model, onnx_path = exported_layer("tiny", 0)
    model.save_pretrained(tmp_path / "ckpt")
    seen: dict = {}
    monkeypatch.setattr(quantize, "quantize_model", recorder(seen))
    argv = ["quantize", str(tmp_path / "ckpt"), "-o", str(tmp_path / "q.int8.onnx"), "--calib", "data.npz",
            "--method", "percentile", "--percentile", "99.5", "--dynamic", "--smooth-alpha", "0.25", "--onnx",
            str(onnx_path), "--calib-tokens", "300", "--force"]
    assert main(argv) == 70
    (source, path), kwargs = seen["args"], seen["kwargs"]
    assert path == tmp_path / "q.int8.onnx" and list(source.layers) == [""]
    assert kwargs == {"calibration": "data.npz", "method": "percentile", "mode": "w8a8_dynamic", "percentile": 99.5,
                      "smooth_alpha": 0.25, "fp32_onnx": onnx_path, "max_tokens": 300, "progress": True}
    # given --onnx, the fp32 export quantize would otherwise write next to the output is neither written nor claimed
    companion = default_fp32_path(tmp_path / "q.int8.onnx")
    assert companion.parent == tmp_path and companion.name not in ("q.int8.onnx", "q.int8.onnx.data")
    assert not companion.exists() and not OutputDir(tmp_path).owns(companion.name)
    assert main(["quantize", str(tmp_path / "ckpt"), "-o", str(tmp_path / "r.int8.onnx")]) == 70
    assert seen["kwargs"] == {"calibration": None, "method": "entropy", "mode": "w8a8", "percentile": 99.99,
                              "smooth_alpha": 0.5, "fp32_onnx": None, "max_tokens": 65536, "progress": True}
    # without it, that fp32 export ("next to the output") is claimed there first, with its external-data file
    companion = default_fp32_path(tmp_path / "r.int8.onnx")
    record = OutputDir(tmp_path)
    assert all(record.owns(name) for name in ("r.int8.onnx", "r.int8.onnx.data", companion.name,
                                              f"{companion.name}.data")), record.owned
    capsys.readouterr()


def test_quantize_without_onnx_never_replaces_the_users_fp32_file(tmp_path, exported_layer, capsys) -> None:
    """README "Outputs": a command never replaces a file it did not write unless --force. quantize without --onnx
    exports the fp32 graph next to the output (default_fp32_path): a file of the user's there, or where that
    export's external data goes, is refused before anything is exported or quantised, and nothing is written."""
    model, _ = exported_layer("tiny", 0)
    model.save_pretrained(tmp_path / "ckpt")
    output = tmp_path / "q.int8.onnx"
    companion = default_fp32_path(output)
    for users in (companion, companion.with_name(f"{companion.name}.data")):
        users.write_text("the user's own")
        assert main(["quantize", str(tmp_path / "ckpt"), "-o", str(output)]) == 2
        err = capsys.readouterr().err
        assert f"{users} exists and was not written by pimoe-export" in err and "--force" in err
        assert users.read_text() == "the user's own"
        assert {p.name for p in tmp_path.iterdir() if p.is_file()} == {".pimoe-export-outputs.json", users.name}
        users.unlink()


def test_quantize_refuses_bad_settings_before_writing(tmp_path, exported_layer, capsys) -> None:
    model, _ = exported_layer("tiny", 0)
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(SystemExit):
        main(["quantize", str(tmp_path / "ckpt"), "-o", str(tmp_path / "q.onnx"), "--percentile", "0"])
    assert "must be a finite number in (0, 100]" in capsys.readouterr().err
    assert not (tmp_path / "q.onnx").exists()


def test_quantize_reports_what_it_wrote(monkeypatch, tmp_path, exported_layer, capsys) -> None:
    import pimoe_export.quantize as quantize

    model, onnx_path = exported_layer("tiny", 0)
    model.save_pretrained(tmp_path / "ckpt")
    summary = {"mode": "w8a8", "method": "max", "calibration_tokens": 77,
               "uncalibrated_experts": {"": [1, 3], "blocks.1.moe": [0]}}
    result = SimpleNamespace(onnx_path=tmp_path / "q.onnx", summary=lambda: summary)
    monkeypatch.setattr(quantize, "quantize_model", recorder({}, result))
    assert main(["quantize", str(tmp_path / "ckpt"), "-o", str(tmp_path / "q.onnx"), "--onnx", str(onnx_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"wrote {tmp_path / 'q.onnx'} (w8a8, activations: max, 77 calibration tokens; router fp32)"
    assert out[1].startswith("  warning: experts [1, 3] received no calibration token")
    assert out[2].startswith("  warning: experts [0] of blocks.1.moe received no calibration token")
    assert out[3] == f"  check it: pimoe-export check {tmp_path / 'ckpt'} --onnx {tmp_path / 'q.onnx'}"


def test_export_flags(monkeypatch, tmp_path, exported_layer, capsys) -> None:
    import pimoe_export.export.exporter as exporter

    model, _ = exported_layer("tiny", 0)
    model.save_pretrained(tmp_path / "ckpt")
    seen: dict = {}
    monkeypatch.setattr(exporter, "export_source", recorder(seen))
    assert main(["export", str(tmp_path / "ckpt"), "-o", str(tmp_path / "m.onnx"), "--standard-ops", "--fp16"]) == 70
    assert seen["args"][1] == tmp_path / "m.onnx"
    assert seen["kwargs"] == {"precision": "fp16", "standard_ops": True}
    assert main(["export", str(tmp_path / "ckpt"), "-o", str(tmp_path / "n.onnx")]) == 70
    assert seen["kwargs"] == {"precision": "fp32", "standard_ops": False}
    capsys.readouterr()


def test_check_flags(monkeypatch, tmp_path, exported_layer, capsys) -> None:
    import pimoe_export.validate.check as check

    model, onnx_path = exported_layer("tiny", 0)
    model.save_pretrained(tmp_path / "ckpt")
    seen: dict = {}
    monkeypatch.setattr(check, "check_onnx", recorder(seen))
    monkeypatch.setattr(check, "check_unit", recorder(seen))
    assert main(["check", str(tmp_path / "ckpt"), "--onnx", str(onnx_path), "-o", str(tmp_path / "r"), "--shapes",
                 "1x2,3x4", "--seed", "7", "--no-plots", "-v", "--force"]) == 70
    assert seen["args"][1:] == (onnx_path, tmp_path / "r")
    assert seen["kwargs"] == {"shapes": [(1, 2), (3, 4)], "seed": 7, "plots": False, "verbose": True, "force": True,
                              "feeds": None}
    assert main(["check", str(tmp_path / "ckpt"), "--onnx", str(onnx_path)]) == 70
    assert seen["args"][2] == onnx_path.with_name(onnx_path.stem + "_report")
    assert seen["kwargs"]["shapes"] == check.DEFAULT_SHAPES and seen["kwargs"]["seed"] == 1234
    assert seen["kwargs"]["plots"] is True and seen["kwargs"]["verbose"] is False
    import pimoe_export.artifacts.manifest as manifest

    # check reads a unit's manifest first (a decoder unit takes the step-by-step check): a layer unit's has none
    monkeypatch.setattr(manifest, "read_manifest", lambda unit: SimpleNamespace(decoder={}))
    assert main(["check", str(tmp_path / "ckpt"), "--unit", str(tmp_path / "unit")]) == 70
    assert seen["args"][1:] == (tmp_path / "unit", tmp_path / "unit" / "report")
    capsys.readouterr()


def test_triton_flags(monkeypatch, capsys) -> None:
    import pimoe_export.serve.triton as triton

    seen: dict = {}
    monkeypatch.setattr(triton, "write_triton_repository", recorder(seen))
    assert main(["triton", "unit", "-o", "repo", "--name", "m", "--max-batch-size", "4", "--instances", "3",
                 "--server-repo", "/models", "--allow-rtx", "--force"]) == 70
    assert seen["args"] == (Path("unit"), Path("repo"))
    assert seen["kwargs"] == {"name": "m", "max_batch_size": 4, "instances": 3, "server_repository": "/models",
                              "allow_rtx": True, "force": True}
    assert main(["triton", "unit", "-o", "repo"]) == 70
    assert seen["kwargs"] == {"name": None, "max_batch_size": 0, "instances": 1, "server_repository": None,
                              "allow_rtx": False, "force": False}
    capsys.readouterr()


def test_package_flags(monkeypatch, capsys) -> None:
    import pimoe_export.build.units as units

    seen: dict = {}
    manifest = SimpleNamespace(precision="w8a8", build_options={"cpu_isa": "avx2"})
    monkeypatch.setattr(units, "package_ort", recorder(seen, manifest))
    assert main(["package", "m.onnx", "-o", "unit", "--library", "lib.so", "--force"]) == 0
    assert seen["args"] == (Path("m.onnx"), Path("unit"))
    assert seen["kwargs"] == {"library": Path("lib.so"), "force": True}
    assert capsys.readouterr().out.strip() == ("packaged w8a8 ONNX Runtime unit in unit (op library: avx2 kernels); "
                                               "verify it with `pimoe-export inspect unit`")
    assert main(["package", "m.onnx", "-o", "unit"]) == 0
    assert seen["kwargs"] == {"library": None, "force": False}


def test_pipeline_prints_its_verdict_and_exits_1_when_it_failed(monkeypatch, tmp_path, capsys) -> None:
    import pimoe_export.pipeline as pipeline

    for passed, code in ((True, 0), (False, 1)):
        monkeypatch.setattr(pipeline, "run_pipeline", recorder({}, {"passed": passed}))
        assert main(["pipeline", "--preset", "tiny", "-o", str(tmp_path / "out")]) == code
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {
            "passed": passed, "summary": str(tmp_path / "out" / "pipeline.json")}


def test_pipeline_passes_every_flag_to_the_pipeline(monkeypatch, tmp_path, capsys) -> None:
    """Each flag of `pimoe-export pipeline` reaches run_pipeline under its own name, and left out, the documented
    default (seed 0, 20 benchmark repeats, progress shown, nothing overwritten, static w8a8)."""
    import pimoe_export.pipeline as pipeline

    seen: dict = {}
    monkeypatch.setattr(pipeline, "run_pipeline", recorder(seen, {"passed": True}))
    out = tmp_path / "out"
    assert main(["pipeline", "--preset", "tiny", "-o", str(out), "--seed", "5", "--bench-repeats", "3", "--quiet",
                 "--force", "--int8-mode", "w8a8_dynamic"]) == 0
    assert seen["kwargs"] == {"output": out, "preset": "tiny", "model_dir": None, "seed": 5, "bench_repeats": 3,
                              "progress": False, "force": True, "calib_text": None, "int8_mode": "w8a8_dynamic"}
    assert main(["pipeline", "--preset", "tiny", "-o", str(out)]) == 0
    assert seen["kwargs"] == {"output": out, "preset": "tiny", "model_dir": None, "seed": 0, "bench_repeats": 20,
                              "progress": True, "force": False, "calib_text": None, "int8_mode": "w8a8"}
    capsys.readouterr()


def test_pipeline_refuses_text_for_a_layer_preset(tmp_path, capsys) -> None:
    text = tmp_path / "t.txt"
    text.write_text("a\n")
    assert main(["pipeline", "--preset", "tiny", "-o", str(tmp_path / "out"), "--calib", str(text)]) == 2
    assert "--calib applies to whole models" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_pipeline_of_a_model_directory_checks_it_and_passes_its_text(monkeypatch, tmp_path, capsys) -> None:
    import pimoe_export.hf.importers as importers
    import pimoe_export.pipeline as pipeline

    checked: dict = {}
    seen: dict = {}
    monkeypatch.setattr(importers, "check_source", lambda model, calib: checked.update(model=model, calib=calib))
    monkeypatch.setattr(pipeline, "run_pipeline", recorder(seen, {"passed": True}))
    text = tmp_path / "lines.txt"
    assert main(["pipeline", "--model", str(tmp_path / "moe"), "-o", str(tmp_path / "out"), "--calib", str(text)]) == 0
    assert checked == {"model": tmp_path / "moe", "calib": text}
    assert seen["kwargs"]["model_dir"] == tmp_path / "moe" and seen["kwargs"]["calib_text"] == text
    assert seen["kwargs"]["preset"] is None
    capsys.readouterr()


def test_create_and_check_say_what_they_did(monkeypatch, tmp_path, exported_layer, capsys) -> None:
    import pimoe_export.validate.check as check
    from pimoe_export.validate.metrics import ErrorStats

    assert main(["create", "--preset", "tiny", "--seed", "4", "-o", str(tmp_path / "ckpt")]) == 0
    assert capsys.readouterr().out.strip() == f"created preset 'tiny' (seed 4) in {tmp_path / 'ckpt'}"
    _, onnx_path = exported_layer("tiny", 0)
    stats = ErrorStats(max_abs=0.5, mean_abs=0.25, rel_l2=0.125, cosine=0.75, ref_max_abs=2.0, elements=8)
    for polygraphy, passed in ((False, False), (True, True)):
        report = SimpleNamespace(passed=passed, precision="fp32", backend="onnxruntime", primary="output",
                                 output_stats={"output": stats}, routing_agreement=0.5,
                                 polygraphy_passed=polygraphy, failures=[] if passed else ["cosine too low"],
                                 files={"markdown": "r/report.md"})
        monkeypatch.setattr(check, "check_onnx", recorder({}, report))
        code = main(["check", str(tmp_path / "ckpt"), "--onnx", str(onnx_path)])
        out = capsys.readouterr().out.splitlines()
        assert code == (0 if passed else 1)
        assert out[0] == f"{'PASSED' if passed else 'FAILED'}: {onnx_path} (fp32) vs PyTorch on onnxruntime"
        assert out[1] == "  output: max abs 5.000e-01, mean abs 2.500e-01, rel L2 1.250e-01, cosine 0.75000000"
        assert out[2] == f"  routing agreement 50.0000%; Polygraphy {'passed' if polygraphy else 'failed'}"
        assert out[-1] == "  report: r/report.md"
        assert ("  - cosine too low" in out) is (not passed)


def test_the_check_commands_seed_report_folder_and_force_reach_a_decoder_check(decoder_cases, monkeypatch, tmp_path,
                                                                               capsys) -> None:
    """`check --help`: "--seed SEED  input data seed" (default 1234, as for a layer), "-o ... (default: ... <unit>/
    report)" and --force: on a decoder unit they reach the prompts, the report's folder and its writer."""
    import pimoe_export.hf.importers as importers
    from pimoe_export.validate import generation

    case = decoder_cases("mixtral")
    vocab = json.loads((case.hf_dir / "config.json").read_text())["vocab_size"]
    model = SimpleNamespace(config=SimpleNamespace(vocab_size=vocab))
    monkeypatch.setattr(importers, "load_source", lambda directory: SimpleNamespace(module=model, evaluation=None))
    seen: dict[str, list] = {"prompts": [], "checked": [], "written": []}
    report = SimpleNamespace(passed=True, precision="fp32", prompts=[], failures=[])

    def prompts(vocab_size: int, seed: int) -> list[list[int]]:
        seen["prompts"].append((vocab_size, seed))
        return [[1, 2, 3]]

    def check(engine, reference, prompt_ids):
        seen["checked"].append(prompt_ids)
        return report

    def write(given, out_dir, force=False):
        seen["written"].append((given, out_dir, force))
        return {"json": out_dir / "report.json", "markdown": out_dir / "report.md"}

    monkeypatch.setattr(generation, "seeded_prompts", prompts)
    monkeypatch.setattr(generation, "check_generation", check)
    monkeypatch.setattr(generation, "write_generation_report", write)
    argv = ["check", str(case.hf_dir), "--unit", str(case.unit)]
    assert main([*argv, "--seed", "9", "--force"]) == 0
    assert seen["prompts"] == [(vocab, 9)] and seen["checked"] == [[[1, 2, 3]]]
    assert seen["written"] == [(report, case.unit / "report", True)]
    assert main(argv) == 0
    assert seen["prompts"][-1] == (vocab, 1234) and seen["written"][-1] == (report, case.unit / "report", False)
    assert capsys.readouterr().out.count(f"  report: {case.unit / 'report' / 'report.md'}") == 2
    assert main([*argv, "-o", str(tmp_path / "mine")]) == 0  # -o: the report goes where it is told
    assert seen["written"][-1] == (report, tmp_path / "mine", False)
    capsys.readouterr()


def _quantize_method(monkeypatch, argv: list[str]) -> str:
    """The calibration method `quantize` hands to quantize_model."""
    import pimoe_export.quantize as quantize

    seen: dict = {}
    monkeypatch.setattr(quantize, "quantize_model", recorder(seen))
    assert main(["quantize", *argv]) == 70
    return seen["kwargs"]["method"]


def test_the_quantize_command_follows_a_checkpoints_recorded_method(monkeypatch, tmp_path, capsys) -> None:
    """Without --method, quantize calibrates with the method the checkpoint records for deployment (what the
    pipeline uses: docs/models.md's mse for decoders), else entropy (`quantize --help`)."""
    from pimoe_export.model.factory import create_from_preset
    from pimoe_export.model.moe_block import ExpertsConfig, MoEBlock, MoEBlockConfig

    # a PiMoE layer records nothing: the help's "else entropy"
    create_from_preset("tiny").save_pretrained(tmp_path / "layer")
    assert _quantize_method(monkeypatch, [str(tmp_path / "layer"), "-o", str(tmp_path / "l.onnx")]) == "entropy"
    # a MoE block that records deployment.calibration_method = "max" (as the mixtral-ffn preset records "mse")
    config = MoEBlockConfig(hidden_size=8, num_experts=4, top_k=2, experts=ExpertsConfig(intermediate_size=4),
                            metadata={"deployment": {"calibration_method": "max"}})
    MoEBlock(config).save_pretrained(tmp_path / "block")
    assert _quantize_method(monkeypatch, [str(tmp_path / "block"), "-o", str(tmp_path / "b.onnx")]) == "max"
    capsys.readouterr()
