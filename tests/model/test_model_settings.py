"""Settings of the PyTorch reference that travel further than the forward pass: the seed-style constructor
arguments, the router's fp32 math on fp16 inputs, the routing statistics' exact counters, and the deployment
settings an EnhancedPiMoEIntegration records for the pipeline (which reads them back from the checkpoint)."""

from __future__ import annotations

import json

import pytest
import torch

from pimoe_export.errors import PiMoEConfigError
from pimoe_export.model import PiMoESystem
from pimoe_export.model.config import ExpertType, PiMoEConfig
from pimoe_export.model.enhanced import DeploymentSettings, EnhancedPiMoEIntegration


def test_seed_style_arguments_reach_the_config() -> None:
    model = PiMoESystem(hidden_size=8, num_experts=3, expert_types=["computation", "logical"],
                        router_config={"top_k": 2, "temperature": 2.0}, expert_config={"intermediate_size": 12})
    c = model.config
    assert (c.hidden_size, c.num_experts, c.top_k, c.temperature, c.intermediate_size) == (8, 3, 2, 2.0, 12)
    assert c.expert_types == (ExpertType.COMPUTATION, ExpertType.LOGICAL)
    assert [e.widths for e in model.experts] == [(8, 24, 12, 8), (8, 12, 8), (8, 24, 12, 8)]
    with pytest.raises(PiMoEConfigError, match="hidden_size: is required"):
        PiMoESystem()


def test_an_unknown_expert_type_lists_the_ones_there_are() -> None:
    with pytest.raises(PiMoEConfigError) as info:
        PiMoEConfig(hidden_size=8, expert_types=["wizard"])
    allowed = ", ".join(t.value for t in ExpertType)
    assert str(info.value) == f"PiMoEConfig.expert_types: unknown expert type 'wizard'; allowed: {allowed}"
    assert "reasoning" in allowed and "computation" in allowed
    assert PiMoEConfig(hidden_size=8, expert_types=["REASONING"]).expert_types == (ExpertType.REASONING,)


@pytest.mark.parametrize("data", [[1, 2], "hidden_size=8", 8, None])
def test_a_config_that_is_not_an_object_is_refused_at_the_root(data) -> None:
    with pytest.raises(PiMoEConfigError) as info:
        PiMoEConfig.from_dict(data)
    assert info.value.field == "<root>"
    assert str(info.value) == f"PiMoEConfig.<root>: expected a JSON object, got {type(data).__name__}"


def test_config_json_round_trip_and_its_refusals() -> None:
    config = PiMoEConfig(hidden_size=8, num_experts=4, top_k=2, metadata={"a": [1, 2]})
    assert PiMoEConfig.from_json(config.to_json()) == config
    # canonical text (sorted keys at every level, 2-space indent): the config embedded in exported graphs and
    # written next to checkpoints is the same bytes for equal configs, however the mapping was built
    assert config.to_json() == json.dumps(json.loads(config.to_json()), indent=2, sort_keys=True)
    assert list(json.loads(config.to_json())) == sorted(json.loads(config.to_json()))
    reordered = PiMoEConfig.from_dict(dict(reversed(list(config.to_dict().items()))))
    assert reordered.to_json() == config.to_json()
    with pytest.raises(PiMoEConfigError, match=r"<root>: config is not valid JSON"):
        PiMoEConfig.from_json("{")
    with pytest.raises(PiMoEConfigError) as info:
        PiMoEConfig.from_dict({"hidden_size": 8, "top_kk": 2, "zeta": 1})
    assert info.value.field == "top_kk" and "unknown field(s) ['top_kk', 'zeta']" in str(info.value)
    with pytest.raises(PiMoEConfigError, match="hidden_size: is required"):
        PiMoEConfig.from_dict({"num_experts": 4})


def test_router_logits_are_fp32_for_fp16_inputs() -> None:
    """docs/precision.md: the router's math is fp32 whatever the input dtype."""
    model = PiMoESystem(config=PiMoEConfig(hidden_size=8, num_experts=4, top_k=2, expert_types=("language",),
                                           temperature=3.0)).eval()
    x = torch.randn(5, 8)
    half = model.half()
    logits = half.router.compute_logits(x.half())
    assert logits.dtype == torch.float32
    with torch.no_grad():
        raw = half.router.router_network(x.half()).float() / 3.0
        gate = torch.sigmoid(half.router.gate_network(x.half()).float())
    torch.testing.assert_close(logits, raw * gate, rtol=0, atol=0)


def test_the_routing_statistics_count_exactly_in_int64(tmp_path) -> None:
    model = PiMoESystem(config=PiMoEConfig(hidden_size=8, num_experts=4, top_k=2, expert_types=("language",)))
    model.eval()
    assert model.total_tokens.dtype == torch.int64 and model.expert_usage_count.dtype == torch.int64
    assert model.routed_prob_mass.dtype == torch.float64
    model.total_tokens += 2**24  # float32 could no longer add 1 to this
    with torch.no_grad():
        model(torch.randn(1, 3, 8))
    assert int(model.total_tokens) == 2**24 + 3
    assert int(model.expert_usage_count.sum()) == 3 * 2
    model.save_pretrained(tmp_path)
    again = PiMoESystem.from_pretrained(tmp_path)
    assert again.total_tokens.dtype == torch.int64


@pytest.mark.parametrize("monitoring", [True, False])
def test_monitoring_turns_the_routing_statistics_on_and_off(monitoring) -> None:
    enhanced = EnhancedPiMoEIntegration(8, 4, expert_types=["language"], enable_monitoring=monitoring).eval()
    assert enhanced.pimoe.track_stats is monitoring
    enhanced(torch.randn(2, 3, 8))
    assert int(enhanced.pimoe.total_tokens) == (6 if monitoring else 0)


def test_the_deployment_settings_travel_with_the_checkpoint(tmp_path) -> None:
    enhanced = EnhancedPiMoEIntegration(8, 4, expert_types=["language"], optimization_level="maximum",
                                        enable_quantization=True, enable_pruning=True, pruning_amount=0.3,
                                        pruning_structured=False)
    recorded = enhanced.config.metadata["deployment"]
    assert recorded == {"level": "maximum", "inference_mode": True, "export_precision": "int8",
                        "calibration_method": "entropy", "builder_optimization_level": 5,
                        "enable_quantization": True, "enable_pruning": True, "pruning_amount": 0.3,
                        "pruning_structured": False}
    assert enhanced.pimoe.router.config is enhanced.pimoe.config
    enhanced.save_pretrained(tmp_path)
    settings = DeploymentSettings.of(PiMoESystem.from_pretrained(tmp_path).config)
    assert settings == DeploymentSettings(export_precision="int8", calibration_method="entropy",
                                          builder_optimization_level=5, enable_pruning=True, pruning_amount=0.3,
                                          pruning_structured=False, recorded=True)
    again = EnhancedPiMoEIntegration.from_pretrained(tmp_path)
    assert (again.settings.level, again.enable_quantization, again.enable_pruning, again.pruning_amount,
            again.pruning_structured) == ("maximum", True, True, 0.3, False)


def test_deployment_settings_of_a_checkpoint_that_recorded_none_or_bad_ones() -> None:
    plain = PiMoEConfig(hidden_size=8)
    assert DeploymentSettings.of(plain) == DeploymentSettings() and not DeploymentSettings.of(plain).recorded
    some = plain.replace(metadata={"deployment": {"pruning_amount": 1}})
    settings = DeploymentSettings.of(some)
    assert settings.recorded and settings.pruning_amount == 1.0 and isinstance(settings.pruning_amount, float)
    assert settings.export_precision == "fp32" and settings.calibration_method == "entropy"
    for name, bad in (("enable_pruning", 1), ("pruning_amount", "0.3"), ("export_precision", 16),
                      ("builder_optimization_level", 2.0)):
        with pytest.raises(PiMoEConfigError, match=rf"deployment\.{name} must be "):
            DeploymentSettings.of(plain.replace(metadata={"deployment": {name: bad}}))
