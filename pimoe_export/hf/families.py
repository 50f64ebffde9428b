"""The Hugging Face MoE families (transformers 4.57) as configs of the one generic MoE block.

A :class:`Family` says, for one ``model_type``: which decoder-layer modules are its sparse-MoE blocks (the classes
Hugging Face builds there: dense layers the model keeps stay Hugging Face's own modules), how the Hugging Face
config maps to a :class:`~pimoe_export.model.moe_block.MoEBlockConfig`, and how the checkpoint's tensors become the
block's weights (exact element moves, pimoe_export.model.layouts). Nothing else is family-specific: the importer
(pimoe_export.hf.decoder) and everything after it only see blocks. docs/op_contract.md ("The Hugging Face MoE
families") is the verified semantics of each family; docs/models.md says what each maps to.

``fill(block, get, config)`` reads tensors by their names relative to the decoder layer (``get("mlp.gate.weight")``),
so the same converter serves a checkpoint read tensor by tensor and a Hugging Face module's state dict
(tests/hf/test_hf_families.py).

Families or features outside the contract are refused by name before anything is allocated (:data:`REFUSED`,
:func:`refusal`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pimoe_export.errors import PiMoEInputError
from pimoe_export.model import layouts
from pimoe_export.model.moe_block import ExpertGroup, ExpertsConfig, MoEBlock, MoEBlockConfig

#: a tensor of the checkpoint by its name relative to the decoder layer, as float32
Getter = Callable[[str], torch.Tensor]

#: Hugging Face activation names (ACT2FN) -> the contract's
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "relu": "relu", "tanh": "tanh"}


def activation(name: Any, family: str) -> str:
    if name not in ACTIVATIONS:
        raise PiMoEInputError(f"{family}: expert activation {name!r} is outside the op contract (it computes "
                              f"{sorted(set(ACTIVATIONS.values()))}; Hugging Face names {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


@dataclass(frozen=True)
class Family:
    """One Hugging Face MoE family (see the module docstring). ``block_attr``: the decoder layer's attribute that
    holds the sparse-MoE block; ``returns_tuple``: the decoder layer unpacks ``(hidden, router_logits)`` from it;
    ``owned``: other decoder-layer attributes whose weights the block takes over (set to None in the model);
    ``rope``: the Hugging Face module whose complex-valued rotary embedding is computed with real tensors (ONNX has
    no complex type); ``refuse``: the reason a config is outside the contract, or None."""

    name: str
    model_type: str
    block_classes: tuple[str, ...]
    block_attr: str
    returns_tuple: bool
    block_config: Callable[[Any], MoEBlockConfig]
    fill: Callable[[MoEBlock, Getter, Any], None]
    owned: tuple[str, ...] = ()
    rope: str | None = None
    refuse: Callable[[Any], str | None] = lambda config: None


# ------------------------------------------------------------------------------------------ weights into a block
def copy_stacked(block: MoEBlock, layer: int, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Every routed expert's ``layer`` from a stacked [E, rows, in] weight (and [E, rows] bias)."""
    for group in block.routed:
        lo, hi = group.expert_ids[0], group.expert_ids[-1] + 1
        getattr(group, f"weight_{layer}").copy_(weight[lo:hi])
        if bias is not None:
            getattr(group, f"bias_{layer}").copy_(bias[lo:hi])


def copy_expert(group: ExpertGroup, index: int, weights: list[torch.Tensor],
                biases: list[torch.Tensor] | None = None) -> None:
    """One expert's layers (contract layout: [rows, in], rows [gate; up] for a gated hidden layer)."""
    for layer, weight in enumerate(weights):
        getattr(group, f"weight_{layer}")[index].copy_(weight)
        if biases is not None:
            getattr(group, f"bias_{layer}")[index].copy_(biases[layer])


def separate_mlp(get: Getter, prefix: str, names: tuple[str, str, str], bias: bool = False
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """A gated MLP of separate nn.Linear (gate, up, down): [[gate; up] [2I, H], down [H, I]] (+ biases)."""
    gate, up, down = (f"{prefix}.{n}" for n in names)
    weights = [layouts.glu_rows_from_separate(get(f"{gate}.weight"), get(f"{up}.weight")), get(f"{down}.weight")]
    biases = [layouts.glu_bias_from_separate(get(f"{gate}.bias"), get(f"{up}.bias")), get(f"{down}.bias")] \
        if bias else None
    return weights, biases


def fill_separate(block: MoEBlock, get: Getter, experts: str, names: tuple[str, str, str]) -> None:
    """Routed experts stored as ``<experts>.<e>.<gate|up|down>.weight`` (Mixtral, Qwen, OLMoE, DeepSeek)."""
    for e in range(block.num_experts):
        group, index = block.group_of(e)
        copy_expert(group, index, *separate_mlp(get, f"{experts}.{e}", names, group.spec.bias))


def fill_shared(block: MoEBlock, get: Getter, prefix: str, names: tuple[str, str, str] = ("gate_proj", "up_proj",
                                                                                          "down_proj")) -> None:
    assert block.shared is not None
    copy_expert(block.shared, 0, *separate_mlp(get, prefix, names, block.shared.spec.bias))


def fill_router(block: MoEBlock, get: Getter, name: str) -> None:
    block.router.weight.copy_(get(f"{name}.weight"))
    if block.router.bias is not None:
        block.router.bias.copy_(get(f"{name}.bias"))


# ------------------------------------------------------------------------------------------ the families
GATE_UP_DOWN = ("gate_proj", "up_proj", "down_proj")


def _mixtral_config(c: Any) -> MoEBlockConfig:
    return MoEBlockConfig(c.hidden_size, c.num_local_experts, c.num_experts_per_tok,
                          ExpertsConfig(c.intermediate_size, activation(c.hidden_act, "Mixtral")), normalize=True,
                          family="mixtral")


def _mixtral_fill(block: MoEBlock, get: Getter, c: Any) -> None:
    fill_router(block, get, "block_sparse_moe.gate")
    fill_separate(block, get, "block_sparse_moe.experts", ("w1", "w3", "w2"))


def _qwen_config(family: str, intermediate: str) -> Callable[[Any], MoEBlockConfig]:
    def build(c: Any) -> MoEBlockConfig:
        shared = ExpertsConfig(c.shared_expert_intermediate_size, activation(c.hidden_act, family)) \
            if family == "qwen2_moe" else None
        return MoEBlockConfig(c.hidden_size, c.num_experts, c.num_experts_per_tok,
                              ExpertsConfig(getattr(c, intermediate), activation(c.hidden_act, family)),
                              normalize=bool(c.norm_topk_prob), shared=shared, shared_gate=shared is not None,
                              family=family)
    return build


def _qwen_fill(block: MoEBlock, get: Getter, c: Any) -> None:
    fill_router(block, get, "mlp.gate")
    fill_separate(block, get, "mlp.experts", GATE_UP_DOWN)
    if block.shared is not None:  # Qwen2-MoE
        fill_shared(block, get, "mlp.shared_expert")
        assert block.shared_gate is not None
        block.shared_gate.weight.copy_(get("mlp.shared_expert_gate.weight"))


def _dbrx_config(c: Any) -> MoEBlockConfig:
    ffn = c.ffn_config
    act = ffn.ffn_act_fn.get("name", "silu") if isinstance(ffn.ffn_act_fn, dict) else "silu"
    return MoEBlockConfig(c.d_model, ffn.moe_num_experts, ffn.moe_top_k,
                          ExpertsConfig(ffn.ffn_hidden_size, activation(act, "DBRX")),
                          normalize=ffn.moe_normalize_expert_weights is not None, family="dbrx")


def _dbrx_fill(block: MoEBlock, get: Getter, c: Any) -> None:
    e = block.num_experts
    fill_router(block, get, "ffn.router.layer")
    gate, up = (layouts.unflatten_experts(get(f"ffn.experts.mlp.{n}"), e) for n in ("w1", "v1"))
    copy_stacked(block, 0, layouts.glu_rows_from_separate(gate, up))
    del gate, up
    copy_stacked(block, 1, layouts.transpose_experts(layouts.unflatten_experts(get("ffn.experts.mlp.w2"), e)))


def _dbrx_refuse(c: Any) -> str | None:
    p = c.ffn_config.moe_normalize_expert_weights
    if p is not None and float(p) != 1.0:
        return (f"DBRX with ffn_config.moe_normalize_expert_weights={p}: the k weights divided by their {p}-norm is "
                "outside the op contract (it renormalises by the sum: p = 1)")
    if c.attn_config.clip_qkv is None:
        return ("DBRX with attn_config.clip_qkv null: transformers 4.57's DbrxAttention cannot run it (clamp with no "
                "bound), so there is no Hugging Face forward to match; set clip_qkv as the released DBRX does (8)")
    return None


def _deepseek_v2_config(c: Any) -> MoEBlockConfig:
    act = activation(c.hidden_act, "DeepSeek-V2")
    grouped = c.topk_method == "group_limited_greedy"
    shared = ExpertsConfig(c.moe_intermediate_size * c.n_shared_experts, act, bias=bool(c.mlp_bias)) \
        if c.n_shared_experts else None
    return MoEBlockConfig(c.hidden_size, c.n_routed_experts, c.num_experts_per_tok,
                          ExpertsConfig(c.moe_intermediate_size, act, bias=bool(c.mlp_bias)),
                          num_groups=c.n_group if grouped else 1, groups_kept=c.topk_group if grouped else 1,
                          routed_scaling_factor=float(c.routed_scaling_factor), order="slot", shared=shared,
                          family="deepseek_v2")


def _deepseek_fill(block: MoEBlock, get: Getter, c: Any) -> None:
    fill_router(block, get, "mlp.gate")
    if block.selection_bias is not None:  # DeepSeek-V3
        block.selection_bias.copy_(get("mlp.gate.e_score_correction_bias"))
    fill_separate(block, get, "mlp.experts", GATE_UP_DOWN)
    if block.shared is not None:
        fill_shared(block, get, "mlp.shared_experts")


def _deepseek_v2_refuse(c: Any) -> str | None:
    if c.topk_method not in ("greedy", "group_limited_greedy"):
        return (f"DeepSeek-V2 with topk_method={c.topk_method!r}: transformers 4.57 routes greedy or "
                "group_limited_greedy only")
    return None


def _deepseek_v3_config(c: Any) -> MoEBlockConfig:
    act = activation(c.hidden_act, "DeepSeek-V3")
    shared = ExpertsConfig(c.moe_intermediate_size * c.n_shared_experts, act) if c.n_shared_experts else None
    grouped = c.n_group > 1
    return MoEBlockConfig(c.hidden_size, c.n_routed_experts, c.num_experts_per_tok,
                          ExpertsConfig(c.moe_intermediate_size, act), scoring="sigmoid",
                          normalize=bool(c.norm_topk_prob), normalize_eps=1e-20 if c.norm_topk_prob else 0.0,
                          num_groups=c.n_group if grouped else 1, groups_kept=c.topk_group if grouped else 1,
                          group_score="sum_top2", routed_scaling_factor=float(c.routed_scaling_factor),
                          correction_bias=True, shared=shared, family="deepseek_v3")


def _deepseek_v3_refuse(c: Any) -> str | None:
    if c.n_routed_experts % c.n_group or c.n_routed_experts // c.n_group < 2:
        return (f"DeepSeek-V3 with {c.n_routed_experts} experts in n_group={c.n_group} groups: Hugging Face scores "
                "a group by its best two experts, so every group needs at least two")
    return None


def _gpt_oss_config(c: Any) -> MoEBlockConfig:
    return MoEBlockConfig(c.hidden_size, c.num_local_experts, c.num_experts_per_tok,
                          ExpertsConfig(c.intermediate_size, "swiglu_oai", bias=True), scoring="softmax_topk",
                          router_bias=True, family="gpt_oss")


def _gpt_oss_fill(block: MoEBlock, get: Getter, c: Any) -> None:
    fill_router(block, get, "mlp.router")
    gate_up = layouts.glu_rows_from_interleaved(layouts.transpose_experts(get("mlp.experts.gate_up_proj")))
    copy_stacked(block, 0, gate_up, layouts.glu_bias_from_interleaved(get("mlp.experts.gate_up_proj_bias")))
    del gate_up
    copy_stacked(block, 1, layouts.transpose_experts(get("mlp.experts.down_proj")), get("mlp.experts.down_proj_bias"))


def _granite_config(family: str) -> Callable[[Any], MoEBlockConfig]:
    def build(c: Any) -> MoEBlockConfig:
        act = activation(c.hidden_act, family)
        size = getattr(c, "shared_intermediate_size", 0) if family == "granitemoeshared" else 0
        return MoEBlockConfig(c.hidden_size, c.num_local_experts, c.num_experts_per_tok,
                              ExpertsConfig(c.intermediate_size, act), scoring="softmax_topk",
                              shared=ExpertsConfig(size, act) if size else None, family=family)
    return build


def _granite_fill(block: MoEBlock, get: Getter, c: Any) -> None:
    fill_router(block, get, "block_sparse_moe.router.layer")
    copy_stacked(block, 0, layouts.glu_rows_from_halves(get("block_sparse_moe.input_linear.weight")))
    copy_stacked(block, 1, get("block_sparse_moe.output_linear.weight"))
    if block.shared is not None:  # Granite-MoE-Shared: the decoder layer's shared_mlp, fused halves
        copy_expert(block.shared, 0, [layouts.glu_rows_from_halves(get("shared_mlp.input_linear.weight")),
                                      get("shared_mlp.output_linear.weight")])


def _llama4_config(c: Any) -> MoEBlockConfig:
    act = activation(c.hidden_act, "Llama 4")
    return MoEBlockConfig(c.hidden_size, c.num_local_experts, c.num_experts_per_tok,
                          ExpertsConfig(c.intermediate_size, act), scoring="sigmoid", input_scaling=True,
                          order="slot" if c.num_experts_per_tok == 1 else "expert",
                          shared=ExpertsConfig(c.intermediate_size, act), family="llama4_text")


def _llama4_fill(block: MoEBlock, get: Getter, c: Any) -> None:
    fill_router(block, get, "feed_forward.router")
    copy_stacked(block, 0, layouts.glu_rows_from_halves(layouts.transpose_experts(
        get("feed_forward.experts.gate_up_proj"))))
    copy_stacked(block, 1, layouts.transpose_experts(get("feed_forward.experts.down_proj")))
    fill_shared(block, get, "feed_forward.shared_expert")


FAMILIES: tuple[Family, ...] = (
    Family("Mixtral", "mixtral", ("MixtralSparseMoeBlock",), "block_sparse_moe", True, _mixtral_config,
           _mixtral_fill),
    Family("DBRX", "dbrx", ("DbrxFFN",), "ffn", True, _dbrx_config, _dbrx_fill, refuse=_dbrx_refuse),
    Family("Qwen2-MoE", "qwen2_moe", ("Qwen2MoeSparseMoeBlock",), "mlp", True,
           _qwen_config("qwen2_moe", "moe_intermediate_size"), _qwen_fill),
    Family("Qwen3-MoE", "qwen3_moe", ("Qwen3MoeSparseMoeBlock",), "mlp", True,
           _qwen_config("qwen3_moe", "moe_intermediate_size"), _qwen_fill),
    Family("OLMoE", "olmoe", ("OlmoeSparseMoeBlock",), "mlp", True, _qwen_config("olmoe", "intermediate_size"),
           _qwen_fill),
    Family("DeepSeek-V2", "deepseek_v2", ("DeepseekV2MoE",), "mlp", False, _deepseek_v2_config, _deepseek_fill,
           rope="deepseek_v2", refuse=_deepseek_v2_refuse),
    Family("DeepSeek-V3", "deepseek_v3", ("DeepseekV3MoE",), "mlp", False, _deepseek_v3_config, _deepseek_fill,
           refuse=_deepseek_v3_refuse),
    Family("GPT-OSS", "gpt_oss", ("GptOssMLP",), "mlp", True, _gpt_oss_config, _gpt_oss_fill),
    Family("Granite-MoE", "granitemoe", ("GraniteMoeMoE",), "block_sparse_moe", True,
           _granite_config("granitemoe"), _granite_fill),
    Family("Granite-MoE-Shared", "granitemoeshared", ("GraniteMoeSharedMoE",), "block_sparse_moe", True,
           _granite_config("granitemoeshared"), _granite_fill, owned=("shared_mlp",)),
    Family("Llama 4 (text)", "llama4_text", ("Llama4TextMoe",), "feed_forward", True, _llama4_config, _llama4_fill,
           rope="llama4"),
)
BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES}

#: model types outside the contract, and why (refused by name)
REFUSED: dict[str, str] = {
    "phimoe": "PhiMoE routes with sparsemixer (a masked, jittered top-2 whose second weight depends on the first "
              "choice), which none of the contract's scorings computes",
    "jetmoe": "JetMoE's attention layers are attention experts (a routed mixture of attention heads, JetMoeMoA); the "
              "contract has MoE feed-forward ops only, and its MLP MoE alone would not be the model",
    "switch_transformers": "Switch Transformers drops the tokens past each expert's capacity (expert_capacity) when "
                           "a batch overflows it; the contract is dropless, and this importer takes decoder-only "
                           "causal LMs (Switch is an encoder-decoder)",
    "nllb-moe": "NLLB-MoE drops the tokens past each expert's capacity (expert_capacity) when a batch overflows it; "
                "the contract is dropless, and this importer takes decoder-only causal LMs (NLLB-MoE is an "
                "encoder-decoder)",
    "llama4": "a multimodal Llama 4 checkpoint (Llama4ForConditionalGeneration); export its text model: save "
              "Llama4ForCausalLM (model_type llama4_text) and import that directory",
}


def refusal(data: dict[str, Any]) -> str | None:
    """Why the raw config.json ``data`` is outside what the importer carries (remote code, quantised weights, a
    refused family), or None."""
    model_type = data.get("model_type")
    if "auto_map" in data or data.get("trust_remote_code"):
        return ("its config.json asks for remote code (auto_map): pimoe-export never runs code from a model "
                "directory (trust_remote_code); use a model type that transformers implements")
    if data.get("quantization_config") is not None:
        method = data["quantization_config"].get("quant_method", "?") if isinstance(data["quantization_config"],
                                                                                   dict) else "?"
        return (f"its weights are quantised ({method}); the importer reads bf16/fp16/fp32 checkpoints (pimoe-export "
                "quantises them itself: `pimoe-export quantize`): dequantise it first")
    if model_type in REFUSED:
        return f"model_type {model_type!r} is outside the op contract: {REFUSED[model_type]}"
    if model_type not in BY_MODEL_TYPE:
        known = ", ".join(f"{f.name} ({f.model_type})" for f in FAMILIES)
        return f"model_type {model_type!r} is not a Hugging Face MoE family pimoe-export imports; it imports {known}"
    return None
