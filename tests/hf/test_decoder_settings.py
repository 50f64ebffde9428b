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
