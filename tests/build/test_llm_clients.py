"""The decoder unit directory in the LLM clients people use: optimum's ORTModelForCausalLM and ONNX Runtime GenAI.

Each loads the unit as it is (our op library registered: optimum through the session options it is given, GenAI
through the custom_ops_library of the genai_config.json the unit ships) and must generate, greedy, exactly the
tokens of Hugging Face ``generate(do_sample=False)`` on the same weights for a batch of three prompts of different
lengths. What each client needs is in docs/generation.md; GenAI's configuration cannot describe DeepSeek's cache
(keys and values of different head dims): those units ship no genai_config.json, and the GenAI tests skip them.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from decoders import sliding_window
from test_generate import NEW_TOKENS, PROMPTS, hf_greedy

from pimoe_export.artifacts.manifest import read_manifest
from pimoe_export.runtime.clients import optimum_causal_lm

pytestmark = pytest.mark.slow

def test_optimum_ort_model_for_causal_lm_generates_the_same_tokens(decoder_case) -> None:
    pytest.importorskip("onnxruntime")
    optimum = pytest.importorskip("optimum.onnxruntime", reason="the llm-clients extra (optimum-onnx) is not "
                                                               "installed")
    reference = hf_greedy(decoder_case, PROMPTS)
    tokenizer = decoder_case.hf_tokenizer()
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    for io_binding in (False, True):
        model = optimum_causal_lm(decoder_case.unit, use_io_binding=io_binding)
        assert isinstance(model, optimum.ORTModelForCausalLM)
        with torch.no_grad():
            out = model.generate(**batch, do_sample=False, max_new_tokens=NEW_TOKENS,
                                 pad_token_id=tokenizer.pad_token_id)
        rows = out[:, batch["input_ids"].shape[1]:].tolist()
        assert [row[: len(ref)] for row, ref in zip(rows, reference, strict=True)] == reference, io_binding


def test_optimum_alone_feeds_a_grouped_query_unit_an_attention_head_cache(decoder_cases) -> None:
    """Why optimum_causal_lm sets the empty cache's shape: optimum-onnx by itself (our library registered, nothing
    else) sizes a grouped-query Mixtral's first past with num_attention_heads, which ONNX Runtime refuses. If a
    release of optimum fixes this, this test fails and optimum_causal_lm's override can go."""
    ort = pytest.importorskip("onnxruntime")
    optimum = pytest.importorskip("optimum.onnxruntime", reason="the llm-clients extra (optimum-onnx) is not "
                                                               "installed")
    case = decoder_cases("mixtral")
    spec = read_manifest(case.unit).decoder_spec
    assert spec is not None and spec.num_kv_heads < spec.num_attention_heads
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(case.unit / "libpimoe_ort.so"))
    model = optimum.ORTModelForCausalLM.from_pretrained(str(case.unit), session_options=options)
    assert model.num_key_value_heads == spec.num_attention_heads
    batch = case.hf_tokenizer()(PROMPTS[:1], return_tensors="pt")
    with pytest.raises(Exception, match="past_key_values"):
        model.generate(**batch, do_sample=False, max_new_tokens=2)


def test_optimum_alone_feeds_a_latent_attention_unit_one_head_dim(decoder_cases) -> None:
    """Why optimum_causal_lm names a DeepSeek-V2 unit's type deepseek_v3 to optimum: by itself optimum-onnx gives the
    first past of any other type one head dim for keys and values, which ONNX Runtime refuses for a graph whose keys
    and values differ (multi-head latent attention). If a release of optimum sizes deepseek_v2 too, this test fails
    and the override can go. The loader changes the loaded model's config object only, not the unit's file."""
    ort = pytest.importorskip("onnxruntime")
    optimum = pytest.importorskip("optimum.onnxruntime", reason="the llm-clients extra (optimum-onnx) is not "
                                                               "installed")
    case = decoder_cases("deepseek_v2")
    spec = read_manifest(case.unit).decoder_spec
    assert spec is not None and spec.value_head_dim != spec.head_dim
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(case.unit / "libpimoe_ort.so"))
    model = optimum.ORTModelForCausalLM.from_pretrained(str(case.unit), session_options=options)
    batch = case.hf_tokenizer()(PROMPTS[:1], return_tensors="pt")
    with pytest.raises(Exception, match="past_key_values"):
        model.generate(**batch, do_sample=False, max_new_tokens=2)
    on_disk = (case.unit / "config.json").read_text()
    loaded = optimum_causal_lm(case.unit)
    assert (loaded.qk_head_dim, loaded.v_head_dim) == (spec.head_dim, spec.value_head_dim)
    assert (case.unit / "config.json").read_text() == on_disk and '"deepseek_v2"' in on_disk


def genai_generate(og, directory, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """GenAI greedy generation of a batch (right-padded: GenAI keeps each row's length, see docs/generation.md)."""
    model = og.Model(str(directory))
    width = max(len(p) for p in prompts)
    pad = json.loads((directory / "genai_config.json").read_text())["model"]["pad_token_id"]
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=width + new_tokens, batch_size=len(prompts))
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([p + [pad] * (width - len(p)) for p in prompts], np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [list(generator.get_sequence(i))[width:] for i in range(len(prompts))]


def skip_where_genai_cannot_describe(case) -> None:
    """A unit GenAI's configuration cannot describe (keys and values of different head dims) ships no
    genai_config.json, and its manifest says why (docs/generation.md)."""
    manifest = read_manifest(case.unit)
    spec = manifest.decoder_spec
    assert spec is not None
    if spec.value_head_dim != spec.head_dim:
        assert not (case.unit / "genai_config.json").exists()
        assert "genai_config" not in {a.role for a in manifest.artifacts}
        reason = manifest.build_options["genai_config"]
        assert "one head_size" in reason
        pytest.skip(f"{case.family}: {reason}")


def test_onnxruntime_genai_generates_the_same_tokens(decoder_case, tmp_path) -> None:
    og = pytest.importorskip("onnxruntime_genai", reason="the llm-clients extra (onnxruntime-genai) is not installed")
    skip_where_genai_cannot_describe(decoder_case)
    reference = hf_greedy(decoder_case, PROMPTS)
    prompts = decoder_case.hf_tokenizer()(PROMPTS)["input_ids"]

    def run(directory):
        if sliding_window(decoder_case.hf_dir):
            # GenAI right-pads a batch, so its pad slots sit between a short prompt and its new tokens, inside the
            # attention window that the graph counts in cache slots: windowed families generate in GenAI one
            # prompt at a time (docs/generation.md)
            return [genai_generate(og, directory, [p], NEW_TOKENS)[0] for p in prompts]
        return genai_generate(og, directory, prompts, NEW_TOKENS)

    rows = run(decoder_case.unit)
    assert [row[: len(ref)] for row, ref in zip(rows, reference, strict=True)] == reference
    # a model type GenAI does not know runs as its generic "decoder" type (what the unit writes for such families)
    generic = tmp_path / "generic"
    shutil.copytree(decoder_case.unit, generic)
    config = json.loads((generic / "genai_config.json").read_text())
    config["model"]["type"] = "decoder"
    (generic / "genai_config.json").write_text(json.dumps(config))
    rows = run(generic)
    assert [row[: len(ref)] for row, ref in zip(rows, reference, strict=True)] == reference


def test_genai_refuses_a_library_outside_the_unit(decoder_case, tmp_path) -> None:
    """GenAI's own containment rule (why genai_config.json names the library relative to the unit)."""
    og = pytest.importorskip("onnxruntime_genai", reason="the llm-clients extra (onnxruntime-genai) is not installed")
    skip_where_genai_cannot_describe(decoder_case)
    moved = tmp_path / "moved"
    shutil.copytree(decoder_case.unit, moved)
    config = json.loads((moved / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"]["custom_ops_library"] = "../libpimoe_ort.so"
    (moved / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="path traversal"):
        og.Model(str(moved))
