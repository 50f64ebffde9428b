"""Tiny random Hugging Face MoE decoders, one per family, built from a transformers config (no download) and saved
as a model directory (config.json + safetensors), as a user's checkpoint would be: the fixtures of the decoder tests.

Every model has 2 layers, H 32, 4 to 8 experts; where a family keeps dense layers (DeepSeek's first_k_dense_replace,
Qwen2-MoE's mlp_only_layers, Llama 4's interleave step) one of the two is dense. Weights are Hugging Face's own
initialisation with initializer_range 0.1 (routers whose logits are well apart, so fp32 rounding flips no choice)
and a seeded e_score_correction_bias for DeepSeek-V3. Every config names the special tokens (pad 0, BOS 1, EOS 2), as
real checkpoints do: a decoder unit records them (generation ends a row at EOS). tests/decoders.py builds the
generation tests' models from these configs (:func:`tiny_config` with overrides).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COMMON = {"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 256, "initializer_range": 0.1}
SPECIAL_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

#: family -> (transformers config class name, its arguments)
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", {"intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "dbrx": ("DbrxConfig", {"d_model": 32, "n_heads": 4, "n_layers": 2, "max_seq_len": 256, "vocab_size": 96,
                            "initializer_range": 0.1, **SPECIAL_TOKENS,
                            "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0},
                            "ffn_config": {"ffn_hidden_size": 24, "moe_num_experts": 4, "moe_top_k": 2}}),
    "qwen2_moe": ("Qwen2MoeConfig", {"intermediate_size": 40, "moe_intermediate_size": 24,
                                     "shared_expert_intermediate_size": 40, "num_experts": 8,
                                     "num_experts_per_tok": 2, "mlp_only_layers": [0]}),
    "qwen3_moe": ("Qwen3MoeConfig", {"moe_intermediate_size": 24, "num_experts": 8, "num_experts_per_tok": 2,
                                     "head_dim": 8, "norm_topk_prob": True}),
    "olmoe": ("OlmoeConfig", {"intermediate_size": 24, "num_experts": 8, "num_experts_per_tok": 2}),
    "deepseek_v2": ("DeepseekV2Config", {"intermediate_size": 48, "moe_intermediate_size": 24,
                                         "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
                                         "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": None,
                                         "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
                                         "num_key_value_heads": 4, "topk_method": "group_limited_greedy",
                                         "n_group": 4, "topk_group": 2, "routed_scaling_factor": 1.5}),
    "deepseek_v3": ("DeepseekV3Config", {"intermediate_size": 48, "moe_intermediate_size": 24,
                                         "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
                                         "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1,
                                         "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8,
                                         "qk_nope_head_dim": 8, "v_head_dim": 8, "num_key_value_heads": 4,
                                         "routed_scaling_factor": 2.5}),
    "gpt_oss": ("GptOssConfig", {"intermediate_size": 24, "num_local_experts": 4, "num_experts_per_tok": 2,
                                 "head_dim": 8, "sliding_window": 4,
                                 "rope_scaling": {"rope_type": "yarn", "factor": 2.0, "beta_fast": 32.0,
                                                  "beta_slow": 1.0, "truncate": False,
                                                  "original_max_position_embeddings": 128}}),
    "granitemoe": ("GraniteMoeConfig", {"intermediate_size": 24, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "granitemoeshared": ("GraniteMoeSharedConfig", {"intermediate_size": 24, "num_local_experts": 4,
                                                    "num_experts_per_tok": 2, "shared_intermediate_size": 40}),
    "llama4_text": ("Llama4TextConfig", {"intermediate_size": 24, "intermediate_size_mlp": 48,
                                         "num_local_experts": 4, "num_experts_per_tok": 1, "head_dim": 8,
                                         "interleave_moe_layer_step": 2}),
}


def tiny_config(family: str, **overrides: Any) -> Any:
    """The family's tiny transformers config (``overrides``: config fields over it)."""
    import transformers

    name, kwargs = TINY[family]
    cls = getattr(transformers, name)
    merged = dict(kwargs) if family == "dbrx" else {**COMMON, **SPECIAL_TOKENS, **kwargs}
    return cls(**{**merged, **overrides})


def save_tiny(family: str, directory: Path, *, seed: int = 0, dtype: Any = None, shard_bytes: str | None = None
              ) -> Path:
    """The tiny model of ``family`` saved to ``directory`` as safetensors (``dtype``: the stored weights' dtype,
    default fp32; ``shard_bytes``: save_pretrained's max_shard_size, sharded with an index)."""
    import torch
    import transformers

    config = tiny_config(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):  # DeepSeek-V3: zeros at init; make it steer
                module.e_score_correction_bias.copy_(torch.randn(module.e_score_correction_bias.shape) * 0.05)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": shard_bytes} if shard_bytes else {}
    model.save_pretrained(str(directory), safe_serialization=True, **kwargs)
    return directory
