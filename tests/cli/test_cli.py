"""The `pimoe-export` command line, end to end on the tiny preset (in-process)."""

from __future__ import annotations

import json

import pytest
import torch

from pimoe_export.cli import main
from pimoe_export.model import PiMoESystem, create_from_preset


def test_create_info_and_bit_exact_reload(tmp_path, capsys) -> None:
    out = tmp_path / "seed-types"
    assert main(["create", "--preset", "seed-types", "-o", str(out)]) == 0
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "reasoning" in text and "FLOP/token" in text and "expert groups" in text
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params_total"] > 0 and len(info["params_per_expert"]) == 8
    x = torch.randn(2, 5, 512)
    assert torch.equal(PiMoESystem.from_pretrained(out)(x), create_from_preset("seed-types")(x))


def test_export_and_check_exit_codes(tmp_path, capsys) -> None:
    model_dir = tmp_path / "tiny"
    assert main(["create", "--preset", "tiny", "-o", str(model_dir)]) == 0
    onnx_path = tmp_path / "tiny.onnx"
    assert main(["export", str(model_dir), "-o", str(onnx_path)]) == 0
    assert "pimoe::PiMoEExpertMLP" in capsys.readouterr().out
    assert main(["check", str(model_dir), "--onnx", str(onnx_path), "--shapes", "1x1,2x7"]) == 0
    report = json.loads((tmp_path / "tiny_report" / "report.json").read_text())
    assert report["passed"] and report["routing_agreement"] == 1.0
    other = tmp_path / "other"
    assert main(["create", "--preset", "tiny", "--seed", "5", "-o", str(other)]) == 0
    assert main(["check", str(other), "--onnx", str(onnx_path), "--no-plots"]) == 1  # other weights: fails


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys) -> None:
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "config.json is missing" in err and "pimoe-export create" in err
    with pytest.raises(SystemExit):
        main(["create", "--preset", "nope", "-o", str(tmp_path)])


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_create_leaves_each_of_the_users_files_alone_without_force(tmp_path, capsys, name) -> None:
    """Either file create writes, already in the folder and not written by pimoe-export: refused (exit 2) and left
    as it was; with --force it is replaced by a model that loads."""
    out = tmp_path / "model"
    out.mkdir()
    (out / name).write_text("the user's own")
    assert main(["create", "--preset", "tiny", "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / name).read_text() == "the user's own"
    assert sorted(p.name for p in out.iterdir()) == [name]
    assert main(["create", "--preset", "tiny", "-o", str(out), "--force"]) == 0
    assert main(["create", "--preset", "tiny", "-o", str(out)]) == 0  # both files are now pimoe-export's
    x = torch.randn(1, 3, 16)
    assert torch.equal(PiMoESystem.from_pretrained(out)(x), create_from_preset("tiny")(x))


@pytest.mark.slow
def test_pipeline_on_tiny(tmp_path) -> None:
    out = tmp_path / "engines" / "tiny"
    assert main(["pipeline", "--preset", "tiny", "-o", str(out), "--bench-repeats", "3", "--quiet"]) == 0
    summary = json.loads((out / "pipeline.json").read_text())
    statuses = {s["name"]: s["status"] for s in summary["steps"]}
    assert statuses["model"] == statuses["export"] == statuses["check"] == statuses["benchmark"] == "done"
    for step in summary["steps"]:
        assert step["status"] != "failed"
        if step["status"] == "skipped":
            assert step["reason"]
    for name in ("model.onnx", "model.standard.onnx", "report/report.md", "report/report.json",
                 "report/error_histogram.png", "benchmark.md", "model/config.json"):
        assert (out / name).is_file(), name


@pytest.mark.slow
def test_pipeline_honours_the_enhanced_deployment_settings(tmp_path) -> None:
    """optimization_level / enable_pruning recorded by EnhancedPiMoEIntegration are applied by the pipeline."""
    from pimoe_export.model import EnhancedPiMoEIntegration

    enhanced = EnhancedPiMoEIntegration(16, 4, expert_types=["language", "reasoning"], optimization_level="advanced",
                                        enable_quantization=False, enable_pruning=True, pruning_amount=0.25,
                                        expert_config={"intermediate_size": 32})
    enhanced.save_pretrained(tmp_path / "enhanced")
    out = tmp_path / "out"
    assert main(["pipeline", "--model", str(tmp_path / "enhanced"), "-o", str(out), "--bench-repeats", "2",
                 "--quiet"]) == 0
    steps = {s["name"]: s for s in json.loads((out / "pipeline.json").read_text())["steps"]}
    pruning = steps["model"]["detail"]["pruning"]
    assert pruning["method"] == "structured" and pruning["params_after"] < pruning["params_before"]
    assert steps["int8"]["detail"]["method"] == "entropy"  # the "advanced" level's calibration method
    assert (out / "ort-fp16" / "manifest.json").is_file()  # the "advanced" level exports fp16
    assert json.loads((out / "report_fp16" / "report.json").read_text())["passed"]


def test_info_reads_a_moe_block_checkpoint(tmp_path, capsys) -> None:
    """A MoE block checkpoint (what `create --preset mixtral-ffn` writes, here at H 16, I 24, E 4, k 2 with a shared
    expert): parameters and FLOPs counted by hand for gated experts ([gate; up] rows 2I x H, down H x I)."""
    from pimoe_export.model.factory import build_model
    from pimoe_export.model.io import save_pretrained
    from pimoe_export.model.moe_block import ExpertsConfig, MoEBlockConfig

    config = MoEBlockConfig(hidden_size=16, num_experts=4, top_k=2, experts=ExpertsConfig(intermediate_size=24),
                            normalize=True, shared=ExpertsConfig(intermediate_size=8), family="mixtral")
    save_pretrained(build_model(config), tmp_path / "block")
    assert main(["info", str(tmp_path / "block"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    expert, shared = 2 * 24 * 16 + 16 * 24, 2 * 8 * 16 + 16 * 8
    assert info["params_router"] == 16 * 4 and info["params_per_expert"] == expert
    assert info["params_total"] == 16 * 4 + 4 * expert + shared
    assert info["flops_per_token"]["active_expected"] == 2 * (16 * 4 + 2 * expert + shared)
    assert [g["experts"] for g in info["expert_groups"]] == [[0, 1, 2, 3], "shared"]
    assert main(["info", str(tmp_path / "block")]) == 0
    assert "expert groups (one PiMoEExpertMLP node each)" in capsys.readouterr().out
