"""Which activations each PiMoE layer of a whole model is calibrated on: its own inputs, the valid tokens only.

The reference is computed by hand from what the model itself feeds each layer: a forward hook on the module whose
output the block passes to its PiMoE layer (``norm2``), the feed's attention mask, the layer's routing, and the
``max`` method's definition (the first expert layer's activation scale = max |x| over the tokens routed to that
expert / 127). A check that only compares two layers' scales cannot see layer i calibrated on layer i-1's inputs;
this one can.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_whole_model import TinyEncoder, feeds

from pimoe_export.quantize import quantize_model
from pimoe_export.quantize.capture import capture_layer_inputs
from pimoe_export.quantize.int8 import read_quant_params

LAYERS = ("blocks.0.moe", "blocks.1.moe")


@pytest.fixture(scope="module")
def model():
    return TinyEncoder().eval()


def fed_to_layers(model, calibration) -> dict[str, torch.Tensor]:
    """[valid tokens, H] of what each block hands its PiMoE layer: norm2's output at the unmasked positions."""
    outputs: dict[str, list[torch.Tensor]] = {path: [] for path in LAYERS}
    handles = [block.norm2.register_forward_hook(
        lambda module, args, out, path=path: outputs[path].append(out.detach().reshape(-1, out.shape[-1])))
        for path, block in zip(LAYERS, model.blocks, strict=True)]
    try:
        with torch.no_grad():
            for feed in calibration:
                model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    finally:
        for handle in handles:
            handle.remove()
    masks = [torch.from_numpy(f["attention_mask"]).reshape(-1) != 0 for f in calibration]
    return {path: torch.cat([x[m] for x, m in zip(batches, masks, strict=True)]) for path, batches in outputs.items()}


def first_layer_scales(layer, x: torch.Tensor) -> dict[int, float]:
    """The ``max`` method by hand: expert e's first-layer scale = max |x| over the tokens routed to e / 127."""
    with torch.no_grad():
        ids = layer.router(x).ids
    scales = {}
    for e in range(layer.config.num_experts):
        rows = (ids == e).any(dim=-1)
        if rows.any():
            scales[e] = float(np.float32(float(x[rows].abs().max()) / 127.0))
    return scales


def test_capture_keeps_each_layers_own_valid_inputs(model) -> None:
    calibration = feeds(11, ((2, 9), (3, 6)))
    reference = fed_to_layers(model, calibration)
    captured = capture_layer_inputs(model, calibration)
    assert list(captured) == list(LAYERS)  # the order the layers run
    for path in LAYERS:
        assert [b.shape[0] for b in captured[path]] == [1, 1]  # one [1, tokens, H] batch per feed
        assert torch.equal(torch.cat([b[0] for b in captured[path]]), reference[path]), path
    assert not torch.equal(reference[LAYERS[0]], reference[LAYERS[1]])
    assert all(layer.track_stats for layer in (model.blocks[0].moe, model.blocks[1].moe))  # restored


def test_every_layer_is_calibrated_on_its_own_inputs(model, tmp_path) -> None:
    calibration = feeds(12, ((4, 16),) * 3)
    reference = fed_to_layers(model, calibration)
    result = quantize_model(model, tmp_path / "model.int8.onnx", calibration=calibration, method="max",
                            smooth_alpha=None)
    assert list(result.layers) == list(LAYERS)
    groups = read_quant_params(result.onnx_path).groups
    index = 0
    for path, block in zip(LAYERS, model.blocks, strict=True):
        layer = block.moe
        expected = first_layer_scales(layer, reference[path])
        params = result.layers[path]
        assert params.info["calibration_tokens"] == reference[path].shape[0]  # the valid tokens, no padding
        for _spec, expert_ids in layer.config.expert_groups():
            group = groups[index]
            index += 1
            assert group.expert_ids == list(expert_ids)
            first = group.act_scales[: len(expert_ids)]  # layer-major: layer 0's scales come first
            for e, scale in zip(expert_ids, first, strict=True):
                if e in expected:
                    assert scale == expected[e], (path, e, scale, expected[e])
        # the other layer's inputs would give other scales: the check can tell the layers apart
        other = first_layer_scales(layer, reference[LAYERS[1 - LAYERS.index(path)]])
        assert other != expected
    assert index == len(groups)


def test_padding_never_reaches_the_calibration(model, tmp_path) -> None:
    """The same valid tokens with different garbage in the padded positions calibrate to the same scales."""
    calibration = feeds(13, ((3, 12),))
    noisy = [{k: v.copy() for k, v in f.items()} for f in calibration]
    rng = np.random.default_rng(0)
    for f in noisy:
        pad = f["attention_mask"] == 0
        assert pad.any()
        f["input_ids"][pad] = rng.integers(0, 50, int(pad.sum()))
    a = quantize_model(model, tmp_path / "a.int8.onnx", calibration=calibration, method="max", smooth_alpha=None)
    b = quantize_model(model, tmp_path / "b.int8.onnx", calibration=noisy, method="max", smooth_alpha=None,
                       fp32_onnx=a.fp32_onnx)
    for path in LAYERS:
        assert a.layers[path].info["thresholds"] == b.layers[path].info["thresholds"]
        assert [g.act_scales for g in a.layers[path].groups] == [g.act_scales for g in b.layers[path].groups]


def test_calibration_data_that_overflows_a_layer_names_it(model) -> None:
    from pimoe_export.errors import PiMoEInputError
    from pimoe_export.model.factory import create_from_preset

    layer = create_from_preset("tiny", seed=0).eval()
    with pytest.raises(PiMoEInputError) as info:
        capture_layer_inputs(layer, [{"hidden_states": np.full((1, 3, 16), np.inf, np.float32)}])
    assert str(info.value) == ("the calibration data drives the PiMoE layer to NaN or Inf (values beyond the float32 "
                               "range, or an overflow upstream); scale or clean the calibration data")
    calibration = feeds(3, ((1, 4),))
    with torch.no_grad():
        model.embed.weight[calibration[0]["input_ids"][0, 0]] = float("nan")
    try:
        with pytest.raises(PiMoEInputError) as info:
            capture_layer_inputs(model, calibration)
        assert str(info.value).startswith("the calibration data drives PiMoE layer 'blocks.0.moe' to NaN or Inf")
    finally:
        model.embed.weight.data.copy_(TinyEncoder().embed.weight)


def test_quantising_another_models_export_is_refused_naming_both(model, exported_layer, tmp_path) -> None:
    from pimoe_export.errors import ArtifactError
    from pimoe_export.quantize import check_same_model

    _, layer_onnx = exported_layer("tiny", 0)
    with pytest.raises(ArtifactError) as info:
        check_same_model(model, layer_onnx)
    assert str(info.value) == (f"{layer_onnx} is not the export of this model (its PiMoE layers [''], the model's "
                               "['blocks.0.moe', 'blocks.1.moe']); export this model and quantise that graph")
    layer, _ = exported_layer("tiny", 0)
    check_same_model(layer, layer_onnx)
    from pimoe_export.model.factory import create_from_preset

    with pytest.raises(ArtifactError) as info:
        check_same_model(create_from_preset("tiny", seed=1), layer_onnx)
    assert str(info.value) == (f"{layer_onnx} was exported from different weights than this model; export this "
                               "model again (`pimoe-export export MODEL_DIR -o ...`) or omit --onnx")
    import onnx

    proto = onnx.load(str(layer_onnx))
    kept = [p for p in proto.metadata_props if p.key != "pimoe.weights_sha256"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, str(tmp_path / "nofp.onnx"))
    with pytest.raises(ArtifactError) as info:
        check_same_model(layer, tmp_path / "nofp.onnx")
    assert str(info.value) == (f"{tmp_path / 'nofp.onnx'} carries no pimoe.weights_sha256: re-export it with "
                               "`pimoe-export export`")


def test_smoothing_factors_come_from_each_layers_own_inputs(model, tmp_path) -> None:
    """SmoothQuant (smooth_alpha) written out: expert e's first-layer divisor of input channel c is
    max|x_c|^a / max|W_e[:, c]|^(1 - a), with x the tokens routed to e of what the model feeds that layer."""
    alpha = 0.4
    calibration = feeds(14, ((4, 16),) * 2)
    reference = fed_to_layers(model, calibration)
    result = quantize_model(model, tmp_path / "model.int8.onnx", calibration=calibration, method="max",
                            smooth_alpha=alpha)
    for path, block in zip(LAYERS, model.blocks, strict=True):
        layer, x = block.moe, reference[path]
        params = result.layers[path]
        assert params.info["smoothing"] == alpha
        with torch.no_grad():
            ids = layer.router(x).ids
        groups = iter(params.groups)
        checked = 0
        for _spec, expert_ids in layer.config.expert_groups():
            group = next(groups)
            for g, e in enumerate(expert_ids):
                rows = (ids == e).any(dim=-1)
                if not rows.any():
                    continue
                x_amax = np.maximum(x[rows].abs().amax(dim=0).numpy(), 1e-5)
                w_amax = np.maximum(layer.experts[e].layers[0].weight.detach().abs().amax(dim=0).numpy(), 1e-5)
                expected = np.clip(x_amax ** alpha / w_amax ** (1 - alpha), 1e-4, 1e4).astype(np.float32)
                np.testing.assert_allclose(group.layers[0].act_smooth[g], expected, rtol=1e-5, err_msg=f"{path} {e}")
                checked += 1
        assert checked >= 2, path
