"""optimum_causal_lm (pimoe_export.runtime.clients) on a tiny decoder unit, fast: the ORTModelForCausalLM it returns
has our op library in its session (its logits for a batch of prompts are Engine's, whose session registers the
unit's library itself), and session options passed by the caller are refused by name. Generation through optimum
for every family is in tests/build/test_llm_clients.py (slow)."""

from __future__ import annotations

import numpy as np
import pytest

from pimoe_export.artifacts.manifest import read_manifest
from pimoe_export.errors import PiMoEInputError
from pimoe_export.runtime.decoder import Rows

PROMPTS = [[5, 9, 11, 3], [7, 2]]


@pytest.fixture(scope="module")
def unit(decoder_cases):
    return decoder_cases("qwen3_moe").unit


def test_optimum_runs_the_unit_as_engine_does(unit) -> None:
    pytest.importorskip("optimum.onnxruntime", reason="the llm-clients extra (optimum-onnx) is not installed")
    import torch

    from pimoe_export.runtime.clients import optimum_causal_lm
    from pimoe_export.runtime.engine import Engine

    engine = Engine.load(unit)
    _, want = Rows.prefill(engine.decoder(), PROMPTS)  # each prompt's last-token logits, left-padded batch
    model = optimum_causal_lm(unit, threads=1)
    spec = read_manifest(unit).decoder_spec
    assert spec is not None
    pad = spec.pad_token_id
    width = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits[:, -1, :].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_session_options_from_the_caller_are_refused(unit) -> None:
    from pimoe_export.runtime.clients import optimum_causal_lm

    with pytest.raises(PiMoEInputError) as info:
        optimum_causal_lm(unit, session_options=object())
    assert str(info.value) == ("optimum_causal_lm makes the session options itself (with the unit's op library): "
                               "pass threads=N instead of session_options")
