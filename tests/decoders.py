"""Decoder units for the generation tests (the decoder_case fixture of tests/conftest.py), one per decoder family.

``FAMILIES`` lists the decoder families every generation test runs on: every family of the model-directory
importers (pimoe_export/hf), DeepSeek-V2/V3 included (their multi-head latent attention caches keys and values of
different head dims: DecoderSpec.value_head_dim, docs/generation.md). Each is the family's tiny random model
(tests/hf/tiny_decoders.py, with the overrides of :data:`GENERATION_OVERRIDES` and a byte-level BPE tokenizer trained
here) saved as a Hugging Face directory, and its units are built by the product's path, the library calls of
``pimoe-export pipeline --model DIR``: the importer's source (``load_source``: a DecoderLM that takes and returns the
cache), ``export_source`` (model.onnx), ``quantize_model`` (model.int8.onnx, W8A8 experts) and ``package_ort`` with
the directory's tokenizer and config files (ort-fp32/, ort-int8/).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

if str(Path(__file__).parent / "hf") not in sys.path:  # run as a script (tests/conftest.py adds it under pytest)
    sys.path.insert(0, str(Path(__file__).parent / "hf"))
from tiny_decoders import TINY, tiny_config

from pimoe_export.build.units import package_ort

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


#: every generation model over its family's tiny config: initializer_range 0.2 (logits far from ties, so greedy
#: tokens do not hinge on float rounding), untied embeddings, the tokenizer's special tokens (pad 0, BOS 1, EOS 2),
#: a context of 2048 positions (room for the serve tests' long streams)
GENERATION_COMMON = {"initializer_range": 0.2, "tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 1,
                     "eos_token_id": 2, "max_position_embeddings": 2048}
#: per family: Llama 4 attends in chunks of 8 positions on its rotary layer (the prompts cross a chunk boundary)
#: and without rotary embeddings (NoPE) on the other; Qwen2-MoE and OLMoE with an MHA cache, as their released
#: models (Qwen1.5-MoE-A2.7B, OLMoE-1B-7B) have it; GPT-OSS's YaRN factor 2 over 1024 of the 2048 positions;
#: DeepSeek-V2/V3 with a value head dim (12) apart from the keys' (qk_nope 8 + qk_rope 8 = 16), as their released
#: models have it (192 and 128)
GENERATION_OVERRIDES: dict[str, dict] = {
    "llama4_text": {"attention_chunk_size": 8, "no_rope_layers": [1, 0]},
    "qwen2_moe": {"num_key_value_heads": 4}, "olmoe": {"num_key_value_heads": 4},
    "gpt_oss": {"rope_scaling": {**TINY["gpt_oss"][1]["rope_scaling"], "original_max_position_embeddings": 1024}},
    "deepseek_v2": {"v_head_dim": 12}, "deepseek_v3": {"v_head_dim": 12},
}
#: config fields over a family's generation model, by size (this file as a script, for scripts/bench_generate.py):
#: "mid" has Qwen3-30B-A3B's proportions (GQA 4:1, many small experts) cut down to fit a 2-core machine: H 1024,
#: 16:4 heads of 64, 32 experts of width 384, top-4, 2 layers
SIZES: dict[str, dict] = {
    "tiny": {},
    "mid": {"hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
            "intermediate_size": 384, "moe_intermediate_size": 384, "num_experts": 32, "num_local_experts": 32,
            "num_experts_per_tok": 4, "num_hidden_layers": 2},
}

def hf_directory(directory: Path, family: str, seed: int = 0, sizes: dict | None = None) -> Path:
    """A tiny random model of ``family`` (tests/hf/tiny_decoders.py's config, then :data:`GENERATION_COMMON`,
    :data:`GENERATION_OVERRIDES` and ``sizes``) with the tokenizer above, saved as a Hugging Face directory."""
    import transformers

    tokenizer = train_tokenizer(directory)
    torch.manual_seed(seed)
    config = tiny_config(family, vocab_size=len(tokenizer), **GENERATION_COMMON,
                         **GENERATION_OVERRIDES.get(family, {}), **(sizes or {}))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if family == "gpt_oss" and name.endswith(("_bias", "router.bias", "sinks")):
                param.normal_(0.0, 0.5)  # its init leaves the router/expert biases and sinks at 0: give them weight
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def sliding_window(hf_dir: Path) -> int | None:
    """The model's attention window when some of its layers attend through one, or in chunks (Llama 4); None: all
    layers see everything."""
    config = json.loads((hf_dir / "config.json").read_text())
    windowed = "sliding_attention" in (config.get("layer_types") or []) or (
        config.get("use_sliding_window", True) and config["model_type"] in ("mistral", "mixtral"))
    if config["model_type"] == "llama4_text" and any(config.get("no_rope_layers") or []):
        return config.get("attention_chunk_size")
    return config.get("sliding_window") if windowed else None


def build_family(family: str, root: Path, sizes: dict | None = None) -> DecoderCase:
    """``family``'s tiny Hugging Face directory and its fp32 ONNX Runtime unit, by the product's path (see the
    module docstring): ``root``/hf, ``root``/model.onnx, ``root``/ort-fp32."""
    from pimoe_export.export.exporter import export_source
    from pimoe_export.hf.importers import load_source

    hf_dir = hf_directory(root / "hf", family, sizes=sizes)
    source = load_source(hf_dir)
    assert source.module.spec is not None, f"{family}: {source.module.cache_refusal}"
    onnx_path = export_source(source, root / "model.onnx").path
    package_ort(onnx_path, root / "ort-fp32", client_dir=hf_dir)
    return DecoderCase(family, hf_dir, root / "ort-fp32")


def int8_unit(case: DecoderCase) -> Path:
    """The INT8 decoder next to ``case``'s fp32 one (``model.int8.onnx`` and the ``ort-int8`` unit), built once as
    ``pimoe-export pipeline --model DIR --int8-mode w8a8_dynamic`` builds it: the importer's source calibrated on its
    default feeds (``quantize_model``), every expert group W8A8 with per-row activation scales."""
    from pimoe_export.hf.importers import load_source
    from pimoe_export.quantize import quantize_model

    root = case.unit.parent
    if not (root / "ort-int8").is_dir():
        source = load_source(case.hf_dir)
        result = quantize_model(source, root / "model.int8.onnx", method=source.settings.calibration_method,
                                fp32_onnx=root / "model.onnx", mode="w8a8_dynamic")
        package_ort(result.onnx_path, root / "ort-int8", client_dir=case.hf_dir)
    return root / "ort-int8"


#: every decoder family the generation tests run on, and how its case is built (see the module docstring)
FAMILIES: dict[str, Callable[[Path], DecoderCase]] = {
    family: (lambda root, family=family: build_family(family, root)) for family in TINY}


if __name__ == "__main__":  # python tests/decoders.py --family F --size S -o DIR (the benchmark's models)
    import argparse

    parser = argparse.ArgumentParser(description="build a decoder family's tiny model and its fp32 unit")
    parser.add_argument("--family", choices=sorted(FAMILIES), required=True)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("-o", "--output", type=Path, required=True, help="a new directory: hf/, model.onnx, ort-fp32/")
    args = parser.parse_args()
    args.output.mkdir(parents=True)
    case = build_family(args.family, args.output, SIZES[args.size])
    print(f"{case.hf_dir}\n{case.unit}")
