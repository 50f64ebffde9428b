"""The genai_config.json a decoder unit ships, read by ONNX Runtime GenAI's own parser (``og.Config``: it refuses
unknown keys and a model without a context length) and held to Hugging Face's generation defaults. Built from a
hand-written DecoderSpec (no model, no graph): fast. Generation through GenAI itself is in test_llm_clients.py
(slow)."""

from __future__ import annotations

import json

import pytest

from pimoe_export.build.clients import genai_config, genai_search
from pimoe_export.interface import DecoderSpec

SPEC = DecoderSpec("qwen3_moe", num_layers=3, num_attention_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64,
                   vocab_size=320, context_length=512, eos_token_ids=(7, 9), pad_token_id=0, bos_token_id=None)


def test_genai_parses_the_config_and_it_says_what_the_spec_says(tmp_path) -> None:
    og = pytest.importorskip("onnxruntime_genai", reason="the llm-clients extra (onnxruntime-genai) is not installed")
    config = genai_config(SPEC, "model.onnx", "libpimoe_ort.so", {"do_sample": True, "temperature": 0.7})
    (tmp_path / "genai_config.json").write_text(json.dumps(config))
    og.Config(str(tmp_path))  # GenAI's parser: every key known, every required value there
    model = config["model"]
    decoder = model["decoder"]
    assert (model["context_length"], model["vocab_size"], model["pad_token_id"]) == (512, 320, 0)
    assert model["eos_token_id"] == [7, 9] and model["bos_token_id"] == 7  # no BOS: GenAI takes the first EOS
    assert (decoder["head_size"], decoder["hidden_size"], decoder["num_attention_heads"],
            decoder["num_key_value_heads"], decoder["num_hidden_layers"]) == (16, 64, 4, 2, 3)
    assert decoder["filename"] == "model.onnx"
    assert decoder["session_options"]["custom_ops_library"] == "libpimoe_ort.so"
    # GenAI fills the printf templates with the layer index: the names our graphs have
    names = {key: decoder[side][key] % 2 for side, key in [("inputs", "past_key_names"),
                                                          ("inputs", "past_value_names"),
                                                          ("outputs", "present_key_names"),
                                                          ("outputs", "present_value_names")]}
    assert names == {"past_key_names": "past_key_values.2.key", "past_value_names": "past_key_values.2.value",
                     "present_key_names": "present.2.key", "present_value_names": "present.2.value"}
    assert config["search"]["past_present_share_buffer"] is False  # our graphs concatenate the cache
    assert config["search"]["max_length"] == 512
    one_eos = genai_config(DecoderSpec(**{**SPEC.to_dict(), "eos_token_ids": (9,), "bos_token_id": 1}),
                           "m.onnx", "lib.so")["model"]
    assert (one_eos["eos_token_id"], one_eos["bos_token_id"]) == (9, 1)
    bos_zero = genai_config(DecoderSpec(**{**SPEC.to_dict(), "bos_token_id": 0}), "m.onnx", "lib.so")["model"]
    assert bos_zero["bos_token_id"] == 0  # token 0 is a BOS like any other, not "no BOS"


@pytest.mark.parametrize("generation_config", [{}, {"do_sample": True}, {"do_sample": True, "temperature": 0.6,
                                                                         "top_k": 20, "top_p": 0.95}])
def test_search_settings_are_hugging_faces_for_the_same_generation_config(generation_config) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.GenerationConfig(**generation_config)
    search = genai_search(generation_config, 512)
    for key in ("do_sample", "num_beams", "num_return_sequences", "temperature", "top_p", "repetition_penalty",
                "length_penalty", "no_repeat_ngram_size", "diversity_penalty"):
        assert search[key] == getattr(hf, key), key
    # greedy ignores top_k in both; sampling takes Hugging Face's
    assert search["top_k"] == (hf.top_k if hf.do_sample else 1)
