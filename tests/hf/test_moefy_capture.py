"""Where MoEfication takes the activations it clusters, fits the routers on and distils against.

The reference is the Hugging Face model itself: a BERT layer feeds its FFN (``intermediate``) the output of its
``attention`` block, so a forward hook on ``layer.attention`` of an untouched copy records exactly what each layer's
FFN sees (valid positions of the attention mask). A capture one module off (the layer's input, the FFN's output,
another layer's) barely moves the end-to-end error of a random tiny BERT; compared here directly, it cannot hide.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from pimoe_export.hf import moefy as moefy_module  # noqa: E402
from pimoe_export.hf.moefy import (  # noqa: E402
    MoEFeedForward,
    MoefySettings,
    _ffn_inputs,
    _mean_pooled,
    balanced_clusters,
    encoder_layers,
    moefy,
)


@pytest.fixture(scope="module")
def dense(tiny_bert):
    return transformers.AutoModel.from_pretrained(str(tiny_bert), local_files_only=True).float().eval()


def feeds_with_padding(vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two batches with right padding (different lengths per row) and one without an attention mask."""
    rng = np.random.default_rng(seed)
    out = []
    for b, s in ((3, 9), (2, 14)):
        mask = np.ones((b, s), np.int64)
        for row in range(b):
            mask[row, rng.integers(2, s + 1):] = 0
        out.append({"input_ids": torch.from_numpy(rng.integers(5, vocab, (b, s))),
                    "attention_mask": torch.from_numpy(mask)})
    out.append({"input_ids": torch.from_numpy(rng.integers(5, vocab, (1, 6)))})
    return out


def attention_outputs(model, feeds) -> dict[str, torch.Tensor]:
    """[valid tokens, H] of what every encoder layer passes to its FFN: its attention block's output."""
    captured: dict[str, list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(model.encoder.layer):
        def hook(module, args, output, path=f"encoder.layer.{i}"):
            captured.setdefault(path, []).append(output[0].detach().reshape(-1, output[0].shape[-1]))
        handles.append(layer.attention.register_forward_hook(hook))
    valid = []
    try:
        with torch.no_grad():
            for feed in feeds:
                model(**feed)
                mask = feed.get("attention_mask", torch.ones_like(feed["input_ids"]))
                valid.append(mask.reshape(-1) != 0)
    finally:
        for handle in handles:
            handle.remove()
    return {path: torch.cat([b[m] for b, m in zip(batches, valid, strict=True)]) for path, batches in captured.items()}


def test_the_ffn_inputs_are_what_each_layer_feeds_its_ffn(dense) -> None:
    feeds = feeds_with_padding(dense.config.vocab_size)
    reference = attention_outputs(dense, feeds)
    assert sorted(reference) == ["encoder.layer.0", "encoder.layer.1"]
    valid = sum(int(f.get("attention_mask", torch.ones_like(f["input_ids"])).sum()) for f in feeds)
    got = _ffn_inputs(dense, encoder_layers(dense), feeds, max_tokens=10_000)
    assert sorted(got) == sorted(reference)
    for path in reference:
        assert got[path].shape == (valid, dense.config.hidden_size)
        assert torch.equal(got[path], reference[path]), path
    assert not torch.equal(got["encoder.layer.0"], got["encoder.layer.1"])
    # the token limit keeps the first tokens, in the order the feeds came
    cut = _ffn_inputs(dense, encoder_layers(dense), feeds, max_tokens=valid - 3)
    for path in reference:
        assert torch.equal(cut[path], reference[path][: valid - 3])
    assert not any(module._forward_pre_hooks for module in dense.modules())  # the hooks are gone


def test_moefy_clusters_and_fits_each_layer_on_its_own_ffn_inputs(dense) -> None:
    """Every expert of layer i keeps exactly the FFN units that balanced k-means groups on layer i's own FFN
    activations (its attention outputs through W1 and the activation), in the original's weights."""
    feeds = feeds_with_padding(dense.config.vocab_size, 1)
    settings = MoefySettings(experts=4, top_k=2, router_epochs=2, seed=3)
    original = copy.deepcopy(dense)
    reference = attention_outputs(original, feeds)
    model, layers = moefy(copy.deepcopy(dense), feeds, settings)
    for i, layer in enumerate(original.encoder.layer):
        path = f"encoder.layer.{i}"
        dense1, dense2 = layer.intermediate.dense, layer.output.dense
        with torch.no_grad():
            act = layer.intermediate.intermediate_act_fn(dense1(reference[path]))
        labels = balanced_clusters(act.T.numpy().astype(np.float64), settings.experts, seed=settings.seed)
        moe = layers[path]
        assert isinstance(model.encoder.layer[i].intermediate, MoEFeedForward)
        assert model.encoder.layer[i].intermediate.moe is moe
        for e in range(settings.experts):
            units = torch.from_numpy(np.flatnonzero(labels == e))
            first, second = moe.experts[e].layers
            assert torch.equal(first.weight, dense1.weight[units]), (path, e)
            assert torch.equal(first.bias, dense1.bias[units]), (path, e)
            assert torch.equal(second.weight, dense2.weight[:, units] * settings.top_k), (path, e)
            assert torch.equal(second.bias, dense2.bias), (path, e)
        assert isinstance(model.encoder.layer[i].output.dense, torch.nn.Identity)


def test_the_router_is_fitted_on_the_layers_inputs(dense, monkeypatch) -> None:
    """_train_router receives the layer's own FFN inputs and targets computed from them."""
    feeds = feeds_with_padding(dense.config.vocab_size, 2)
    reference = attention_outputs(copy.deepcopy(dense), feeds)
    seen = []
    real = moefy_module._train_router

    def spy(moe, x, target, settings):
        seen.append((x.clone(), target.clone()))
        return real(moe, x, target, settings)
    monkeypatch.setattr(moefy_module, "_train_router", spy)
    moefy(copy.deepcopy(dense), feeds, MoefySettings(experts=4, top_k=2, router_epochs=1))
    assert len(seen) == 2
    for (x, target), path in zip(seen, ("encoder.layer.0", "encoder.layer.1"), strict=True):
        assert torch.equal(x, reference[path])
        assert target.shape == (x.shape[0], 4) and torch.allclose(target.sum(-1), torch.ones(x.shape[0]))


def test_distillation_targets_are_the_original_model(dense, monkeypatch) -> None:
    """With finetune epochs, the teacher is the dense model as it was before any layer was converted."""
    feeds = feeds_with_padding(dense.config.vocab_size, 3)
    seen = {}

    def spy(model, teacher, feeds_, settings):
        seen.update(model=model, teacher=teacher, feeds=feeds_, settings=settings)
        return []
    monkeypatch.setattr(moefy_module, "distil", spy)
    settings = MoefySettings(experts=4, top_k=2, router_epochs=1, finetune_epochs=1)
    model, _ = moefy(copy.deepcopy(dense), feeds, settings)
    assert seen["model"] is model and seen["feeds"] is feeds and seen["settings"] == settings
    teacher = seen["teacher"]
    assert not any(isinstance(m, MoEFeedForward) for m in teacher.modules())
    test = feeds_with_padding(dense.config.vocab_size, 4)[0]
    with torch.no_grad():
        assert torch.equal(teacher(**test).last_hidden_state, dense(**test).last_hidden_state)
    seen.clear()
    moefy(copy.deepcopy(dense), feeds, MoefySettings(experts=4, top_k=2, router_epochs=1))
    assert seen == {}  # no epochs: no distillation


def test_mean_pooling_counts_only_valid_tokens() -> None:
    states = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    pooled = _mean_pooled(states, mask)
    assert torch.equal(pooled[0], (states[0, 0] + states[0, 1]) / 2)
    assert torch.equal(pooled[1], torch.zeros(2))  # no valid token: zero, not NaN


def test_balanced_clusters_are_balanced_and_deterministic() -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 6)) * 5
    features = np.concatenate([c + 0.01 * rng.standard_normal((8, 6)) for c in centres])
    labels = balanced_clusters(features, 4, seed=1)
    assert np.bincount(labels, minlength=4).tolist() == [8, 8, 8, 8]
    for block in range(4):  # well-separated groups of 8 end up together
        assert len(set(labels[block * 8:(block + 1) * 8].tolist())) == 1
    assert np.array_equal(labels, balanced_clusters(features, 4, seed=1))


def test_balanced_clusters_group_units_by_the_direction_of_their_activations() -> None:
    """Two units that fire on the same inputs in proportion belong to one expert whatever their scale: rows of one
    direction at magnitudes 0.01 to 100 cluster together, apart from the other direction's."""
    rng = np.random.default_rng(2)
    directions = rng.standard_normal((2, 6))
    scales = np.array([0.01, 100.0, 0.1, 10.0, 1.0, 50.0])
    features = np.concatenate([d * scales[:, None] for d in directions])  # rows 0-5 one direction, 6-11 the other
    for seed in range(4):
        labels = balanced_clusters(features, 2, seed=seed)
        assert len(set(labels[:6].tolist())) == 1 and len(set(labels[6:].tolist())) == 1 and labels[0] != labels[6]
