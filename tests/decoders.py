"""Decoder units for the generation tests (the decoder_case fixture of tests/conftest.py), one per decoder family.

``FAMILIES`` lists the decoder families every generation test runs on: a dense Llama and the MoE families that
transformers builds from a config with no download (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE, OLMoE,
GPT-OSS with attention sinks, sliding windows and clamped SwiGLU experts). Each is a tiny random model (a byte-level
BPE tokenizer trained here) whose MoE blocks are replaced by :class:`PimoeMoE` (the four pimoe ops, equal to the
Hugging Face block up to float rounding) and exported by :func:`export_test_decoder`, a wrapper around the Hugging
Face model that takes and returns the cache tensors explicitly. Both are TEST code standing in for a cache-carrying
export by the product's importers (pimoe_export/hf/decoder.py exports the forward pass without a cache so far): once
DecoderLM takes the cache, each family's ``build`` runs ``pimoe-export pipeline --model DIR`` instead; the tests do
not change, because both graphs have the standard decoder I/O (pimoe_export/interface.py "decoders").
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from pimoe_export.build.units import package_ort
from pimoe_export.interface import (
    META_CONFIG,
    META_CONTRACT,
    META_GRAPH,
    META_INTERFACE,
    META_PRECISION,
    ONNX_OPSET,
    TOTAL_SEQUENCE_AXIS,
    DecoderSpec,
    decoder_interface,
    decoder_metadata,
)
from pimoe_export.ops.schema import CONTRACT_VERSION

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away", "moe", "expert", "token", "route", "fast"]


@dataclass
class DecoderCase:
    """One family's tiny model: its Hugging Face directory (the reference) and its fp32 ONNX Runtime unit."""

    family: str
    hf_dir: Path
    unit: Path

    def hf_model(self) -> torch.nn.Module:
        import transformers

        return transformers.AutoModelForCausalLM.from_pretrained(str(self.hf_dir)).eval()

    def hf_tokenizer(self):
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.hf_dir))
        tokenizer.padding_side = "left"
        return tokenizer


def train_tokenizer(directory: Path):
    """A byte-level BPE tokenizer (GPT-2 style, BOS added by its post-processor) trained on sentences of WORDS."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(WORDS, 12)) for _ in range(300)]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", padding_side="left",
                                                model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(str(directory))
    return fast


#: the test decoders' sizes: 2 layers, GQA 4:2, H 64, 2048 positions
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
#: config fields over a family's tiny config, by size (this file as a script, for scripts/bench_generate.py):
#: "mid" has Qwen3-30B-A3B's proportions (GQA 4:1, many small experts) cut down to fit a 2-core machine: H 1024,
#: 16:4 heads of 64, 32 experts of width 384, top-4, 2 layers
SIZES: dict[str, dict] = {
    "tiny": {},
    "mid": {"hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
            "intermediate_size": 384, "moe_intermediate_size": 384, "num_experts": 32, "num_local_experts": 32,
            "num_experts_per_tok": 4, "num_hidden_layers": 2},
}

#: each family's transformers config class and the fields of its tiny model beyond TINY (MoE: 4 experts, top-2)
FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama-dense": ("LlamaConfig", {}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    # a shared expert with its sigmoid gate; layer 0 a dense MLP (mlp_only_layers), layer 1 MoE; MHA cache like
    # Qwen1.5-MoE-A2.7B (and OLMoE below): optimum sizes these families' caches with num_attention_heads
    "qwen2_moe": ("Qwen2MoeConfig", {"num_key_value_heads": 4, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 96,
                                     "shared_expert_intermediate_size": 128, "norm_topk_prob": False,
                                     "mlp_only_layers": [0]}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 96,
                                     "norm_topk_prob": True, "head_dim": 16}),
    "olmoe": ("OlmoeConfig", {"num_key_value_heads": 4, "num_experts": 4, "num_experts_per_tok": 2,
                              "norm_topk_prob": False}),
    # attention sinks, alternating sliding-window (8 positions: the prompts cross it) and full layers, biased
    # router (top-k of logits, softmax of the k), clamped SwiGLU experts with biases
    "gpt_oss": ("GptOssConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16,
                                 "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}),
}


def hf_directory(directory: Path, family: str = "llama-dense", seed: int = 0, sizes: dict | None = None) -> Path:
    """A tiny random model of ``family`` (:data:`TINY` and :data:`FAMILY_CONFIGS`, then the config fields of
    ``sizes``) with the tokenizer above, saved as a Hugging Face directory."""
    import transformers

    tokenizer = train_tokenizer(directory)
    torch.manual_seed(seed)
    config_class, extra = FAMILY_CONFIGS[family]
    # initializer_range 0.2: logits far from ties, so greedy tokens do not hinge on float rounding
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), **{**TINY, **extra, **(sizes or {})},
                                                 max_position_embeddings=2048, tie_word_embeddings=False,
                                                 initializer_range=0.2, bos_token_id=1, eos_token_id=2,
                                                 pad_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if family == "gpt_oss":  # its init leaves the router/expert biases and sinks at 0: give them weight
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("_bias", "router.bias", "sinks")):
                    param.normal_(0.0, 0.5)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def llama_directory(directory: Path, seed: int = 0, sizes: dict | None = None) -> Path:
    """The dense test decoder: a tiny Llama (:func:`hf_directory`)."""
    return hf_directory(directory, "llama-dense", seed, sizes)


# ------------------------------------------------------------------------------------------ MoE blocks as pimoe ops
class PimoeMoE(torch.nn.Module):
    """A Hugging Face sparse MoE block as the four pimoe ops (route -> dispatch -> expert_mlp -> combine), the
    shared expert (Qwen2-MoE) in PyTorch beside them. TEST code standing in for the product's family importers
    (pimoe_export/hf, issue 26): the generation machinery only sees the exported graph's decoder I/O."""

    def __init__(self, router_weight: torch.Tensor, router_bias: torch.Tensor | None, k: int, normalize: bool,
                 scoring: str, gate_up: torch.Tensor, gate_up_bias: torch.Tensor | None, down: torch.Tensor,
                 down_bias: torch.Tensor | None, activation: str, returns: str,
                 shared: torch.nn.Module | None = None, shared_gate: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.router_weight = torch.nn.Parameter(router_weight.detach().clone())
        self.router_bias = None if router_bias is None else torch.nn.Parameter(router_bias.detach().clone())
        # gate_up [E, 2I, H] rows [gate; up]; down [E, H, I]
        self.gate_up = torch.nn.Parameter(gate_up.detach().contiguous().clone())
        self.down = torch.nn.Parameter(down.detach().contiguous().clone())
        self.gate_up_bias = None if gate_up_bias is None else torch.nn.Parameter(gate_up_bias.detach().clone())
        self.down_bias = None if down_bias is None else torch.nn.Parameter(down_bias.detach().clone())
        self.k, self.normalize, self.scoring, self.activation, self.returns = k, normalize, scoring, activation, \
            returns
        self.shared, self.shared_gate = shared, shared_gate

    def forward(self, hidden_states: torch.Tensor):
        import pimoe_export.ops.torch_ops  # noqa: F401  (registers torch.ops.pimoe)

        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = torch.nn.functional.linear(x, self.router_weight, self.router_bias)
        experts = self.gate_up.shape[0]
        weights, ids = torch.ops.pimoe.route(logits, None, self.k, self.normalize, self.scoring)
        x_sorted, offsets, flat_to_sorted = torch.ops.pimoe.dispatch(x, ids, experts)
        bias = self.gate_up_bias is not None
        params = [self.gate_up, self.gate_up_bias, self.down, self.down_bias] if bias else [self.gate_up, self.down]
        y_sorted = torch.ops.pimoe.expert_mlp(x_sorted, offsets, params, list(range(experts)),
                                              [shape[-1], self.down.shape[2], shape[-1]], self.activation, False,
                                              1e-5, "none", [], gated=True, bias=bias)
        # "expert" order: Hugging Face's index_add_ over ascending experts
        out = torch.ops.pimoe.combine(y_sorted, flat_to_sorted, weights, "expert")
        if self.shared is not None and self.shared_gate is not None:
            out = out + torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        out = out.reshape(shape)
        if self.returns == "tuple":
            return out, logits
        return out


def _stack_mlps(experts) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [E, 2I, H] and down [E, H, I] of a ModuleList of (gate, up, down) Linear experts."""
    names = ("w1", "w3", "w2") if hasattr(experts[0], "w1") else ("gate_proj", "up_proj", "down_proj")
    gate_up = torch.stack([torch.cat([getattr(e, names[0]).weight, getattr(e, names[1]).weight]) for e in experts])
    down = torch.stack([getattr(e, names[2]).weight for e in experts])
    return gate_up, down


def pimoe_block(block: torch.nn.Module, family: str) -> PimoeMoE:
    """The pimoe-op equivalent of one Hugging Face MoE block of ``family``."""
    if family == "gpt_oss":
        experts = block.experts
        gate_up = torch.cat([experts.gate_up_proj[..., ::2], experts.gate_up_proj[..., 1::2]], dim=2).transpose(1, 2)
        gate_up_bias = torch.cat([experts.gate_up_proj_bias[..., ::2], experts.gate_up_proj_bias[..., 1::2]], dim=1)
        return PimoeMoE(block.router.weight, block.router.bias, block.router.top_k, False, "softmax_topk", gate_up,
                        gate_up_bias, experts.down_proj.transpose(1, 2), experts.down_proj_bias, "swiglu_oai",
                        "tuple")
    gate_up, down = _stack_mlps(block.experts)
    normalize = True if family == "mixtral" else bool(block.norm_topk_prob)
    return PimoeMoE(block.gate.weight, None, block.top_k, normalize, "softmax", gate_up, None, down, None, "silu",
                    "tuple", getattr(block, "shared_expert", None), getattr(block, "shared_expert_gate", None))


def pimoe_decoder(model: torch.nn.Module, family: str) -> torch.nn.Module:
    """``model`` with every MoE block replaced by :class:`PimoeMoE` (in place); a dense family comes back as is."""
    if family == "llama-dense":
        return model
    replaced = 0
    for layer in model.model.layers:
        attribute = "block_sparse_moe" if hasattr(layer, "block_sparse_moe") else "mlp"
        block = getattr(layer, attribute)
        if hasattr(block, "experts"):
            setattr(layer, attribute, pimoe_block(block, family))
            replaced += 1
    assert replaced, f"{family}: no MoE block found"
    return model


def decoder_spec(hf_dir: Path) -> DecoderSpec:
    config = json.loads((hf_dir / "config.json").read_text())
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    eos = generation.get("eos_token_id", config["eos_token_id"])
    heads = config["num_attention_heads"]
    return DecoderSpec(model_type=config["model_type"], num_layers=config["num_hidden_layers"],
                       num_attention_heads=heads, num_kv_heads=config["num_key_value_heads"],
                       head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                       hidden_size=config["hidden_size"], vocab_size=config["vocab_size"],
                       context_length=config["max_position_embeddings"],
                       eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]),
                       pad_token_id=config.get("pad_token_id") or 0, bos_token_id=config.get("bos_token_id"))


class _CacheWrapper(torch.nn.Module):
    """The Hugging Face model with its cache as explicit tensors: (ids, mask, positions, past...) -> (logits,
    present...)."""

    def __init__(self, model: torch.nn.Module, layers: int) -> None:
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def export_test_decoder(model: torch.nn.Module, spec: DecoderSpec, path: Path) -> Path:
    """TEST-only export of a Hugging Face decoder with the standard KV-cache I/O and the pimoe metadata a decoder
    unit needs (see the module docstring)."""
    model.config._attn_implementation = "eager"
    interface = decoder_interface(spec)
    batch, past_len, seq = 2, 3, 5
    example = (torch.randint(3, spec.vocab_size, (batch, seq)), torch.ones(batch, past_len + seq, dtype=torch.long),
               torch.arange(past_len, past_len + seq).expand(batch, seq),
               tuple(torch.randn(batch, spec.num_kv_heads, past_len, spec.head_dim) for _ in spec.past_names))
    dim = torch.export.Dim
    b, s, p, t = dim("batch", max=256), dim("sequence", max=4096), dim("past_sequence", max=4096), \
        dim("total_sequence", max=8192)
    from pimoe_export.ops.onnx_translation import custom_translation_table

    torch.onnx.export(_CacheWrapper(model, spec.num_layers).eval(), example, str(path), dynamo=True,
                      custom_translation_table=custom_translation_table(),
                      opset_version=ONNX_OPSET, input_names=list(interface.input_names),
                      output_names=list(interface.output_names), external_data=False, optimize=True,
                      dynamic_shapes=({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s},
                                      tuple({0: b, 2: p} for _ in spec.past_names)))
    proto = onnx.load(str(path))
    for output in proto.graph.output[1:]:  # "past_sequence + sequence" -> the interface's axis name
        output.type.tensor_type.shape.dim[2].dim_param = TOTAL_SEQUENCE_AXIS
    metadata = {META_CONFIG: json.dumps({"model": type(model).__name__, "layers": {}}),
                META_INTERFACE: json.dumps(interface.to_dict()), META_PRECISION: "fp32", META_GRAPH: "custom-ops",
                META_CONTRACT: str(CONTRACT_VERSION), **decoder_metadata(spec)}
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(path))
    return path


def sliding_window(hf_dir: Path) -> int | None:
    """The model's attention window when some of its layers attend through one (None: all layers see everything)."""
    config = json.loads((hf_dir / "config.json").read_text())
    windowed = "sliding_attention" in (config.get("layer_types") or []) or (
        config.get("use_sliding_window", True) and config["model_type"] in ("mistral", "mixtral"))
    return config.get("sliding_window") if windowed else None


def build_family(family: str, root: Path, sizes: dict | None = None) -> DecoderCase:
    """``family``'s tiny Hugging Face directory and its fp32 ONNX Runtime unit (MoE blocks as pimoe ops)."""
    hf_dir = hf_directory(root / "hf", family, sizes=sizes)
    spec = decoder_spec(hf_dir)
    model = pimoe_decoder(DecoderCase("", hf_dir, root).hf_model(), family)
    onnx_path = export_test_decoder(model, spec, root / "model.onnx")
    package_ort(onnx_path, root / "ort-fp32", client_dir=hf_dir)
    return DecoderCase(family, hf_dir, root / "ort-fp32")


def int8_unit(case: DecoderCase) -> Path:
    """The W8A8-dynamic decoder next to ``case``'s fp32 one (``model.int8.onnx`` and the ``ort-int8`` unit): every
    expert group quantised from the fp32 graph's own weights (pimoe_export.quantize.int8), built once."""
    from pimoe_export.quantize.int8 import dynamic_params_from_onnx, write_int8_onnx

    root = case.unit.parent
    if not (root / "ort-int8").is_dir():
        onnx_path = write_int8_onnx(root / "model.onnx", dynamic_params_from_onnx(root / "model.onnx"),
                                    root / "model.int8.onnx")
        package_ort(onnx_path, root / "ort-int8", client_dir=case.hf_dir)
    return root / "ort-int8"


def build_llama_dense(root: Path, sizes: dict | None = None) -> DecoderCase:
    return build_family("llama-dense", root, sizes)


#: every decoder family the generation tests run on, and how its case is built (see the module docstring)
FAMILIES: dict[str, Callable[[Path], DecoderCase]] = {
    family: (lambda root, family=family: build_family(family, root)) for family in FAMILY_CONFIGS}


if __name__ == "__main__":  # python tests/decoders.py --family F --size S -o DIR (the benchmark's models)
    import argparse

    parser = argparse.ArgumentParser(description="build a test decoder family's model and fp32 unit")
    parser.add_argument("--family", choices=sorted(FAMILY_CONFIGS), required=True)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("-o", "--output", type=Path, required=True, help="a new directory: hf/, model.onnx, ort-fp32/")
    args = parser.parse_args()
    args.output.mkdir(parents=True)
    case = build_family(args.family, args.output, SIZES[args.size])
    print(f"{case.hf_dir}\n{case.unit}")
