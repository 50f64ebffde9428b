"""What a parity check measures and reports beyond pass/fail: the pooled-embedding criterion of a whole model (over
its attention masks), the kernel-vs-fake-quant comparison of every INT8 artefact (static and dynamic, graph and
unit), the report's JSON and Markdown, and the defaults the command line and the library share."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from test_whole_model import TinyEncoder, feeds

from pimoe_export.errors import PluginLoadError
from pimoe_export.interface import MAX_KERNEL_REL_L2, TOLERANCES
from pimoe_export.validate.check import DEFAULT_SHAPES, check_onnx, check_unit, run_check


def skip_without_library(call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except PluginLoadError as exc:
        pytest.skip(f"libpimoe_ort is not built: {exc}")


def test_a_whole_models_check_includes_the_pooled_embedding_over_the_masks(tmp_path) -> None:
    from pimoe_export.export.exporter import export_model

    model = TinyEncoder().eval()
    example = {k: torch.from_numpy(v) for k, v in feeds(0, ((2, 8),))[0].items()}
    path = export_model(model, tmp_path / "m.onnx", example, routing_outputs=True).path
    check_feeds = feeds(6)
    report = skip_without_library(check_onnx, model, path, tmp_path / "report", feeds=check_feeds, plots=False)
    assert report.passed, report.failures
    sequences = sum(f["attention_mask"].shape[0] for f in check_feeds)
    assert report.embedding["output"] == "last_hidden_state" and report.embedding["sequences"] == sequences
    assert report.embedding["required_mean_cosine"] == TOLERANCES["fp32"].min_cosine
    assert 0.999999 <= report.embedding["min_cosine"] <= report.embedding["mean_cosine"] <= 1.000001
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["embedding"] == report.embedding
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert f"Mean-pooled embedding of `last_hidden_state` over the attention mask, {sequences} sequences" in markdown
    assert "## Routing agreement by MoE layer\n\n| layer | top-k agreement |\n|---|---|\n| blocks.0.moe | " in markdown
    assert "| blocks.1.moe | 100.0000% |" in markdown
    assert set(report.routing_by_layer) == {"blocks.0.moe", "blocks.1.moe"}


@pytest.fixture(scope="module")
def dynamic_int8(exported_layer, tmp_path_factory):
    """tiny, INT8 with dynamic per-row activation scales (no calibration needed), as a graph and a unit."""
    from pimoe_export.build.units import package_ort
    from pimoe_export.quantize import quantize_model

    model, onnx_path = exported_layer("tiny", 0)
    root = tmp_path_factory.mktemp("dyn")
    result = quantize_model(model, root / "m.int8.onnx", mode="w8a8_dynamic", fp32_onnx=onnx_path)
    skip_without_library(package_ort, result.onnx_path, root / "unit")
    return model, result.onnx_path, root / "unit"


@pytest.mark.parametrize("kind", ["onnx", "unit"])
def test_every_int8_check_compares_the_kernels_with_the_fake_quant_reference(dynamic_int8, tmp_path, kind) -> None:
    model, onnx_path, unit = dynamic_int8
    shapes = [(1, 3), (2, 5)]
    if kind == "onnx":
        report = check_onnx(model, onnx_path, tmp_path / "r", shapes=shapes, plots=False)
    else:
        report = check_unit(model, unit, tmp_path / "r", shapes=shapes, plots=False)
    assert report.precision == "w8a8_dynamic"
    kernel = report.kernel_vs_fake_quant
    assert kernel["max_rel_l2"] == MAX_KERNEL_REL_L2 and 0 <= kernel["output"]["rel_l2"] <= MAX_KERNEL_REL_L2
    assert kernel["routing_agreement"] == 1.0
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "## Kernel error alone: backend vs the fake-quant PyTorch reference (same integer math)" in markdown
    assert json.loads((tmp_path / "r" / "report.json").read_text())["kernel_vs_fake_quant"] == kernel


def test_the_report_files_of_a_float_check(exported_layer, tmp_path) -> None:
    model, onnx_path = exported_layer("tiny", 0)
    report = skip_without_library(check_onnx, model, onnx_path, tmp_path / "r", shapes=[(1, 4), (3, 7)], seed=5,
                                  plots=False)
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["tolerances"] == TOLERANCES["fp32"].to_dict()
    assert saved["shapes"] == [[1, 4], [3, 7]] and saved["precision"] == "fp32" and saved["passed"]
    assert saved["primary"] == "output" and saved["kernel_vs_fake_quant"] == {} and saved["embedding"] == {}
    assert saved["per_expert_mean_abs"] == {str(k): v for k, v in report.per_expert_mean_abs.items()}
    assert set(saved["per_expert_mean_abs"]) <= {"0", "1", "2", "3"} and saved["per_expert_mean_abs"]
    assert saved["outputs"]["output"] == report.output_stats["output"].to_dict()
    markdown = (tmp_path / "r" / "report.md").read_text()
    lines = markdown.splitlines()
    assert lines[0] == f"# pimoe-export parity report: {report.backend}, fp32"
    assert lines[2].startswith("**PASSED** — reference: PyTorch fp32 model; shapes [batch, seq] [(1, 4), (3, 7)]")
    assert "| output | max abs | mean abs | rel L2 | cosine | max abs(ref) |" in lines
    assert any(line.startswith("| expert_weights | ") for line in lines)
    for section in ("## Mean |error| by top-1 expert", "## Environment", "## Files"):
        assert section in lines, section
    assert "## Failures" not in markdown and "## Kernel error alone" not in markdown
    # the files the report lists are the ones in its directory, the report's own two under their names
    assert saved["files"] == report.files
    assert report.files["json"] == str(tmp_path / "r" / "report.json")
    assert report.files["markdown"] == str(tmp_path / "r" / "report.md")
    written = {p.name for p in (tmp_path / "r").iterdir() if not p.name.startswith(".")}
    assert {Path(f).name for f in report.files.values()} <= written
    assert "- markdown: report.md" in lines and "- json: report.json" in lines


def test_the_defaults_the_command_line_and_the_library_share() -> None:
    from pimoe_export.bench.summary import benchmark_source
    from pimoe_export.cli import build_parser
    from pimoe_export.pipeline import PipelineOptions

    for function in (check_onnx, check_unit, run_check):
        parameters = inspect.signature(function).parameters
        assert parameters["seed"].default == 1234 and parameters["shapes"].default == DEFAULT_SHAPES
    assert DEFAULT_SHAPES == ((1, 1), (2, 16), (4, 64))
    check = build_parser().parse_args(["check", "m", "--onnx", "x.onnx"])
    assert check.seed == 1234 and check.shapes is None  # None: DEFAULT_SHAPES
    assert inspect.signature(benchmark_source).parameters["repeats"].default == 20 == PipelineOptions().bench_repeats
    assert build_parser().parse_args(["pipeline", "--preset", "tiny", "-o", "o"]).bench_repeats == 20


def test_the_checks_inputs_follow_the_seed(exported_layer, tmp_path) -> None:
    """The same seed draws the same inputs (a report can be reproduced: the outputs' statistics are the same to
    the bit), another seed other inputs."""
    model, onnx_path = exported_layer("tiny", 0)

    def outputs(seed: int, name: str) -> dict:
        skip_without_library(check_onnx, model, onnx_path, tmp_path / name, shapes=[(2, 5)], seed=seed, plots=False)
        return json.loads((tmp_path / name / "report.json").read_text())["outputs"]

    first = outputs(7, "a")
    assert outputs(7, "b") == first and outputs(8, "c") != first


def test_the_plots_of_a_bit_exact_check(tmp_path) -> None:
    """Where every output matches the reference exactly there is no log-error histogram to draw: the histogram
    says so instead (and is still written), and the per-expert chart is drawn as usual."""
    import numpy as np

    pytest.importorskip("matplotlib")
    from pimoe_export._files import OutputDir
    from pimoe_export.validate.report import plots

    reference = [{"output": np.arange(12, dtype=np.float32).reshape(3, 4)}]
    files = plots(reference, [{"output": reference[0]["output"].copy()}], {0: 0.0, 1: 0.0}, OutputDir(tmp_path))
    assert set(files) == {"error_histogram", "per_expert_error"}
    for path in files.values():
        assert Path(path).parent == tmp_path and Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
