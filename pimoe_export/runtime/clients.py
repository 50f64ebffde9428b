"""A decoder unit in Hugging Face optimum's ``ORTModelForCausalLM``, loaded the way it generates right.

optimum-onnx 0.1.0 needs two things it cannot find out by itself (docs/generation.md):

- our op library, registered in the session options it is given;
- the shape of the empty cache it feeds the first step: it takes ``num_key_value_heads`` only for the model types
  on its grouped-query list and ``num_attention_heads`` otherwise, and ``hidden_size / num_attention_heads`` as the
  head dim, so a grouped-query Mixtral, DBRX, Granite-MoE or Llama 4 unit is refused by ONNX Runtime at the first
  step. :func:`optimum_causal_lm` sets both from the unit's :class:`~pimoe_export.interface.DecoderSpec`.

Keys and values of different head dims (multi-head latent attention) are sized by optimum for ``deepseek_v3``
only; any other such unit (``deepseek_v2``) is refused here with the reason, where optimum would fail mid-generate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pimoe_export.errors import BackendUnavailableError, PiMoEInputError

#: the only model type optimum-onnx 0.1.0 gives keys and values of different head dims (modeling_decoder.py)
OPTIMUM_MLA_TYPES = frozenset({"deepseek_v3"})


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
    if spec.value_head_dim != spec.head_dim and spec.model_type not in OPTIMUM_MLA_TYPES:
        raise PiMoEInputError(f"optimum-onnx sizes the first empty cache of model type {spec.model_type!r} with one "
                              f"head dim, but this unit caches keys of {spec.head_dim} and values of "
                              f"{spec.value_head_dim}: generate with Engine.generate or `pimoe-export serve`")
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
    if spec.value_head_dim == spec.head_dim:  # what optimum sizes the first step's empty past with
        model.num_key_value_heads = spec.num_kv_heads
        model.embed_size_per_head = spec.head_dim
    return model
