"""Op contract v2 expresses every Hugging Face MoE family of docs/op_contract.md ("The families") exactly.

For each family: the Hugging Face sparse-MoE block of transformers (built from a tiny config, random weights, no
download) runs in fp32, and the same block is computed with the contract's torch reference ops
(``torch.ops.pimoe.*``: route, dispatch, expert_mlp, combine) on weights converted by pimoe_export.model.layouts, plus
the standard ops the importers put around them (the router Linear, shared-expert gates, Llama 4's input scaling,
JetMoE's output bias). The two must select the same top-k experts for every token and agree to rel. L2 <= 1e-6;
where the combine order and the GEMM row blocks are the same as Hugging Face's, bit for bit (asserted where it is so
by construction, reported for the rest: see BITWISE).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

import pimoe_export.ops.torch_ops  # noqa: F401  (registers torch.ops.pimoe.*)
from pimoe_export.model import layouts

transformers = pytest.importorskip("transformers")

N_BATCH, N_SEQ = 3, 11
REL_L2 = 1e-6


@dataclass
class Contract:
    """One MoE block in contract terms: route attributes, routed expert group, optional shared group and gate."""

    router: Callable[[torch.Tensor], torch.Tensor]  # x [N, H] -> logits [N, E] (standard ops)
    route: dict
    selection_bias: torch.Tensor | None
    experts: list[torch.Tensor]  # param list in contract order for expert ids 0..E-1
    widths: list[int]
    activation: str = "silu"
    bias: bool = False
    order: str = "expert"
    input_scaling: bool = False  # Llama 4: the route weight scales the expert's input, the combine weight is 1
    shared: list[torch.Tensor] | None = None
    shared_widths: list[int] = field(default_factory=list)
    shared_gate: Callable[[torch.Tensor], torch.Tensor] | None = None  # Qwen2: sigmoid(Linear(H, 1))
    output_bias: torch.Tensor | None = None  # JetMoE


def expert_group(x_sorted, offsets, params, expert_ids, widths, activation, bias):
    return torch.ops.pimoe.expert_mlp(x_sorted, offsets, params, expert_ids, widths, activation, False, 1e-5, "none",
                                      [], gated=True, bias=bias)


def run_contract(c: Contract, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The block on x [N, H] with the contract's ops; returns (y [N, H], ids [N, k])."""
    n, e = x.shape[0], c.experts[0].shape[0]
    logits = c.router(x)
    weights, ids = torch.ops.pimoe.route(logits, c.selection_bias, **c.route)
    x_in = x * weights if c.input_scaling else x  # k = 1: the token's one slot
    x_sorted, offsets, f2s = torch.ops.pimoe.dispatch(x_in, ids, e)
    y_sorted = expert_group(x_sorted, offsets, c.experts, list(range(e)), c.widths, c.activation, c.bias)
    y = torch.ops.pimoe.combine(y_sorted, f2s, torch.ones_like(weights) if c.input_scaling else weights, c.order)
    if c.output_bias is not None:
        y = y + c.output_bias
    if c.shared is not None:
        everyone = torch.tensor([0, n], dtype=torch.int32)
        shared = expert_group(x, everyone, c.shared, [0], c.shared_widths, c.activation, False)
        if c.shared_gate is not None:
            shared = torch.sigmoid(c.shared_gate(x)) * shared
        y = shared + y if c.input_scaling else y + shared  # Llama 4 adds the routed sum to the shared output
    return y, ids


def linear_router(weight: torch.Tensor, bias: torch.Tensor | None = None, fp32_cast: bool = False):
    if fp32_cast:  # DeepSeek: F.linear(x.type(float32), W.type(float32))
        return lambda x: torch.nn.functional.linear(x.float(), weight.float(), bias)
    return lambda x: torch.nn.functional.linear(x, weight, bias)


def separate_experts(mlps, gate="gate_proj", up="up_proj", down="down_proj") -> list[torch.Tensor]:
    """nn.Linear experts (gate, up, down) -> [W0 [E, 2I, H], W1 [E, H, I]] (bias-free)."""
    w0 = layouts.stack_experts([layouts.glu_rows_from_separate(getattr(m, gate).weight, getattr(m, up).weight)
                                for m in mlps])
    w1 = layouts.stack_experts([getattr(m, down).weight for m in mlps])
    return [w0.detach(), w1.detach()]


def randomise(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


# ------------------------------------------------------------------------------------------ the families
def mixtral_like(family: str):
    """Mixtral, Qwen3-MoE, OLMoE: softmax -> top-k -> renormalise (Mixtral always; the others iff norm_topk_prob)."""
    if family == "mixtral":
        cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=8,
                                         num_experts_per_tok=2)
        block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(cfg)
        experts, normalize = separate_experts(block.experts, "w1", "w3", "w2"), True
    elif family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=24, num_experts=16,
                                          num_experts_per_tok=4, norm_topk_prob=True)
        block = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(cfg)
        experts, normalize = None, True
    else:
        cfg = transformers.OlmoeConfig(hidden_size=32, intermediate_size=24, num_experts=16, num_experts_per_tok=4,
                                       norm_topk_prob=False)
        block = transformers.models.olmoe.modeling_olmoe.OlmoeSparseMoeBlock(cfg)
        experts, normalize = None, False
    randomise(block, 1)
    experts = separate_experts(block.experts, "w1", "w3", "w2") if family == "mixtral" else \
        separate_experts(block.experts)
    k = block.top_k
    contract = Contract(linear_router(block.gate.weight), {"k": k, "normalize": normalize}, None, experts,
                        [32, experts[1].shape[2], 32])
    return block, lambda x: block(x)[0], contract


def qwen2_moe():
    cfg = transformers.Qwen2MoeConfig(hidden_size=32, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)
    block = transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock(cfg)
    randomise(block, 2)
    shared = separate_experts([block.shared_expert])
    contract = Contract(linear_router(block.gate.weight), {"k": 2, "normalize": False}, None,
                        separate_experts(block.experts), [32, 24, 32], shared=shared, shared_widths=[32, 40, 32],
                        shared_gate=linear_router(block.shared_expert_gate.weight))
    return block, lambda x: block(x)[0], contract


def dbrx():
    cfg = transformers.DbrxConfig(d_model=32, ffn_config={"ffn_hidden_size": 24, "moe_num_experts": 8,
                                                         "moe_top_k": 3, "moe_normalize_expert_weights": 1.0})
    block = transformers.models.dbrx.modeling_dbrx.DbrxFFN(cfg)
    randomise(block, 3)
    mlp, e = block.experts.mlp, 8
    w1, v1, w2 = (layouts.unflatten_experts(t.detach(), e) for t in (mlp.w1, mlp.v1, mlp.w2))
    experts = [layouts.glu_rows_from_separate(w1, v1), layouts.transpose_experts(w2)]
    # moe_normalize_expert_weights = p: p = 1 divides by the L1 norm = the sum of the (positive) weights: normalize
    contract = Contract(linear_router(block.router.layer.weight), {"k": 3, "normalize": True}, None, experts,
                        [32, 24, 32])
    return block, lambda x: block(x)[0], contract


def deepseek_v2(method: str):
    kwargs = {"topk_method": method, "n_group": 4, "topk_group": 2} if method == "group_limited_greedy" else \
        {"topk_method": method}
    cfg = transformers.DeepseekV2Config(hidden_size=32, moe_intermediate_size=24, n_routed_experts=16,
                                        n_shared_experts=2, num_experts_per_tok=4, routed_scaling_factor=1.5,
                                        **kwargs)
    block = transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2MoE(cfg)
    randomise(block, 4)
    route = {"k": 4, "normalize": False, "routed_scaling_factor": 1.5}  # V2 ignores norm_topk_prob (4.57)
    if method == "group_limited_greedy":
        route.update(num_groups=4, groups_kept=2, group_score="max")
    shared = separate_experts([block.shared_experts])
    contract = Contract(linear_router(block.gate.weight, fp32_cast=True), route, None,
                        separate_experts(block.experts), [32, 24, 32], order="slot", shared=shared,
                        shared_widths=[32, 48, 32])
    return block, block, contract


def deepseek_v3(k: int = 4):
    cfg = transformers.DeepseekV3Config(hidden_size=32, moe_intermediate_size=24, n_routed_experts=16,
                                        n_shared_experts=1, num_experts_per_tok=k, n_group=4, topk_group=2,
                                        norm_topk_prob=True, routed_scaling_factor=2.5)
    block = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE(cfg)
    randomise(block, 5)
    with torch.no_grad():
        block.gate.e_score_correction_bias.copy_(torch.randn(16, generator=torch.Generator().manual_seed(6)) * 0.3)
    route = {"k": k, "normalize": True, "scoring": "sigmoid", "num_groups": 4, "groups_kept": 2,
             "group_score": "sum_top2", "routed_scaling_factor": 2.5, "normalize_eps": 1e-20}
    shared = separate_experts([block.shared_experts])
    contract = Contract(linear_router(block.gate.weight, fp32_cast=True), route,
                        block.gate.e_score_correction_bias.detach(), separate_experts(block.experts), [32, 24, 32],
                        shared=shared, shared_widths=[32, 24, 32])
    return block, block, contract


def gpt_oss():
    cfg = transformers.GptOssConfig(hidden_size=32, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2)
    block = transformers.models.gpt_oss.modeling_gpt_oss.GptOssMLP(cfg)
    randomise(block, 7, std=0.5)  # large enough that the clamps at +-7 act
    ex = block.experts
    w0 = layouts.glu_rows_from_interleaved(layouts.transpose_experts(ex.gate_up_proj.detach()))
    b0 = layouts.glu_bias_from_interleaved(ex.gate_up_proj_bias.detach())
    experts = [w0, b0, layouts.transpose_experts(ex.down_proj.detach()), ex.down_proj_bias.detach()]
    contract = Contract(linear_router(block.router.weight, block.router.bias), {"k": 2, "normalize": False,
                        "scoring": "softmax_topk"}, None, experts, [32, 24, 32], activation="swiglu_oai", bias=True)
    return block, lambda x: block(x)[0], contract


def granite(family: str):
    if family == "jetmoe":
        cfg = transformers.JetMoeConfig(hidden_size=32, intermediate_size=24, num_local_experts=8,
                                        num_experts_per_tok=2)
        block = transformers.models.jetmoe.modeling_jetmoe.JetMoeMoE(cfg)
    else:
        cfg = transformers.GraniteMoeConfig(hidden_size=32, intermediate_size=24, num_local_experts=8,
                                            num_experts_per_tok=2)
        block = transformers.models.granitemoe.modeling_granitemoe.GraniteMoeMoE(cfg)
    randomise(block, 8)
    experts = [layouts.glu_rows_from_halves(block.input_linear.weight.detach()), block.output_linear.weight.detach()]
    contract = Contract(linear_router(block.router.layer.weight), {"k": 2, "normalize": False,
                        "scoring": "softmax_topk"}, None, experts, [32, 24, 32],
                        output_bias=block.bias.detach() if family == "jetmoe" else None)
    return block, lambda x: block(x)[0], contract


def granite_shared():
    cfg = transformers.GraniteMoeSharedConfig(hidden_size=32, intermediate_size=24, num_local_experts=8,
                                              num_experts_per_tok=2, shared_intermediate_size=40)
    mod = transformers.models.granitemoeshared.modeling_granitemoeshared
    moe, shared_mlp = mod.GraniteMoeSharedMoE(cfg), mod.GraniteMoeSharedMLP(cfg)
    randomise(moe, 9)
    randomise(shared_mlp, 10)
    experts = [layouts.glu_rows_from_halves(moe.input_linear.weight.detach()), moe.output_linear.weight.detach()]
    shared = [layouts.glu_rows_from_halves(shared_mlp.input_linear.weight.detach()).unsqueeze(0),
              shared_mlp.output_linear.weight.detach().unsqueeze(0)]
    contract = Contract(linear_router(moe.router.layer.weight), {"k": 2, "normalize": False,
                        "scoring": "softmax_topk"}, None, experts, [32, 24, 32], shared=shared,
                        shared_widths=[32, 40, 32])

    def forward(x):  # GraniteMoeSharedDecoderLayer: moe_hidden_states + self.shared_mlp(hidden_states)
        return moe(x)[0] + shared_mlp(x)

    return moe, forward, contract


def llama4():
    cfg = transformers.Llama4TextConfig(hidden_size=32, intermediate_size=24, num_local_experts=8,
                                        num_experts_per_tok=1)
    block = transformers.models.llama4.modeling_llama4.Llama4TextMoe(cfg)
    randomise(block, 11)
    ex = block.experts
    experts = [layouts.glu_rows_from_halves(layouts.transpose_experts(ex.gate_up_proj.detach())),
               layouts.transpose_experts(ex.down_proj.detach())]
    shared = separate_experts([block.shared_expert])
    contract = Contract(linear_router(block.router.weight), {"k": 1, "normalize": False, "scoring": "sigmoid"},
                        None, experts, [32, 24, 32], order="slot", input_scaling=True, shared=shared,
                        shared_widths=[32, 24, 32])
    return block, lambda x: block(x)[0], contract


FAMILIES: dict[str, Callable] = {
    "mixtral": lambda: mixtral_like("mixtral"),
    "dbrx": dbrx,
    "qwen2_moe": qwen2_moe,
    "qwen3_moe": lambda: mixtral_like("qwen3_moe"),
    "olmoe": lambda: mixtral_like("olmoe"),
    "deepseek_v2_greedy": lambda: deepseek_v2("greedy"),
    "deepseek_v2_group_limited": lambda: deepseek_v2("group_limited_greedy"),
    "deepseek_v3": deepseek_v3,
    "deepseek_v3_top2": lambda: deepseek_v3(k=2),
    "gpt_oss": gpt_oss,
    "granitemoe": lambda: granite("granitemoe"),
    "granitemoeshared": granite_shared,
    "jetmoe": lambda: granite("jetmoe"),
    "llama4": llama4,
}


def hf_selection(family: str, block, x2d: torch.Tensor) -> torch.Tensor:
    """The experts Hugging Face's own router picks for every token, as a bool [N, E] mask (from its modules)."""
    n = x2d.shape[0]
    if family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        probs = torch.softmax(block.gate(x2d), dim=-1, dtype=torch.float)
        ids = torch.topk(probs, block.top_k, dim=-1).indices
    elif family == "dbrx":
        ids = block.router(x2d)[2]
    elif family.startswith("deepseek"):
        ids = block.gate(x2d.reshape(N_BATCH, N_SEQ, -1))[0] if family.startswith("deepseek_v2") else \
            block.gate(x2d)[0]
    elif family == "gpt_oss":
        ids = block.router(x2d)[1]
    elif family in ("granitemoe", "granitemoeshared", "jetmoe"):
        logits = block.router.layer(x2d).float()
        ids = logits.topk(block.router.top_k, dim=1).indices
    elif family == "llama4":
        scores = block.router(x2d)[0]
        return scores > 0
    else:  # pragma: no cover
        raise AssertionError(family)
    mask = torch.zeros((n, int(ids.max()) + 1 if ids.numel() else 1), dtype=torch.bool)
    return mask.scatter(1, ids.long(), True)


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
    block, forward, contract = FAMILIES[request.param]()
    block.eval()
    x = torch.randn(N_BATCH, N_SEQ, 32, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        want = forward(x).reshape(-1, 32)
        got, ids = run_contract(contract, x.reshape(-1, 32))
        hf_mask = hf_selection(request.param, block, x.reshape(-1, 32))
    return request.param, want, got, ids, hf_mask


def test_same_experts_and_output_as_hugging_face(family) -> None:
    name, want, got, ids, hf_mask = family
    n, e = hf_mask.shape[0], max(hf_mask.shape[1], int(ids.max()) + 1)
    mask = torch.zeros((n, e), dtype=torch.bool).scatter(1, ids.long(), True)
    hf = torch.zeros((n, e), dtype=torch.bool)
    hf[:, : hf_mask.shape[1]] = hf_mask
    assert torch.equal(mask, hf), f"{name}: the contract selects other experts than Hugging Face"
    rel = float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))
    assert rel <= REL_L2, f"{name}: rel. L2 {rel:.3g}"
    if name in BITWISE:
        assert torch.equal(got, want), f"{name}: not bit-identical (max |diff| {float((got - want).abs().max()):.3g})"

