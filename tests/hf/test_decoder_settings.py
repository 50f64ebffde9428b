"""The deployment settings a Hugging Face decoder's source carries into the pipeline (docs/models.md): INT8
calibration with the `mse` method by default, for every family."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from decoders import FAMILIES

from pimoe_export.hf.importers import load_source


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decoders_calibrate_with_mse_by_default(tiny_decoder, family) -> None:
    assert load_source(tiny_decoder(family)).settings.calibration_method == "mse"


class _Stop(Exception):
    pass


def _quantize_method(monkeypatch, argv: list[str]) -> str:
    """The calibration method `pimoe-export quantize` (cli/quantize_command.py) hands to quantize_model."""
    import pimoe_export.quantize as quantize
    from pimoe_export.cli import main

    seen: dict = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(quantize, "quantize_model", record)
    assert main(["quantize", *argv]) == 70  # the recorder's stop, after the method was chosen
    return seen["method"]


def test_the_quantize_command_calibrates_a_decoder_with_mse_by_default(monkeypatch, tiny_decoder, tmp_path,
                                                                       capsys) -> None:
    # docs/models.md: "Decoders calibrate with the `mse` method by default" (the pipeline and `quantize` alike)
    directory = str(tiny_decoder("qwen3_moe"))
    assert _quantize_method(monkeypatch, [directory, "-o", str(tmp_path / "a.int8.onnx")]) == "mse"
    # an explicit choice wins over the recorded one
    argv = [directory, "-o", str(tmp_path / "b.int8.onnx"), "--method", "entropy"]
    assert _quantize_method(monkeypatch, argv) == "entropy"
    capsys.readouterr()


def test_the_quantize_command_follows_a_checkpoints_recorded_method(monkeypatch, tmp_path, capsys) -> None:
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
