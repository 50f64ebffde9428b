"""The importers' DecoderLM with its key/value cache (pimoe_export/hf/decoder.py), in PyTorch, for every family.

A left-padded batch run as generation runs it (the prompt in one step with an empty past, then one token per step
through the cache the previous step returned) gives, at every valid position, the logits of Hugging Face's own
model on the whole sequence in one forward pass without a cache (transformers' model loaded from the same
directory: independent of our cache handling). The DecoderSpec holds the tiny configs' known geometry, DeepSeek's
multi-head latent attention cache with keys and values of different head dims (value_head_dim).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_decoders import TINY

from pimoe_export.hf import decoder as D
from pimoe_export.interface import MODEL_LOGITS_OUTPUT, past_name, present_name

transformers = pytest.importorskip("transformers")

#: multi-head latent attention: keys of qk_nope 8 + qk_rope 8 = 16, values of v_head_dim 8, on all 4 heads
MLA = ("deepseek_v2", "deepseek_v3")
PROMPT = 5  # the prefill step's tokens; the rest of the 11 go one per step


def _tensors(feed: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in feed.items()}


@pytest.mark.parametrize("family", list(TINY))
def test_prefill_then_decode_steps_give_hugging_faces_logits(family, tiny_decoder) -> None:
    directory = tiny_decoder(family)
    ours = D.load_decoder(directory)
    spec = ours.spec
    assert spec is not None, ours.cache_refusal
    # the tiny configs (tests/hf/tiny_decoders.py): 2 layers, 2 KV heads of 8 (H 32 / 4 heads, or head_dim 8);
    # DeepSeek: every one of the 4 heads caches keys of 16 and values of 8
    geometry = (2, 4, 16, 8) if family in MLA else (2, 2, 8, 8)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.value_head_dim) == geometry
    assert spec.vocab_size == 96 and ("value_head_dim" in spec.to_dict()) == (family in MLA)
    assert spec.eos_token_ids == (2,) and spec.model_type == family and spec.context_length == 256
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    feed = D.random_decoder_feeds(96, 5, ((3, 11, "left"),))[0]
    mask = feed["attention_mask"]
    with torch.no_grad():
        want = theirs(**_tensors(feed)).logits.numpy()
        step = D.decoder_feed(feed["input_ids"][:, :PROMPT], mask[:, :PROMPT], spec)
        out = ours(**_tensors(step))
        got = [out[MODEL_LOGITS_OUTPUT].numpy()]
        for t in range(PROMPT, mask.shape[1]):
            past = {past_name(i, k): out[present_name(i, k)] for i in range(spec.num_layers) for k in ("key", "value")}
            assert past[past_name(0, "key")].shape == (3, spec.num_kv_heads, t, spec.head_dim)
            assert past[past_name(1, "value")].shape == (3, spec.num_kv_heads, t, spec.value_head_dim)
            out = ours(input_ids=torch.from_numpy(feed["input_ids"][:, t: t + 1]),
                       attention_mask=torch.from_numpy(mask[:, : t + 1]),
                       position_ids=torch.from_numpy(feed["position_ids"][:, t: t + 1]), **past)
            got.append(out[MODEL_LOGITS_OUTPUT].numpy())
    steps = np.concatenate(got, axis=1)
    valid = mask.astype(bool)
    rel = np.linalg.norm(steps[valid] - want[valid]) / np.linalg.norm(want[valid])
    assert rel <= 1e-5, f"{family}: cached steps differ from the whole-sequence forward (rel. L2 {rel:.3g})"


def test_layers_with_different_caches_are_refused(tiny_decoder, monkeypatch) -> None:
    """Keys and values may differ in head dim (MLA, above), not layers from each other: such a model gets no
    DecoderSpec (load_decoder keeps its forward pass alone), the reason says why."""
    model = D.load_decoder(tiny_decoder("mixtral"), cache=False)
    real = model._hf.forward

    def uneven(*args, **kwargs):  # layer 1 caches keys and values of 4 (layer 0: 8)
        out = real(*args, **kwargs)
        layer = out.past_key_values.layers[1]
        layer.keys, layer.values = layer.keys[..., :4], layer.values[..., :4]
        return out

    monkeypatch.setattr(model._hf, "forward", uneven)
    reason = D.decoder_spec(model, tiny_decoder("mixtral"))
    assert isinstance(reason, str) and "layers cache keys/values of different" in reason
    assert "(2, 8), (2, 8)" in reason and "(2, 4), (2, 4)" in reason
    monkeypatch.undo()
    assert D.decoder_spec(model, tiny_decoder("mixtral")) == D.load_decoder(tiny_decoder("mixtral")).spec


def _without_eos(tiny_decoder, directory: Path) -> None:
    """The tiny Mixtral copied to ``directory`` with no eos_token_id in its configs."""
    import json
    import shutil

    shutil.copytree(tiny_decoder("mixtral"), directory)
    for name in ("config.json", "generation_config.json"):  # save_pretrained writes both
        data = json.loads((directory / name).read_text())
        data["eos_token_id"] = None
        (directory / name).write_text(json.dumps(data))


def test_a_model_without_an_eos_token_keeps_the_forward_pass(tiny_decoder, tmp_path) -> None:
    """Generation ends rows at EOS: a config that names none gets no cache, and says how to fix it."""
    directory = tmp_path / "no-eos"
    _without_eos(tiny_decoder, directory)
    model = D.load_decoder(directory)
    assert model.spec is None and "eos_token_id" in (model.cache_refusal or "")
    with pytest.raises(TypeError, match=r"past_key_values\.0\.key"):
        model(**_tensors(D.random_decoder_feeds(96, 1, ((1, 4, "none"),))[0]),
              **{past_name(0, "key"): torch.zeros(1, 2, 0, 8)})


def test_a_decoder_source_without_a_cache_says_why_in_kv_cache(tiny_decoder, tmp_path) -> None:
    """docs/models.md: a config without an eos_token_id keeps the graph without a cache, and the pipeline record's
    `model.kv_cache` says why: "none: " and the model's reason. Its inputs are the forward pass's, no past; a
    decoder with a cache records its DecoderSpec there instead and takes the decoder inputs of docs/generation.md
    (the past key/values [batch, kv heads, past, head dim], the mask over past + sequence)."""
    from pimoe_export.hf.importers import decoder_source

    directory = tmp_path / "no-eos"
    _without_eos(tiny_decoder, directory)
    source = decoder_source(directory)
    refusal = source.module.cache_refusal  # the DecoderLM the source exports
    assert source.module.spec is None and refusal and "eos_token_id" in refusal
    assert source.describe()["kv_cache"] == f"none: {refusal}"
    assert not [i for i in source.inputs if i.name.startswith("past_key_values.")]
    cached = decoder_source(tiny_decoder("mixtral"))
    spec = cached.module.spec
    assert spec is not None and cached.describe()["kv_cache"] == spec.to_dict()
    # docs/generation.md's decoder inputs, for the tiny Mixtral's 2 layers of 2 kv heads of 8
    tokens, past = ("batch", "sequence"), ("batch", 2, "past_sequence", 8)
    assert [(i.name, i.dtype, i.dims) for i in cached.inputs] == [
        ("input_ids", "int64", tokens), ("attention_mask", "int64", ("batch", "total_sequence")),
        ("position_ids", "int64", tokens),
        *((past_name(layer, kind), "float32", past) for layer in range(2) for kind in ("key", "value"))]


def test_a_partial_cache_is_refused(tiny_decoder) -> None:
    """Every past_key_values input or none (a prompt): a cache with one layer's tensors left out would run that layer
    with a shorter past than the others, so it is refused with the names that are missing."""
    model = D.load_decoder(tiny_decoder("mixtral"))
    spec = model.spec
    assert spec is not None
    feed = D.decoder_feed(np.ones((1, 3), np.int64), np.ones((1, 3), np.int64), spec)
    with torch.no_grad():
        out = model(**_tensors(feed))
        past = {past_name(i, k): out[present_name(i, k)] for i in range(spec.num_layers) for k in ("key", "value")}
        step = {"input_ids": torch.ones((1, 1), dtype=torch.long),
                "attention_mask": torch.ones((1, 4), dtype=torch.long), "position_ids": torch.tensor([[3]])}
        assert model(**step, **past)[present_name(1, "key")].shape[2] == 4
        del past[past_name(1, "value")]
        with pytest.raises(TypeError, match=r"part of the key/value cache: \['past_key_values\.1\.value'\] missing"):
            model(**step, **past)


def test_a_model_with_layers_that_keep_no_cache_gets_no_spec(tiny_decoder, monkeypatch) -> None:
    model = D.load_decoder(tiny_decoder("mixtral"), cache=False)
    real = model._hf.forward

    def keyless(*args, **kwargs):  # layer 1 keeps no cache (e.g. a model that caches some layers only)
        out = real(*args, **kwargs)
        out.past_key_values.layers[1].keys = None
        return out

    monkeypatch.setattr(model._hf, "forward", keyless)
    reason = D.decoder_spec(model, tiny_decoder("mixtral"))
    assert isinstance(reason, str) and "keep no key/value cache" in reason
