"""Op contract v2 expresses every Hugging Face MoE family of docs/op_contract.md ("The families") exactly.

For each family: the Hugging Face sparse-MoE block of transformers (built from a tiny config, random weights, no
download) runs in fp32, and the importer's own block is built from it: the family's MoEBlockConfig of the Hugging Face
config and its weights converted by the family's ``fill`` (pimoe_export.hf.families, the code that reads
checkpoints, here given the Hugging Face modules' state dicts). The MoEBlock (the contract's reference ops, and
the same block over the custom ops ``torch.ops.pimoe``, as exported) must select the same top-k experts for every
token and agree to rel. L2 <= 1e-6; where the combine order and the GEMM row blocks are the same as Hugging Face's,
bit for bit (asserted where it is so by construction, reported for the rest: see BITWISE). JetMoE, refused as a
model (attention experts), shows that its MLP MoE alone is a block config too (the output bias).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from pimoe_export.export.modules import CustomOpBlock
from pimoe_export.hf.families import BY_MODEL_TYPE
from pimoe_export.model import layouts
from pimoe_export.model.moe_block import ExpertsConfig, MoEBlock, MoEBlockConfig

transformers = pytest.importorskip("transformers")

N_BATCH, N_SEQ = 3, 11
REL_L2 = 1e-6


def randomise(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def imported(model_type: str, config, modules: dict[str, torch.nn.Module]) -> MoEBlock:
    """The importer's block of a family: its config from the Hugging Face config, its weights filled by the family
    from the modules' tensors, named as in a checkpoint relative to the decoder layer (``mlp.gate.weight``)."""
    family = BY_MODEL_TYPE[model_type]
    block = MoEBlock(family.block_config(config), initialize=False)
    state = {f"{attr}.{name}": t.detach() for attr, m in modules.items() for name, t in m.state_dict().items()}
    with torch.no_grad():
        family.fill(block, lambda name: state[name].float(), config)
    return block.eval()


# ------------------------------------------------------------------------------------------ the families
def mixtral_like(family: str):
    """Mixtral, Qwen3-MoE, OLMoE: softmax -> top-k -> renormalise (Mixtral always; the others iff norm_topk_prob)."""
    if family == "mixtral":
        cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=8,
                                         num_experts_per_tok=2)
        block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(cfg)
    elif family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=24, num_experts=16,
                                          num_experts_per_tok=4, norm_topk_prob=True)
        block = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(cfg)
    else:
        cfg = transformers.OlmoeConfig(hidden_size=32, intermediate_size=24, num_experts=16, num_experts_per_tok=4,
                                       norm_topk_prob=False)
        block = transformers.models.olmoe.modeling_olmoe.OlmoeSparseMoeBlock(cfg)
    randomise(block, 1)
    attr = BY_MODEL_TYPE[family].block_attr
    return block, lambda x: block(x)[0], imported(family, cfg, {attr: block})


def qwen2_moe():
    cfg = transformers.Qwen2MoeConfig(hidden_size=32, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)
    block = transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock(cfg)
    randomise(block, 2)
    return block, lambda x: block(x)[0], imported("qwen2_moe", cfg, {"mlp": block})


def dbrx(p: float | None = 1.0):
    """``p``: moe_normalize_expert_weights (None: Hugging Face keeps the raw softmax weights of the top k)."""
    cfg = transformers.DbrxConfig(d_model=32, ffn_config={"ffn_hidden_size": 24, "moe_num_experts": 8,
                                                         "moe_top_k": 3, "moe_normalize_expert_weights": p})
    block = transformers.models.dbrx.modeling_dbrx.DbrxFFN(cfg)
    randomise(block, 3)
    # moe_normalize_expert_weights = p: p = 1 divides by the L1 norm = the sum of the (positive) weights: normalize
    return block, lambda x: block(x)[0], imported("dbrx", cfg, {"ffn": block})


def deepseek_v2(method: str, norm_topk_prob: bool = False):
    """``norm_topk_prob``: read by Hugging Face's DeepSeek-V2 and never used (its weights are not renormalised)."""
    kwargs = {"topk_method": method, "n_group": 4, "topk_group": 2} if method == "group_limited_greedy" else \
        {"topk_method": method}
    cfg = transformers.DeepseekV2Config(hidden_size=32, moe_intermediate_size=24, n_routed_experts=16,
                                        n_shared_experts=2, num_experts_per_tok=4, routed_scaling_factor=1.5,
                                        norm_topk_prob=norm_topk_prob, **kwargs)
    block = transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2MoE(cfg)
    randomise(block, 4)
    return block, block, imported("deepseek_v2", cfg, {"mlp": block})


def deepseek_v3(k: int = 4):
    cfg = transformers.DeepseekV3Config(hidden_size=32, moe_intermediate_size=24, n_routed_experts=16,
                                        n_shared_experts=1, num_experts_per_tok=k, n_group=4, topk_group=2,
                                        norm_topk_prob=True, routed_scaling_factor=2.5)
    block = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE(cfg)
    randomise(block, 5)
    with torch.no_grad():
        block.gate.e_score_correction_bias.copy_(torch.randn(16, generator=torch.Generator().manual_seed(6)) * 0.3)
    return block, block, imported("deepseek_v3", cfg, {"mlp": block})


def gpt_oss():
    cfg = transformers.GptOssConfig(hidden_size=32, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2)
    block = transformers.models.gpt_oss.modeling_gpt_oss.GptOssMLP(cfg)
    randomise(block, 7, std=0.5)  # large enough that the clamps at +-7 act
    return block, lambda x: block(x)[0], imported("gpt_oss", cfg, {"mlp": block})


def granite():
    cfg = transformers.GraniteMoeConfig(hidden_size=32, intermediate_size=24, num_local_experts=8,
                                        num_experts_per_tok=2)
    block = transformers.models.granitemoe.modeling_granitemoe.GraniteMoeMoE(cfg)
    randomise(block, 8)
    return block, lambda x: block(x)[0], imported("granitemoe", cfg, {"block_sparse_moe": block})


def jetmoe():
    """JetMoE's MLP MoE (the model is refused for its attention experts): softmax_topk, fused halves, an output
    bias after the combine, as a block config of its own."""
    cfg = transformers.JetMoeConfig(hidden_size=32, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2)
    block = transformers.models.jetmoe.modeling_jetmoe.JetMoeMoE(cfg)
    randomise(block, 8)
    ours = MoEBlock(MoEBlockConfig(32, 8, 2, ExpertsConfig(24, "silu"), scoring="softmax_topk", output_bias=True),
                    initialize=False)
    with torch.no_grad():
        ours.router.weight.copy_(block.router.layer.weight)
        ours.routed[0].weight_0.copy_(layouts.glu_rows_from_halves(block.input_linear.weight.detach()))
        ours.routed[0].weight_1.copy_(block.output_linear.weight.detach())
        ours.output_bias.copy_(block.bias.detach())
    return block, lambda x: block(x)[0], ours.eval()


def granite_shared():
    cfg = transformers.GraniteMoeSharedConfig(hidden_size=32, intermediate_size=24, num_local_experts=8,
                                              num_experts_per_tok=2, shared_intermediate_size=40)
    mod = transformers.models.granitemoeshared.modeling_granitemoeshared
    moe, shared_mlp = mod.GraniteMoeSharedMoE(cfg), mod.GraniteMoeSharedMLP(cfg)
    randomise(moe, 9)
    randomise(shared_mlp, 10)

    def forward(x):  # GraniteMoeSharedDecoderLayer: moe_hidden_states + self.shared_mlp(hidden_states)
        return moe(x)[0] + shared_mlp(x)

    return moe, forward, imported("granitemoeshared", cfg, {"block_sparse_moe": moe, "shared_mlp": shared_mlp})


def llama4(k: int = 1):
    cfg = transformers.Llama4TextConfig(hidden_size=32, intermediate_size=24, num_local_experts=8,
                                        num_experts_per_tok=k)
    block = transformers.models.llama4.modeling_llama4.Llama4TextMoe(cfg)
    randomise(block, 11)
    return block, lambda x: block(x)[0], imported("llama4_text", cfg, {"feed_forward": block})


FAMILIES: dict[str, Callable] = {
    "mixtral": lambda: mixtral_like("mixtral"),
    "dbrx": dbrx,
    "dbrx_unnormalised": lambda: dbrx(None),
    "qwen2_moe": qwen2_moe,
    "qwen3_moe": lambda: mixtral_like("qwen3_moe"),
    "olmoe": lambda: mixtral_like("olmoe"),
    "deepseek_v2_greedy": lambda: deepseek_v2("greedy"),
    "deepseek_v2_group_limited": lambda: deepseek_v2("group_limited_greedy"),
    "deepseek_v2_norm_topk_prob": lambda: deepseek_v2("greedy", norm_topk_prob=True),
    "deepseek_v3": deepseek_v3,
    "deepseek_v3_top2": lambda: deepseek_v3(k=2),
    "gpt_oss": gpt_oss,
    "granitemoe": granite,
    "granitemoeshared": granite_shared,
    "jetmoe": jetmoe,
    "llama4": llama4,
    "llama4_top2": lambda: llama4(k=2),
}


def hf_selection(family: str, block, x: torch.Tensor) -> torch.Tensor:
    """The experts Hugging Face's own router picks for every token of x [B, S, H], as a bool [B*S, E] mask (from the
    block's modules; ``family`` as in FAMILIES or a model_type)."""
    x2d = x.reshape(-1, x.shape[-1])
    n = x2d.shape[0]
    if family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        probs = torch.softmax(block.gate(x2d), dim=-1, dtype=torch.float)
        ids = torch.topk(probs, block.top_k, dim=-1).indices
    elif family.startswith("dbrx"):
        ids = block.router(x2d)[2]
    elif family.startswith("deepseek"):
        ids = block.gate(x)[0] if family.startswith("deepseek_v2") else block.gate(x2d)[0]
    elif family == "gpt_oss":
        ids = block.router(x2d)[1]
    elif family in ("granitemoe", "granitemoeshared", "jetmoe"):
        logits = block.router.layer(x2d).float()
        ids = logits.topk(block.router.top_k, dim=1).indices
    elif family.startswith("llama4"):
        scores = block.router(x2d)[0]
        return scores > 0
    else:  # pragma: no cover
        raise AssertionError(family)
    mask = torch.zeros((n, int(block_experts(block))), dtype=torch.bool)
    return mask.scatter(1, ids.long(), True)


def block_experts(block) -> int:
    """E of a Hugging Face sparse-MoE block."""
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        for module in (block, getattr(block, "gate", None), getattr(block, "router", None),
                       getattr(block, "experts", None)):
            if module is not None and isinstance(getattr(module, name, None), int):
                return getattr(module, name)
    if hasattr(block, "experts") and hasattr(block.experts, "__len__"):
        return len(block.experts)
    return int(block.router.layer.out_features)


#: Bit-identical to the Hugging Face block, asserted. Everywhere else the contract computes the same operations, but
#: two things outside it move the last bit: the GEMM of an expert sees its rows in another order (Mixtral, Qwen,
#: OLMoE, DBRX, GPT-OSS: slot-major torch.where; DeepSeek-V2, Granite, JetMoE: argsort/sort; Llama 4: all N rows),
#: and the BLAS kernel's blocking depends on the row position; and with k > 2 Hugging Face sums the k weights to
#: renormalise them in torch.topk(sorted=False)'s order (DeepSeek). DeepSeek-V3 computes its experts' rows in token
#: order, as dispatch does, and sums two weights in any order alike: with k = 2 every op is Hugging Face's, bit for bit
#: (sigmoid, the correction bias, sum-of-top-2 groups masked to 0, the 1e-20, the scaling, the expert-order combine).
BITWISE = {"deepseek_v3_top2"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    torch.manual_seed(0)
    block, forward, ours = FAMILIES[request.param]()
    block.eval()
    x = torch.randn(N_BATCH, N_SEQ, 32, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        want = forward(x).reshape(-1, 32)
        got, ids, _ = (t.reshape(N_BATCH * N_SEQ, -1) for t in CustomOpBlock(ours)(x))
        reference = ours(x)  # the block's own forward (the contract's reference functions)
        hf_mask = hf_selection(request.param, block, x)
    return request.param, want, got, ids, hf_mask, reference.reshape(-1, 32)


def test_same_experts_and_output_as_hugging_face(family) -> None:
    name, want, got, ids, hf_mask, _ = family
    n, e = hf_mask.shape[0], max(hf_mask.shape[1], int(ids.max()) + 1)
    mask = torch.zeros((n, e), dtype=torch.bool).scatter(1, ids.long(), True)
    hf = torch.zeros((n, e), dtype=torch.bool)
    hf[:, : hf_mask.shape[1]] = hf_mask
    assert torch.equal(mask, hf), f"{name}: the contract selects other experts than Hugging Face"
    rel = float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))
    assert rel <= REL_L2, f"{name}: rel. L2 {rel:.3g}"
    if name in BITWISE:
        assert torch.equal(got, want), f"{name}: not bit-identical (max |diff| {float((got - want).abs().max()):.3g})"


def test_the_custom_op_form_is_the_block_bit_for_bit(family) -> None:
    """What the exporter traces (the block over torch.ops.pimoe) equals the block's own forward exactly."""
    name, _, got, _, _, reference = family
    assert torch.equal(got, reference), name


def test_each_familys_block_config_records_its_model_type() -> None:
    """The block config of every family names where it came from (its Hugging Face model_type: what `pimoe-export
    info` and the graph's config metadata show), read from each family's tiny decoder config."""
    from tiny_decoders import TINY, tiny_config

    from pimoe_export.hf.families import FAMILIES as KNOWN

    assert {f.model_type for f in KNOWN} == set(TINY)
    for family in KNOWN:
        config = family.block_config(tiny_config(family.model_type))
        assert config.family == family.model_type, family.name


def test_each_familys_combine_order_is_the_documented_one() -> None:
    """docs/op_contract.md, "What each family maps to", PiMoECombine ``order``: slot for DeepSeek-V2 (its slot-order
    ``.sum(dim=1)``) and for Llama 4 with k = 1, expert (Hugging Face's ``index_add_`` over ascending experts) for
    Llama 4 with k > 1 and every other family; a block config left at its default combines in expert order. The two
    orders differ only in rounding, which the families' rel. L2 bound does not see."""
    from tiny_decoders import tiny_config

    from pimoe_export.hf.families import FAMILIES as KNOWN

    slot = {"deepseek_v2", "llama4_text"}
    for family in KNOWN:
        config = tiny_config(family.model_type)
        expected = "slot" if family.model_type in slot else "expert"
        assert family.block_config(config).order == expected, family.name
    assert tiny_config("llama4_text").num_experts_per_tok == 1
    assert BY_MODEL_TYPE["llama4_text"].block_config(tiny_config("llama4_text", num_experts_per_tok=2)).order == \
        "expert"
    assert MoEBlockConfig(8, 4, 2, ExpertsConfig(4)).order == "expert"


def test_deepseek_route_settings_follow_the_documented_mapping() -> None:
    """DeepSeek-V2: normalize=0 whatever ``norm_topk_prob`` says (Hugging Face reads it and never uses it; the
    family case deepseek_v2_norm_topk_prob holds the numbers). DeepSeek-V3: normalize = norm_topk_prob with
    ``normalize_eps`` 1e-20 (Hugging Face's ``/ (sum + 1e-20)``), neither without it."""
    from tiny_decoders import tiny_config

    v2 = BY_MODEL_TYPE["deepseek_v2"]
    for flag in (True, False):
        config = v2.block_config(tiny_config("deepseek_v2", norm_topk_prob=flag))
        assert config.normalize is False and config.normalize_eps == 0.0, flag
    v3 = BY_MODEL_TYPE["deepseek_v3"]
    normalised = v3.block_config(tiny_config("deepseek_v3", norm_topk_prob=True))
    assert normalised.normalize is True and normalised.normalize_eps == 1e-20
    raw = v3.block_config(tiny_config("deepseek_v3", norm_topk_prob=False))
    assert raw.normalize is False and raw.normalize_eps == 0.0


def test_deepseek_v3_weights_where_the_1e_20_dominates_the_sum() -> None:
    """Router logits near -60 (sigmoid ~1e-26, so the k weights sum to ~1e-25): Hugging Face's
    ``topk_weights / (sum + 1e-20)`` is then ~1e-5 of what plain renormalisation gives, and the contract's
    ``normalize_eps`` must reproduce it. Independent reference: DeepseekV3TopkRouter itself."""
    from pimoe_export.model.moe_block import REFERENCE_OPS, route_tokens

    cfg = transformers.DeepseekV3Config(hidden_size=32, moe_intermediate_size=24, n_routed_experts=16,
                                        n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                                        norm_topk_prob=True, routed_scaling_factor=2.5)
    hf = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE(cfg)
    randomise(hf, 13)
    with torch.no_grad():
        hf.gate.weight[:, 0] = -60.0  # with x[:, 0] = 1 every logit is -60 plus ~N(0, 1)
        hf.gate.e_score_correction_bias.zero_()  # keys = sigmoid: every kept expert's key is above a dropped 0
    ours = imported("deepseek_v3", cfg, {"mlp": hf})
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(14))
    x[:, 0] = 1.0
    with torch.no_grad():
        logits = torch.nn.functional.linear(x, hf.gate.weight)
        hf_ids, hf_weights = hf.gate(x)
        weights, ids = route_tokens(ours, x, REFERENCE_OPS)
    assert float(logits.max()) < -50 and float(logits.min()) > -70
    dense = torch.zeros(40, 16).scatter(1, ids.long(), weights)
    hf_dense = torch.zeros(40, 16).scatter(1, hf_ids.long(), hf_weights)
    assert torch.equal(dense > 0, hf_dense > 0)  # the same experts
    assert float(hf_dense.sum(-1).max()) < 1e-3  # the 1e-20 dominates (plain renormalisation would give 2.5)
    torch.testing.assert_close(dense, hf_dense, rtol=1e-5, atol=0)
