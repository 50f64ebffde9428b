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
