"""Properties of the PyTorch reference that the forward pass of an eval-mode model does not show: the fields and
messages of its configuration errors, the dtypes of its accumulators and outputs, what its checkpoints carry, and
its training-mode behaviour. Each one was a surviving mutant of the model package (docs/mutation.md)."""

from __future__ import annotations

import pytest
import torch

from pimoe_export.errors import PiMoEConfigError
from pimoe_export.model import functional
from pimoe_export.model.adaptive import AdaptivePiMoE
from pimoe_export.model.experts import PiMoEExpert
from pimoe_export.model.factory import PRESETS, preset_config
from pimoe_export.model.pruning import magnitude_prune
from pimoe_export.model.router import TokenLevelRouter


@pytest.mark.parametrize("rate", [0.0, 1.5, -0.1])
def test_adaptation_rate_outside_0_1_names_its_field(rate) -> None:
    with pytest.raises(PiMoEConfigError) as info:
        AdaptivePiMoE(hidden_size=8, num_experts=2, adaptation_rate=rate)
    assert info.value.field == "adaptation_rate"
    assert str(info.value) == f"PiMoEConfig.adaptation_rate: must be in (0, 1], got {rate}"
    AdaptivePiMoE(hidden_size=8, num_experts=2, adaptation_rate=1.0)  # the closed end is allowed


def test_adaptive_window_counters_are_exact() -> None:
    """The window's confidence sum is float64 and its counters int64: summed over many tokens, a float32 sum of
    probabilities would round (2^24 + 1 is not a float32)."""
    model = AdaptivePiMoE(hidden_size=8, num_experts=2)
    assert model.window_confidence.dtype == torch.float64
    assert model.window_counts.dtype == torch.int64 and model.window_tokens.dtype == torch.int64
    model.window_confidence += 2.0**24
    model.window_confidence += 1.0
    assert float(model.window_confidence) == 2.0**24 + 1


def test_the_adaptive_model_honours_the_attention_mask() -> None:
    """Padded tokens (mask 0) get zeros and stay out of the adaptation window: the real tokens' outputs are those
    of the same model run on the real tokens alone."""
    torch.manual_seed(3)
    model = AdaptivePiMoE(hidden_size=8, num_experts=4).eval()
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0]])
    with torch.no_grad():
        out = model(x, mask)
        alone = model(x[mask.bool()].reshape(1, -1, 8))
    assert torch.equal(out[~mask.bool()], torch.zeros(4, 8))
    torch.testing.assert_close(out[mask.bool()], alone.reshape(-1, 8), rtol=1e-6, atol=1e-6)
    assert int(model.window_tokens) == 2 * int(mask.sum())  # both calls saw the 6 real tokens only


def test_an_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(PiMoEConfigError) as info:
        preset_config("huge")
    assert info.value.field == "preset"
    assert str(info.value) == f"PiMoEConfig.preset: unknown preset 'huge'; available: {sorted(PRESETS)}"
    assert "tiny" in str(info.value)


@pytest.mark.parametrize("amount", [1.0, -0.5, "0.5", True])
def test_a_pruning_amount_outside_0_1_is_named_in_the_error(amount) -> None:
    model = AdaptivePiMoE(hidden_size=8, num_experts=2)
    with pytest.raises(PiMoEConfigError) as info:
        magnitude_prune(model, amount)
    assert info.value.field == "pruning_amount"
    assert str(info.value) == f"PiMoEConfig.pruning_amount: must be a number in [0, 1), got {amount!r}"


def test_the_router_defaults_and_its_checkpoint_entries() -> None:
    """z_loss_weight defaults to 1e-3 (ST-MoE's value); the per-expert type index is derived from the config and
    is not written to checkpoints (older checkpoints have no such entry and must keep loading strictly)."""
    router = TokenLevelRouter(hidden_size=8, num_experts=6, expert_types=["computation", "logical"])
    assert router.config.z_loss_weight == 1e-3
    assert router.expert_type_index.tolist() == [0, 1, 0, 1, 0, 1]
    state = router.state_dict()
    assert "expert_type_index" not in state
    assert {"temperature", "load_balance_weight", "selection_bias"} <= set(state)
    TokenLevelRouter(hidden_size=8, num_experts=6, expert_types=["computation", "logical"]).load_state_dict(state)


def test_an_expert_applies_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    expert = PiMoEExpert(16, "computation", intermediate_size=32, dropout=0.5)
    x = torch.randn(64, 16)
    expert.eval()
    y_eval = expert(x)
    assert torch.equal(y_eval, expert(x))
    expert.train()
    y_train = expert(x)
    assert not torch.allclose(y_train, y_eval)
    assert not torch.equal(y_train, expert(x))  # a new dropout mask each call


def test_expert_mlp_returns_the_input_dtype() -> None:
    """fp16 rows are computed in fp32 and the result is returned as fp16 (the contract: output dtype = x_sorted's)."""
    x = torch.randn(5, 4).to(torch.float16)
    w = [torch.randn(1, 3, 4).to(torch.float16)]
    b = [torch.zeros(1, 3)]
    offsets = torch.tensor([0, 5], dtype=torch.int32)
    y = functional.expert_mlp(x, offsets, [0], w, b, None, None, "gelu", 1e-5)
    assert y.dtype == torch.float16 and y.shape == (5, 3)
    want = (x.float() @ w[0][0].float().T).to(torch.float16)
    torch.testing.assert_close(y, want, rtol=0, atol=0)


@pytest.mark.parametrize(("low", "high"), [(0.0, 1.0), (-0.5, 1.0), (2.0, 1.0)])
def test_a_temperature_band_outside_0_lo_hi_names_min_temperature(low, high) -> None:
    with pytest.raises(PiMoEConfigError) as info:
        AdaptivePiMoE(hidden_size=8, num_experts=2, min_temperature=low, max_temperature=high)
    assert info.value.field == "min_temperature"
    assert str(info.value) == "PiMoEConfig.min_temperature: must satisfy 0 < min_temperature <= max_temperature"
    assert AdaptivePiMoE(hidden_size=8, num_experts=2, min_temperature=1.0, max_temperature=1.0).min_temperature == 1.0


def test_expert_rows_use_the_layer_norm_epsilon_they_are_given() -> None:
    # Linear -> LayerNorm(eps) -> tanh -> Linear written out in float64; an eps far from torch's 1e-5 default
    # changes the normalised values visibly, so the result pins which epsilon the LayerNorm used
    gen = torch.Generator().manual_seed(3)
    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = rand(5, 6) * 0.1
    w0, w1, b0, b1 = rand(4, 6), rand(6, 4), rand(4), rand(6)
    gamma, beta = rand(4).abs() + 0.5, rand(4)
    for eps in (0.25, 1e-5):
        h = x @ w0.T + b0
        mean = h.mean(dim=-1, keepdim=True)
        var = ((h - mean) ** 2).mean(dim=-1, keepdim=True)
        expected = torch.tanh((h - mean) / torch.sqrt(var + eps) * gamma + beta) @ w1.T + b1
        got = functional.mlp_rows(x, [w0, w1], [b0, b1], [gamma], [beta], "tanh", eps)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
