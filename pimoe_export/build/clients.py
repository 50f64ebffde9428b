"""The files a decoder unit ships so that the LLM clients people use load the same directory.

- Hugging Face optimum (``optimum-onnx``'s ``ORTModelForCausalLM.from_pretrained(UNIT, session_options=...)``, our
  op library registered in the session options): reads ``config.json`` (the model's own, with its ``model_type``),
  ``generation_config.json`` when present, and finds ``model.onnx`` with the standard KV-cache I/O.
- ONNX Runtime GenAI (``og.Model(UNIT)``): reads ``genai_config.json``, written here from the unit's
  :class:`~pimoe_export.interface.DecoderSpec`; its decoder session options name our op library
  (``custom_ops_library``, a path relative to the unit: GenAI refuses one outside the model directory). GenAI has
  one ``head_size`` for the key and the value cache: a unit whose values have another head dim (DeepSeek-V2/V3's
  multi-head latent attention) gets no genai_config.json (:func:`genai_refusal` says why; the unit's manifest
  records it), rather than one that would size its value cache wrong.
- Text in and out (``Engine.generate``, ``serve``, both clients' tokenizers): ``tokenizer.json``,
  ``tokenizer_config.json``, ``special_tokens_map.json``.

docs/generation.md says what each client needs and what was tested.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pimoe_export._files import read_json
from pimoe_export.errors import ArtifactError
from pimoe_export.interface import (
    DECODER_LOGITS,
    DECODER_POSITIONS_INPUT,
    MODEL_IDS_INPUT,
    MODEL_MASK_INPUT,
    PAST_TEMPLATE,
    PRESENT_TEMPLATE,
    DecoderSpec,
)

#: ONNX Runtime GenAI 0.18's decoder model types (its config's "type"); any other standard decoder runs as its
#: generic "decoder" type, which reads the same I/O
GENAI_MODEL_TYPES = ("chatglm", "ernie4_5", "gemma", "gemma2", "gemma3_text", "granite", "internlm2", "llama",
                     "mistral", "nemotron", "olmo", "phi3", "phimoe", "qwen2", "qwen3", "smollm3")
GENAI_GENERIC_TYPE = "decoder"


def genai_search(generation_config: dict[str, Any], context_length: int) -> dict[str, Any]:
    """GenAI's "search" settings: greedy unless the model's generation_config.json says to sample."""
    sample = bool(generation_config.get("do_sample", False))
    return {"do_sample": sample, "num_beams": 1, "num_return_sequences": 1, "max_length": context_length,
            "min_length": 0, "temperature": float(generation_config.get("temperature") or 1.0),
            "top_k": int(generation_config.get("top_k") or (50 if sample else 1)),
            "top_p": float(generation_config.get("top_p") or 1.0), "repetition_penalty": 1.0,
            "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0, "early_stopping": True,
            # our graphs concatenate the cache (present = past + new): GenAI must not share one buffer for both
            "past_present_share_buffer": False}


def genai_refusal(spec: DecoderSpec) -> str | None:
    """Why genai_config.json cannot describe the decoder of ``spec`` (None: it can)."""
    if spec.value_head_dim != spec.head_dim:
        return (f"ONNX Runtime GenAI's genai_config.json has one head_size for keys and values; this decoder caches "
                f"keys of head dim {spec.head_dim} and values of {spec.value_head_dim} (multi-head latent "
                "attention): no genai_config.json is written (run it with Engine.generate or serve)")
    return None


def genai_config(spec: DecoderSpec, onnx_file: str, library_file: str,
                 generation_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """genai_config.json for a unit whose ONNX is ``onnx_file`` and op library ``library_file`` (both relative to
    the unit); ArtifactError where GenAI cannot describe the decoder (:func:`genai_refusal`)."""
    reason = genai_refusal(spec)
    if reason is not None:
        raise ArtifactError(reason)
    model_type = spec.model_type if spec.model_type in GENAI_MODEL_TYPES else GENAI_GENERIC_TYPE
    eos = list(spec.eos_token_ids)
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": [], "custom_ops_library": library_file},
        "filename": onnx_file, "head_size": spec.head_dim, "hidden_size": spec.hidden_size,
        "num_attention_heads": spec.num_attention_heads, "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": spec.num_kv_heads,
        # GenAI keys each standard input and output by its standard name, the cache by printf templates
        "inputs": {**{name: name for name in (MODEL_IDS_INPUT, MODEL_MASK_INPUT, DECODER_POSITIONS_INPUT)},
                   "past_key_names": PAST_TEMPLATE.format(kind="key"),
                   "past_value_names": PAST_TEMPLATE.format(kind="value")},
        "outputs": {DECODER_LOGITS: DECODER_LOGITS, "present_key_names": PRESENT_TEMPLATE.format(kind="key"),
                    "present_value_names": PRESENT_TEMPLATE.format(kind="value")},
    }
    model = {"type": model_type, "context_length": spec.context_length, "vocab_size": spec.vocab_size,
             "bos_token_id": spec.bos_token_id if spec.bos_token_id is not None else eos[0],
             "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": spec.pad_token_id,
             "decoder": decoder}
    return {"model": model, "search": genai_search(generation_config or {}, spec.context_length)}


def read_generation_config(path: Path | None) -> dict[str, Any]:
    """The model's generation_config.json (an empty dict without one)."""
    if path is None or not path.is_file():
        return {}
    data = read_json(path, "generation config", "fix or remove it")
    return data if isinstance(data, dict) else {}
