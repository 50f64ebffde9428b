"""Small helpers of pimoe_export.interface with known answers."""

from __future__ import annotations

from pimoe_export.interface import element_count, sm_names, tolerances_for, version_tuple


# ------------------------------------------------------------------------------------------ interface helpers
def test_interface_small_helpers() -> None:
    assert version_tuple("1.21.0.dev20250101") == (1, 21, 0)
    assert version_tuple("2.13.0+cpu") == (2, 13, 0)
    assert version_tuple("1.x.3") == (1,)
    assert version_tuple("10.4.1.2") == (10, 4, 1)
    assert element_count((3, 5, 7)) == 105 and element_count(()) == 1
    assert sm_names(("80", "90")) == ["sm_80", "sm_90"]
    assert tolerances_for("w8a8_dynamic") is tolerances_for("w8a8")
    assert tolerances_for("no-such-precision") is tolerances_for("fp32")
    assert tolerances_for("fp16").error_quantile == 0.98


# ------------------------------------------------------------------------------------------ decoder descriptions
def _spec(**overrides):
    from pimoe_export.interface import DecoderSpec

    fields = {"model_type": "deepseek_v3", "num_layers": 2, "num_attention_heads": 4, "num_kv_heads": 4,
              "head_dim": 16, "hidden_size": 32, "vocab_size": 96, "context_length": 256, "eos_token_ids": (2,),
              "pad_token_id": 0, "bos_token_id": 1}
    return DecoderSpec(**{**fields, **overrides})


def test_a_value_head_dim_apart_from_the_keys_shapes_every_value_cache() -> None:
    """DecoderSpec.value_head_dim (MLA: values of another head dim than the keys): the decoder I/O, the TensorRT
    profiles and the description's JSON carry it; left out, it is head_dim and the JSON reads as before."""
    import json

    import pytest

    from pimoe_export.errors import ArtifactError
    from pimoe_export.interface import (
        DecoderSpec,
        decoder_interface,
        decoder_profiles,
    )

    plain, mla = _spec(), _spec(value_head_dim=12)
    assert plain.value_head_dim == 16 and "value_head_dim" not in plain.to_dict()
    assert DecoderSpec.from_dict(plain.to_dict()) == plain == _spec(value_head_dim=16)
    assert mla.to_dict()["value_head_dim"] == 12 and DecoderSpec.from_dict(json.loads(json.dumps(mla.to_dict()))) \
        == mla != plain
    assert mla.cache_head_dims == (16, 12, 16, 12) and mla.kv_head_dim("value") == 12
    dims = {t.name: t.dims for t in (*decoder_interface(mla).inputs, *decoder_interface(mla).outputs)}
    assert dims["past_key_values.1.key"] == ("batch", 4, "past_sequence", 16)
    assert dims["past_key_values.1.value"] == ("batch", 4, "past_sequence", 12)
    assert dims["present.0.value"] == ("batch", 4, "total_sequence", 12)
    prefill, decode = decoder_profiles(mla, max_batch=8, max_prompt=64)
    assert prefill.shapes["past_key_values.0.value"] == ((1, 4, 0, 12), (1, 4, 0, 12), (8, 4, 0, 12))
    assert decode.shapes["past_key_values.0.key"][2] == (8, 4, 255, 16)
    assert decode.shapes["past_key_values.1.value"][2] == (8, 4, 255, 12)
    # a graph whose value cache has the keys' head dim is not this decoder's
    io = decoder_interface(plain)
    assert mla.interface_problems(io) == [f"{n} is float32 ['batch', 4, '{axis}', 16], expected float32 ['batch', 4, "
                                          f"'{axis}', 12]" for n, axis in (("past_key_values.0.value", "past_sequence"),
                                                                           ("past_key_values.1.value", "past_sequence"),
                                                                           ("present.0.value", "total_sequence"),
                                                                           ("present.1.value", "total_sequence"))]
    assert plain.interface_problems(io) == [] and mla.interface_problems(decoder_interface(mla)) == []
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ArtifactError, match="value_head_dim"):
            _spec(value_head_dim=bad)
    with pytest.raises(ArtifactError, match="expected the fields"):
        DecoderSpec.from_dict({**mla.to_dict(), "value_dim": 12})
    with pytest.raises(ArtifactError, match="value_head_dim is null"):  # never written: a tampered manifest
        DecoderSpec.from_dict({**plain.to_dict(), "value_head_dim": None})


def test_genai_config_is_refused_for_a_decoder_it_cannot_describe() -> None:
    import pytest

    from pimoe_export.build.clients import genai_config, genai_refusal
    from pimoe_export.errors import ArtifactError

    config = genai_config(_spec(), "model.onnx", "libpimoe_ort.so")["model"]["decoder"]
    assert genai_refusal(_spec()) is None and config["head_size"] == 16
    reason = genai_refusal(_spec(value_head_dim=12))
    assert reason is not None and "one head_size" in reason and "keys of head dim 16 and values of 12" in reason
    with pytest.raises(ArtifactError, match="one head_size"):
        genai_config(_spec(value_head_dim=12), "model.onnx", "libpimoe_ort.so")


def test_decoder_profiles_give_every_input_its_shape_at_each_bound() -> None:
    """Each input of the decoder's interface has a (min, opt, max) shape in both profiles, of the input's rank and
    with its fixed dims; position_ids have the shape of input_ids (one position per token) and the mask covers the
    past and the new tokens: prefill 1..max_prompt tokens on an empty past, decode one token on 1..context-1."""
    from pimoe_export.interface import (
        DECODER_POSITIONS_INPUT,
        MODEL_IDS_INPUT,
        MODEL_MASK_INPUT,
        decoder_interface,
        decoder_profiles,
    )

    spec = _spec(num_kv_heads=2, context_length=300)
    prefill, decode = decoder_profiles(spec, max_batch=6, max_prompt=200)
    inputs = decoder_interface(spec).inputs
    for profile in (prefill, decode):
        assert set(profile.shapes) == {t.name for t in inputs}
        for tensor in inputs:
            bounds = profile.shapes[tensor.name]
            assert len(bounds) == 3
            for shape in bounds:
                assert len(shape) == len(tensor.dims), tensor.name
                assert all(s == d for s, d in zip(shape, tensor.dims, strict=True) if isinstance(d, int))
        ids, positions, mask = (profile.shapes[n] for n in (MODEL_IDS_INPUT, DECODER_POSITIONS_INPUT, MODEL_MASK_INPUT))
        assert positions == ids
        past = profile.shapes["past_key_values.0.key"]
        assert [m[1] for m in mask] == [i[1] + p[2] for i, p in zip(ids, past, strict=True)]
        assert [i[0] for i in ids] == [1, 1, 6]
    assert prefill.shapes[MODEL_IDS_INPUT] == ((1, 1), (1, 128), (6, 200))
    assert decode.shapes[MODEL_IDS_INPUT] == ((1, 1), (1, 1), (6, 1))
    assert [p[2] for p in decode.shapes["past_key_values.1.value"]] == [1, 299, 299]
    assert [p[2] for p in prefill.shapes["past_key_values.1.value"]] == [0, 0, 0]


def test_the_decoder_interface_has_the_dtypes_decoder_clients_feed() -> None:
    """optimum's ORTModelForCausalLM and onnxruntime-genai feed input_ids, attention_mask and position_ids as int64;
    the caches and the logits are the graph's float type. The interface reads back from its manifest form, which
    accepts only real dtypes."""
    from pimoe_export.interface import GraphInterface, decoder_interface

    spec = _spec(num_layers=1)
    for cache in ("float32", "float16"):
        io = decoder_interface(spec, cache)
        assert [(t.name, t.dtype) for t in io.inputs] == [
            ("input_ids", "int64"), ("attention_mask", "int64"), ("position_ids", "int64"),
            ("past_key_values.0.key", cache), ("past_key_values.0.value", cache)]
        assert [(t.name, t.dtype) for t in io.outputs] == [
            ("logits", cache), ("present.0.key", cache), ("present.0.value", cache)]
        assert GraphInterface.from_dict(io.to_dict()) == io
