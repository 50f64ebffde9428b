"""Checkpoints (bit-exact, tamper-evident), pruning, the seed examples, and every documented error."""

from __future__ import annotations

import json

import pytest
import torch

import pimoe_export
from pimoe_export.errors import ArtifactError, PiMoEConfigError, PiMoEInputError
from pimoe_export.model import (
    AdaptivePiMoE,
    EnhancedPiMoEIntegration,
    ExpertType,
    PiMoEConfig,
    PiMoESystem,
    build_model,
    create_from_preset,
    load_pretrained,
    magnitude_prune,
    structured_prune,
)


# ------------------------------------------------------------------------------------------ seed examples
def test_seed_example_basic_integration() -> None:
    from pimoe_export import ExpertType, create_pimoe_system

    input_tensor = torch.randn(2, 10, 512)
    # Create system
    pimoe = create_pimoe_system(
        hidden_size=512,
        num_experts=8,
        expert_types=[ExpertType.REASONING, ExpertType.COMPUTATION]
    )

    # Use
    output = pimoe(input_tensor)
    assert output.shape == input_tensor.shape and torch.isfinite(output).all()
    assert [e.expert_type for e in pimoe.experts[:3]] == [ExpertType.REASONING, ExpertType.COMPUTATION,
                                                          ExpertType.REASONING]


def test_seed_example_enhanced_integration() -> None:
    from pimoe_export import create_enhanced_pimoe_integration

    input_tensor = torch.randn(2, 10, 512)
    # Create with optimizations
    enhanced_pimoe = create_enhanced_pimoe_integration(
        hidden_size=512,
        num_experts=8,
        optimization_level="advanced",
        enable_quantization=True
    )

    # Use with metrics
    output, metrics = enhanced_pimoe(input_tensor, return_metrics=True)
    assert output.shape == input_tensor.shape
    for name in ("latency_ms", "throughput_tokens_per_sec", "memory_usage_mb", "expert_utilization",
                 "load_balance_score", "routing_accuracy", "total_tokens", "batch_size", "sequence_length"):
        assert name in metrics
    assert metrics["total_tokens"] == 20 and metrics["load_balance_score"] > 0


def test_seed_import_list() -> None:
    from pimoe_export import (
        EnhancedPiMoEIntegration,
        PiMoESystem,
        create_enhanced_pimoe_integration,
        create_pimoe_system,
    )

    # the seed's public names build what they say (not only import)
    system = create_pimoe_system(hidden_size=8, num_experts=4)
    assert isinstance(system, PiMoESystem) and system.hidden_size == 8 and system.num_experts == 4
    enhanced = create_enhanced_pimoe_integration(hidden_size=8, num_experts=4)
    assert isinstance(enhanced, EnhancedPiMoEIntegration)


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("preset", ["tiny", "seed-types"])
def test_save_load_is_bit_exact(tmp_path, preset: str) -> None:
    model = create_from_preset(preset, seed=3)
    x = torch.randn(2, 5, model.hidden_size)
    model(x)  # statistics travel too
    model.save_pretrained(tmp_path)
    loaded = PiMoESystem.from_pretrained(tmp_path)
    assert torch.equal(loaded(x), model(x))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.config == model.config


def test_adaptive_checkpoint_keeps_bias_temperature_and_history(tmp_path) -> None:
    model = AdaptivePiMoE(config=PiMoEConfig(hidden_size=8, num_experts=4, expert_types=("language",)),
                          adaptation_rate=0.05).eval()
    x = torch.randn(2, 16, 8)
    model(x)
    model.adapt()
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    assert isinstance(loaded, AdaptivePiMoE)
    assert loaded.history == model.history and loaded.adaptation_rate == 0.05
    assert torch.equal(loaded.router.selection_bias, model.router.selection_bias)
    assert torch.equal(loaded(x), model(x))


def test_loading_through_a_class_that_is_not_the_checkpoints_names_both(tmp_path) -> None:
    """AdaptivePiMoE.from_pretrained on a plain PiMoESystem's checkpoint is refused (the subclass would lack its
    state), naming the architecture field and both classes; the base class loads the subclass's checkpoint."""
    create_from_preset("tiny").save_pretrained(tmp_path / "plain")
    with pytest.raises(PiMoEConfigError) as info:
        AdaptivePiMoE.from_pretrained(tmp_path / "plain")
    assert info.value.field == "architecture"
    assert str(info.value) == (f"PiMoEConfig.architecture: {tmp_path / 'plain'} holds a checkpoint of PiMoESystem, "
                               "not of AdaptivePiMoE; load it with PiMoESystem.from_pretrained")
    AdaptivePiMoE(hidden_size=8, num_experts=2).save_pretrained(tmp_path / "adaptive")
    assert isinstance(PiMoESystem.from_pretrained(tmp_path / "adaptive"), AdaptivePiMoE)


def test_tampered_checkpoint_is_refused(tmp_path) -> None:
    create_from_preset("tiny").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize(("recorded", "said"), [
    (None, r"config\.json records no weights_sha256 \(the hash of model\.safetensors\), so the weights cannot be "
           r"checked; re-save the model"),
    ("", r"config\.json records no weights_sha256"),
    (12, r"config\.json records no weights_sha256"),
    ("0" * 64, r"sha256 [0-9a-f]{16}… does not match config\.json \(0000000000000000…\); the weights were modified"),
])
def test_weights_without_their_recorded_hash_are_refused(tmp_path, recorded, said) -> None:
    """The weights' sha256 in config.json is required: deleting, blanking or replacing it does not let other weights
    in, and the refusal says which of those it is."""
    create_from_preset("tiny").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    if recorded is None:
        del config["weights_sha256"]
    else:
        config["weights_sha256"] = recorded
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=said):
        load_pretrained(tmp_path)


def test_missing_and_corrupt_config(tmp_path) -> None:
    with pytest.raises(ArtifactError, match="pimoe-export create"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ArtifactError, match="expected format"):
        load_pretrained(tmp_path)


def test_config_json_round_trip() -> None:
    cfg = PiMoEConfig(hidden_size=12, num_experts=5, top_k=2, expert_types=("logical", ExpertType.REASONING),
                      capacity_factor=1.5, metadata={"note": "x"})
    assert PiMoEConfig.from_json(cfg.to_json()) == cfg


# ------------------------------------------------------------------------------------------ pruning
def test_magnitude_pruning_reaches_requested_sparsity() -> None:
    model = create_from_preset("tiny")
    report = magnitude_prune(model, 0.5, probe=torch.randn(1, 4, 16))
    for expert in model.experts:
        for layer in expert.layers:
            assert float((layer.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert report.nonzero_after < report.nonzero_before and report.output_rel_l2_change > 0


def test_structured_pruning_removes_dead_units_exactly(tmp_path) -> None:
    cfg = PiMoEConfig(hidden_size=8, num_experts=2, intermediate_size=16, top_k=2, layer_norm=False,
                      expert_types=("language",))
    model = build_model(cfg)
    with torch.no_grad():  # units 0..7 of every expert have no outgoing weight: removing them changes nothing
        for expert in model.experts:
            expert.layers[1].weight[:, :8] = 0.0
    x = torch.randn(2, 6, 8)
    before = model(x)
    report = structured_prune(model, 0.5, probe=x)
    assert [e.widths for e in model.experts] == [(8, 8, 8)] * 2
    assert model.config.expert_widths == ((8, 8, 8), (8, 8, 8))
    torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)
    assert report.params_after < report.params_before
    model.save_pretrained(tmp_path)  # pruned widths travel with the checkpoint
    assert torch.equal(load_pretrained(tmp_path)(x), model(x))


def test_structured_pruning_with_layer_norm_via_enhanced() -> None:
    enhanced = EnhancedPiMoEIntegration(16, 3, expert_types=["reasoning"], expert_config={"intermediate_size": 32})
    report = enhanced.apply_pruning(0.25, structured=True, probe=torch.randn(1, 4, 16))
    assert enhanced.pimoe.experts[0].widths == (16, 24, 12, 16)
    assert report.output_rel_l2_change is not None and enhanced.pruning_history
    enhanced.eval()(torch.randn(1, 4, 16))


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"hidden_size": 0}, "hidden_size", ">= 1"),
        ({"hidden_size": 8, "num_experts": 2000}, "num_experts", "[1, 1024]"),
        ({"hidden_size": 8, "num_experts": 4, "top_k": 5}, "top_k", "[1, 4]"),
        ({"hidden_size": 8, "num_experts": 40, "top_k": 17}, "top_k", "[1, 16]"),
        ({"hidden_size": 8, "temperature": 0.0}, "temperature", "(0.0, inf)"),
        ({"hidden_size": 8, "dropout": 1.0}, "dropout", "[0.0, 1.0)"),
        ({"hidden_size": 8, "expert_types": ["wizard"]}, "expert_types", "unknown expert type"),
        ({"hidden_size": 8, "expert_types": []}, "expert_types", "at least one"),
        ({"hidden_size": 8, "activation": "swish"}, "activation", "gelu"),
        ({"hidden_size": 8.5}, "hidden_size", "must be an int"),
        ({"hidden_size": 8, "load_balance_loss": "kl"}, "load_balance_loss", "mse"),
        ({"hidden_size": 8, "capacity_factor": -1.0}, "capacity_factor", "(0.0, inf)"),
    ],
)
def test_bad_config_names_field_and_range(fields, field, fragment) -> None:
    with pytest.raises(PiMoEConfigError) as info:
        PiMoEConfig(**fields)
    assert info.value.field == field
    assert fragment in str(info.value)


def test_unknown_seed_config_key() -> None:
    with pytest.raises(PiMoEConfigError, match="accepted keys"):
        pimoe_export.create_pimoe_system(8, router_config={"temprature": 2.0})


@pytest.mark.parametrize(
    ("make_input", "fragment"),
    [
        (lambda: torch.randn(4, 16), "rank 3"),
        (lambda: torch.randn(1, 2, 3, 16), "rank 3"),
        (lambda: torch.randn(1, 4, 15), "hidden_size=16"),
        (lambda: torch.randn(1, 4, 16, dtype=torch.float64), "dtype"),
        (lambda: torch.ones(1, 4, 16, dtype=torch.int64), "dtype"),
        (lambda: [[0.0] * 16], "torch.Tensor"),
    ],
)
def test_bad_input_errors(make_input, fragment) -> None:
    model = create_from_preset("tiny")
    with pytest.raises(PiMoEInputError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        model(make_input())


def test_bad_mask_shape() -> None:
    model = create_from_preset("tiny")
    with pytest.raises(PiMoEInputError, match="attention_mask must have shape"):
        model(torch.randn(2, 4, 16), attention_mask=torch.ones(2, 5))


def test_an_unknown_architecture_is_named_with_the_known_ones(tmp_path) -> None:
    create_from_preset("tiny").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architecture"] = "GPTNeoMoE"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError) as info:
        load_pretrained(tmp_path)
    assert str(info.value) == (f"{tmp_path}: unknown architecture 'GPTNeoMoE'; known: "
                               "['AdaptivePiMoE', 'MoEBlock', 'PiMoESystem']")


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_weights_of_another_architecture_are_refused_naming_the_tensors(tmp_path, change) -> None:
    """A checkpoint whose weights file holds a tensor the architecture does not have, or lacks one it has, is
    refused naming it, even when config.json records that file's hash (re-hashed by whoever edited it)."""
    from safetensors.torch import load_file, save_file

    from pimoe_export._files import sha256_file

    create_from_preset("tiny").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    if change == "extra":
        state["experts.99.weight"] = torch.zeros(2, 2)
    else:
        state.pop(sorted(state)[0])
    save_file(state, str(weights))
    config = json.loads((tmp_path / "config.json").read_text())
    config["weights_sha256"] = sha256_file(weights)
    (tmp_path / "config.json").write_text(json.dumps(config))
    fragment = "unexpected ['experts.99.weight']" if change == "extra" else "missing ['"
    with pytest.raises(ArtifactError, match=r"does not match the architecture in config\.json") as info:
        load_pretrained(tmp_path)
    assert fragment in str(info.value)
