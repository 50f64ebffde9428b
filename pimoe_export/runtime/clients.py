"""A decoder unit in Hugging Face optimum's ``ORTModelForCausalLM``, loaded the way it generates right.

optimum-onnx 0.1.0 needs two things it cannot find out by itself (docs/generation.md):

- our op library, registered in the session options it is given;
- the shape of the empty cache it feeds the first step: it takes ``num_key_value_heads`` only for the model types
  on its grouped-query list and ``num_attention_heads`` otherwise, and ``hidden_size / num_attention_heads`` as the
  head dim, so a grouped-query Mixtral, DBRX, Granite-MoE or Llama 4 unit is refused by ONNX Runtime at the first
  step. :func:`optimum_causal_lm` sets both from the unit's :class:`~pimoe_export.interface.DecoderSpec`.

Keys and values of different head dims (multi-head latent attention: DeepSeek-V2 and V3) are sized by optimum under
one model type only, ``deepseek_v3`` (keys of ``qk_head_dim``, values of ``v_head_dim``, on the first step's empty
past and on the shapes it binds each step's present to); any other type gets one head dim for both, which ONNX
Runtime refuses at the first step. For such a unit (``deepseek_v2``) the loader sets that type on the loaded
model's own config object (the unit's config.json is untouched; a ``save_pretrained`` of the returned model would
write that type), together with the two head dims from the DecoderSpec: optimum then feeds and binds the cache
exactly as the graph declares it. optimum reads the type for nothing else on a unit whose graph has
``position_ids`` and a plain (not merged) cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pimoe_export.errors import BackendUnavailableError, PiMoEInputError

#: the model type under which optimum-onnx 0.1.0 gives keys and values different head dims (modeling_decoder.py)
OPTIMUM_MLA_TYPE = "deepseek_v3"


def optimum_causal_lm(unit: str | Path, *, threads: int | None = None, **kwargs: Any) -> Any:
    """``optimum.onnxruntime.ORTModelForCausalLM`` on a decoder unit (``kwargs`` go to its ``from_pretrained``, e.g.
    ``use_io_binding``): our op library in its session options and its first step's empty cache sized as the unit's
    graph takes it (see the module docstring)."""
    from pimoe_export.artifacts.manifest import read_manifest
    from pimoe_export.native.libraries import ORT_LIBRARY_NAME
    from pimoe_export.runtime.ort import session_options

    unit = Path(unit)
    spec = read_manifest(unit).decoder_spec
    if spec is None:
        raise PiMoEInputError(f"{unit} is not a decoder unit (its manifest has no decoder description): optimum's "
                              f"ORTModelForCausalLM needs a graph with a key/value cache (pimoe-export pipeline "
                              f"--model DIR writes one)")
    if "session_options" in kwargs:
        raise PiMoEInputError("optimum_causal_lm makes the session options itself (with the unit's op library): "
                              "pass threads=N instead of session_options")
    try:
        from optimum.onnxruntime import ORTModelForCausalLM
    except ImportError as exc:
        raise BackendUnavailableError(f"optimum-onnx is not installed ({exc}): pip install "
                                      f"'pimoe-export[llm-clients]'") from None
    options = session_options(threads, unit / ORT_LIBRARY_NAME)
    model = ORTModelForCausalLM.from_pretrained(str(unit), session_options=options, **kwargs)
    # what optimum sizes the first step's empty past and binds the presents with
    model.num_key_value_heads = spec.num_kv_heads
    if spec.value_head_dim == spec.head_dim:
        model.embed_size_per_head = spec.head_dim
    else:
        model.config.model_type = OPTIMUM_MLA_TYPE
        model.qk_head_dim, model.v_head_dim = spec.head_dim, spec.value_head_dim
    return model
