"""Decoder units for the generation tests (the decoder_case fixture of tests/conftest.py), one per decoder family.

``FAMILIES`` lists the decoder families every generation test runs on. Today it holds the dense test decoder: a tiny
Llama built from a transformers config (random weights, a byte-level BPE tokenizer trained here: no download),
exported by :func:`export_test_decoder`, a wrapper around the Hugging Face model that takes and returns the cache
tensors explicitly. That exporter is TEST code standing in for the product's decoder exporter (the MoE families of
issue 26): when it lands, each MoE family joins ``FAMILIES`` with a ``build`` that runs ``pimoe-export export DIR``
and ``package`` instead; the tests do not change, because both graphs have the standard decoder I/O
(pimoe_export/interface.py "decoders").
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


#: the test decoder's sizes: 2 layers, GQA 4:2, H 64, 2048 positions (scripts/bench_generate.py's --size takes others)
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}


def llama_directory(directory: Path, seed: int = 0, sizes: dict | None = None) -> Path:
    """A tiny Llama (:data:`TINY`, or ``sizes``) with the tokenizer above, saved as a Hugging Face directory."""
    import transformers

    tokenizer = train_tokenizer(directory)
    torch.manual_seed(seed)
    # initializer_range 0.2: logits far from ties, so greedy tokens do not hinge on float rounding
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), **(sizes or TINY),
                                      max_position_embeddings=2048, tie_word_embeddings=False, initializer_range=0.2,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


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
    torch.onnx.export(_CacheWrapper(model, spec.num_layers).eval(), example, str(path), dynamo=True,
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


def build_llama_dense(root: Path, sizes: dict | None = None) -> DecoderCase:
    hf_dir = llama_directory(root / "hf", sizes=sizes)
    spec = decoder_spec(hf_dir)
    onnx_path = export_test_decoder(DecoderCase("", hf_dir, root).hf_model(), spec, root / "model.onnx")
    package_ort(onnx_path, root / "ort-fp32", client_dir=hf_dir)
    return DecoderCase("llama-dense", hf_dir, root / "ort-fp32")


#: every decoder family the generation tests run on, and how its case is built (see the module docstring)
FAMILIES: dict[str, Callable[[Path], DecoderCase]] = {"llama-dense": build_llama_dense}
