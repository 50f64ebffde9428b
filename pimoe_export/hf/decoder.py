"""Hugging Face MoE decoders as exportable models: a causal LM whose sparse-MoE blocks are MoE blocks.

    config.json ─► refusals (remote code, quantised weights, families and features outside the contract)
                ─► the Hugging Face model built with its parameters on the meta device (nothing allocated)
                ─► checkpoint headers checked against it (names, shapes, dtypes), host memory checked
                ─► every MoE block: a MoEBlock filled tensor by tensor (pimoe_export.hf.families)
                ─► every other weight: read tensor by tensor, as float32
                ─► DecoderLM: input_ids, attention_mask, position_ids, past_key_values.<i>.key/value
                              -> logits, present.<i>.key/value
                ─► its DecoderSpec (pimoe_export/interface.py "decoders"): the cache geometry read off one probe
                   step of the model, the vocabulary, context length and special tokens from its config

The graph interface is :class:`DecoderInterface`: the names optimum and ONNX Runtime GenAI use. One graph serves
prefill and decode: :meth:`DecoderLM.forward` takes the past key/value tensors as named inputs (a prompt: an empty
past), hands them to Hugging Face as a cache (every layer a full-length cache layer; sliding windows, chunked
attention and sinks stay in Hugging Face's masks and attention) and returns the present ones (past + new).

The cache is one key and one value tensor per layer, every layer's keys of the same [kv_heads, head_dim] and its
values of the same [kv_heads, value head dim]: DeepSeek-V2/V3's multi-head latent attention caches keys of
qk_nope_head_dim + qk_rope_head_dim and values of v_head_dim (DecoderSpec.value_head_dim; ONNX Runtime GenAI's
genai_config.json, with one head_size, cannot describe it: build/clients.py). A model whose cache does not fit
(layers that differ from each other, keys and values of different head counts, no EOS token) keeps the forward
pass without a cache, with the reason in :attr:`DecoderLM.cache_refusal`.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pimoe_export.errors import PiMoEError, PiMoEInputError
from pimoe_export.hf.families import BY_MODEL_TYPE, Family, refusal
from pimoe_export.hf.weights import SafetensorsCheckpoint, read_config
from pimoe_export.interface import (
    KV_KINDS,
    MODEL_IDS_INPUT,
    MODEL_LOGITS_OUTPUT,
    MODEL_MASK_INPUT,
    MODEL_POSITIONS_INPUT,
    DecoderSpec,
    past_name,
    past_names,
    present_name,
    present_names,
)
from pimoe_export.model.moe_block import MoEBlock, MoEBlockConfig


@dataclass(frozen=True)
class DecoderInterface:
    """The named inputs and outputs of a decoder graph. ``cache_layers`` > 0 (issue 27) adds the key/value cache:
    ``past_key_values.<i>.key/value`` inputs and ``present.<i>.key/value`` outputs for each of the layers."""

    cache_layers: int = 0

    @property
    def inputs(self) -> tuple[str, ...]:
        return (MODEL_IDS_INPUT, MODEL_MASK_INPUT, MODEL_POSITIONS_INPUT, *past_names(self.cache_layers))

    @property
    def outputs(self) -> tuple[str, ...]:
        return (MODEL_LOGITS_OUTPUT, *present_names(self.cache_layers))


# ------------------------------------------------------------------------------------------ real-valued rotary
def _real_rotary_forward(self: Any, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Llama 4 / DeepSeek-V2 rotary embedding with (cos, sin) pairs [B, S, D/2, 2] in place of complex numbers."""
    inv_freq = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
    freqs = (inv_freq.to(x.device) @ position_ids[:, None, :].float()).transpose(1, 2)
    return torch.stack([torch.cos(freqs), torch.sin(freqs)], dim=-1) * self.attention_scaling


def _rotate(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x [..., D] as D/2 complex pairs times cos_sin [..., D/2, 2] (broadcast), the complex product in reals."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos_sin[..., 0], cos_sin[..., 1]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).type_as(x)


def _llama4_apply(xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = freqs[:, :, None, :, :]  # x: [B, S, heads, D]
    return _rotate(xq, freqs), _rotate(xk, freqs)


def _deepseek_v2_apply(xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = freqs.unsqueeze(1)  # x: [B, heads, S, D]
    return _rotate(xq, freqs), _rotate(xk, freqs)


_ROPE = {"llama4": ("Llama4TextRotaryEmbedding", _llama4_apply),
         "deepseek_v2": ("DeepseekV2RotaryEmbedding", _deepseek_v2_apply)}


@contextlib.contextmanager
def real_rope(module_name: str | None) -> Iterator[None]:
    """While a DecoderLM runs, the family's complex-valued rotary embedding (``torch.polar``, ``view_as_complex``:
    no ONNX type) computes the same products on (cos, sin) pairs. Patched for the duration of the call only, so the
    unmodified Hugging Face model elsewhere in the process is untouched (not thread-safe against one running at the
    same time in another thread)."""
    if module_name is None:
        yield
        return
    from transformers.modeling_rope_utils import dynamic_rope_update

    module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    rotary_name, apply = _ROPE[module_name]
    rotary = getattr(module, rotary_name)
    saved = rotary.forward, module.apply_rotary_emb
    rotary.forward, module.apply_rotary_emb = dynamic_rope_update(_real_rotary_forward), apply
    try:
        yield
    finally:
        rotary.forward, module.apply_rotary_emb = saved


class DecoderLM(nn.Module):
    """A Hugging Face causal LM as one graph exports it: ``forward(input_ids, attention_mask, position_ids,
    **past)`` -> the logits [B, S, vocab] and each layer's present key and value by name (see the module
    docstring); without a cache (:attr:`spec` None) just the logits.

    The Hugging Face model's children are this module's children (module paths read as Hugging Face's:
    ``model.layers.1.mlp``), so routing outputs are named after them."""

    def __init__(self, model: nn.Module, family: Family) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_hf", model)  # not a submodule: its children are this module's
        self.family = family
        self.interface = DecoderInterface()
        self.spec: DecoderSpec | None = None
        self.cache_refusal: str | None = None

    @property
    def config(self) -> Any:
        return self._hf.config

    def use_cache(self, spec: DecoderSpec | None, refusal: str | None = None) -> None:
        """Take and return the cache of ``spec`` from now on (None: the forward pass alone, ``refusal`` says why)."""
        self.spec, self.cache_refusal = spec, refusal
        self.interface = DecoderInterface(spec.num_layers if spec is not None else 0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                **past: torch.Tensor) -> dict[str, torch.Tensor]:
        layers = self.interface.cache_layers
        unknown = sorted(set(past) - set(past_names(layers)))
        if unknown:
            raise TypeError(f"DecoderLM got inputs {unknown} that its interface {self.interface.inputs} lacks")
        cache = None
        if layers:
            from transformers import DynamicCache

            missing = sorted(set(past_names(layers)) - set(past))
            if past and missing:  # a partial cache would give the layers different past lengths
                raise TypeError(f"DecoderLM got part of the key/value cache: {missing} missing (give every "
                                f"past_key_values input, or none for a prompt)")
            cache = DynamicCache()  # full-length layers: the graph returns past + new for every layer
            for i in range(layers if past else 0):
                cache.update(past[past_name(i, "key")], past[past_name(i, "value")], i)
        with real_rope(self.family.rope):
            out = self._hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           past_key_values=cache, use_cache=bool(layers), return_dict=True)
        result = {MODEL_LOGITS_OUTPUT: out.logits}
        if layers:
            for i, layer in enumerate(out.past_key_values.layers):
                result[present_name(i, "key")], result[present_name(i, "value")] = layer.keys, layer.values
        return result


def cache_geometry(model: DecoderLM) -> tuple[int, int, int, int] | str:
    """(layers, kv_heads, key head_dim, value head_dim) of the model's key/value cache, read off one two-token step
    of the Hugging Face model; a string: why the cache does not fit the standard decoder I/O (see the module
    docstring)."""
    from transformers import DynamicCache

    ids = torch.zeros((1, 2), dtype=torch.long)
    with torch.no_grad(), real_rope(model.family.rope):
        out = model._hf(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(2)[None],
                        past_key_values=DynamicCache(), use_cache=True, return_dict=True)
    layers = list(out.past_key_values.layers)
    if any(getattr(layer, "keys", None) is None or getattr(layer, "values", None) is None for layer in layers):
        return "some of its layers keep no key/value cache, which the standard decoder I/O has for every layer"
    shapes = {(tuple(layer.keys.shape[1:2] + layer.keys.shape[3:]), tuple(layer.values.shape[1:2] +
                                                                           layer.values.shape[3:]))
              for layer in layers}
    if len(shapes) != 1:
        return f"its layers cache keys/values of different [kv_heads, head_dim] {sorted(shapes)}"
    (key_heads, key_dim), (value_heads, value_dim) = next(iter(shapes))
    if key_heads != value_heads:
        return (f"its cache holds keys of {key_heads} heads x {key_dim} and values of {value_heads} heads x "
                f"{value_dim}: a decoder unit records one KV head count for both")
    return len(layers), key_heads, key_dim, value_dim


def _token_ids(value: Any) -> tuple[int, ...]:
    values = value if isinstance(value, list | tuple) else [] if value is None else [value]
    return tuple(v for v in values if isinstance(v, int) and not isinstance(v, bool))


def decoder_spec(model: DecoderLM, directory: Path) -> DecoderSpec | str:
    """The DecoderSpec of a loaded model (special tokens: generation_config.json over config.json); a string: why
    the model keeps the forward pass without a cache."""
    from pimoe_export._files import read_json

    geometry = cache_geometry(model)
    if isinstance(geometry, str):
        return geometry
    layers, kv_heads, head_dim, value_head_dim = geometry
    config = model.config
    generation: dict[str, Any] = {}
    if (directory / "generation_config.json").is_file():
        data = read_json(directory / "generation_config.json", "generation config", "fix or remove it")
        generation = data if isinstance(data, dict) else {}
    eos = _token_ids(generation.get("eos_token_id", config.eos_token_id)) or _token_ids(config.eos_token_id)
    if not eos:
        return ("its config names no eos_token_id, so generation could not end a row; set eos_token_id in "
                "config.json or generation_config.json")
    bos = _token_ids(generation.get("bos_token_id", config.bos_token_id))
    pad = _token_ids(generation.get("pad_token_id", config.pad_token_id))
    try:
        return DecoderSpec(model_type=model.family.model_type, num_layers=layers,
                           num_attention_heads=int(config.num_attention_heads), num_kv_heads=kv_heads,
                           head_dim=head_dim, value_head_dim=value_head_dim, hidden_size=int(config.hidden_size),
                           vocab_size=int(config.vocab_size), context_length=int(config.max_position_embeddings),
                           eos_token_ids=eos, pad_token_id=pad[0] if pad else 0,
                           bos_token_id=bos[0] if bos else None)
    except (PiMoEError, AttributeError, TypeError, ValueError) as exc:  # ArtifactError: a value outside what a
        # decoder unit records; the others: a config without (or with a non-integer) head count, size or context
        return f"its config does not describe a decoder unit ({exc})"


# ------------------------------------------------------------------------------------------ reading a directory
@dataclass
class Plan:
    """What the importer will build, decided before anything is allocated."""

    family: Family
    config: Any  # the Hugging Face config object
    skeleton: nn.Module  # the Hugging Face model, parameters on the meta device
    moe_layers: dict[str, str]  # decoder-layer prefix -> block attribute
    block: MoEBlockConfig
    expected: dict[str, tuple[int, ...]]  # checkpoint tensor -> shape
    tied: tuple[str, ...]  # tensors the checkpoint may omit (tied to another)
    ignored: tuple[str, ...]  # checkpoint tensors outside the forward (e.g. DeepSeek-V3's MTP layer)


def family_of(directory: Path) -> tuple[Family, dict[str, Any]]:
    """The family of a Hugging Face model directory and its raw config; PiMoEInputError naming what is refused."""
    data = read_config(directory)
    reason = refusal(data)
    if reason is not None:
        raise PiMoEInputError(f"{directory}: {reason}")
    return BY_MODEL_TYPE[data["model_type"]], data


def hf_config(family: Family, data: dict[str, Any]) -> Any:
    """The Hugging Face config object of ``data`` (no file or hub access, no remote code), eager attention, fp32."""
    from pimoe_export.hf.checkpoint import require_transformers

    transformers = require_transformers()
    config_class = transformers.AutoConfig.for_model(family.model_type).__class__
    try:
        config = config_class.from_dict(dict(data))
    except (TypeError, ValueError, KeyError) as exc:
        raise PiMoEInputError(f"config.json is not a valid {family.name} config ({type(exc).__name__}: {exc})") \
            from None
    config._attn_implementation = "eager"
    config.use_cache = False
    return config


def _skeleton(family: Family, config: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.integrations.accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) computed
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except Exception as exc:  # transformers validates the config while building: a broken config is input
            raise PiMoEInputError(f"transformers cannot build a {family.name} model from this config.json "
                                  f"({type(exc).__name__}: {str(exc)[:300]})") from None
    return model.eval()


def plan(directory: Path) -> Plan:
    """Read and check a model directory without allocating any weight (see the module docstring)."""
    family, data = family_of(directory)
    config = hf_config(family, data)
    try:
        reason = family.refuse(config)
        if reason is None:
            block = family.block_config(config)  # validates the routing against the contract (PiMoEConfigError)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        if isinstance(exc, PiMoEError):
            raise
        raise PiMoEInputError(f"{directory}/config.json has a value of the wrong type or range for a {family.name} "
                              f"model ({type(exc).__name__}: {str(exc)[:200]}); fix or re-download the config"
                              ) from None
    if reason is not None:
        raise PiMoEInputError(f"{directory}: {reason}")
    skeleton = _skeleton(family, config)
    moe = {path.rpartition(".")[0]: path.rpartition(".")[2] for path, module in skeleton.named_modules()
           if type(module).__name__ in family.block_classes}
    if not moe:
        raise PiMoEInputError(f"{directory}: this {family.name} config builds no MoE layer (every layer dense); "
                              "nothing to express with the pimoe ops")
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    tied = tuple(getattr(skeleton, "_tied_weights_keys", None) or ()) if config.tie_word_embeddings else ()
    return Plan(family, config, skeleton, moe, block, expected, tuple(n for n in tied if n in expected), ())


def check_checkpoint(plan: Plan, checkpoint: SafetensorsCheckpoint) -> Plan:
    """The checkpoint holds exactly the model's tensors, in the model's shapes, as bf16/fp16/fp32 (tensors of layers
    beyond num_hidden_layers, such as DeepSeek-V3's multi-token-prediction layer, are outside the forward: ignored)."""
    found = checkpoint.tensors
    layers = int(getattr(plan.config, "num_hidden_layers", 0) or getattr(plan.config, "n_layers", 0))
    beyond = tuple(n for n in found if n not in plan.expected and _layer_index(n) is not None
                   and _layer_index(n) >= layers)  # type: ignore[operator]
    missing = sorted(set(plan.expected) - set(found) - set(plan.tied) - _buffers(plan.skeleton))
    unexpected = sorted(set(found) - set(plan.expected) - set(beyond))
    if missing or unexpected:
        raise PiMoEInputError(f"{checkpoint.directory}: the checkpoint does not hold this {plan.family.name} model's "
                              f"weights: missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, unexpected "
                              f"{unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}; config.json and the weights "
                              "belong to different models")
    wrong = [f"{n} {found[n].shape} (expected {plan.expected[n]})" for n in sorted(set(found) & set(plan.expected))
             if found[n].shape != plan.expected[n]]
    if wrong:
        raise PiMoEInputError(f"{checkpoint.directory}: tensor shapes differ from config.json's: {wrong[:3]}")
    checkpoint.check_dtypes()
    plan.ignored = beyond
    return plan


def _layer_index(name: str) -> int | None:
    for container, index in itertools.pairwise(name.split(".")):
        if container in ("layers", "blocks") and index.isdigit():
            return int(index)
    return None


def _buffers(model: nn.Module) -> set[str]:
    """Persistent buffers: a checkpoint may omit them (they keep the values the model computes)."""
    names = set()
    for prefix, module in model.named_modules():
        for name in module._buffers:
            if name not in module._non_persistent_buffers_set:
                names.add(f"{prefix}.{name}" if prefix else name)
    return names


def check_memory(plan: Plan, directory: Path) -> None:
    """Refuse a model whose float32 weights would not fit in the host's available memory (before allocating)."""
    weights = sum(math.prod(shape) for shape in plan.expected.values()) * 4
    try:
        with open("/proc/meminfo") as handle:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle if ":" in line}
        available = info.get("MemAvailable")
    except (OSError, ValueError, IndexError):
        available = None
    if available is not None and weights > available and not os.environ.get("PIMOE_IGNORE_MEMORY"):
        raise PiMoEInputError(f"{directory}: its weights take {weights / 2**30:.1f} GiB in float32, more than the "
                              f"{available / 2**30:.1f} GiB this host has available; use a machine with more memory")


# ------------------------------------------------------------------------------------------ building
def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    parent, _, leaf = name.rpartition(".")
    module = model.get_submodule(parent) if parent else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def _install_blocks(plan: Plan, checkpoint: SafetensorsCheckpoint) -> set[str]:
    """Every MoE layer's block, filled from the checkpoint; returns the tensor prefixes the blocks consumed."""
    consumed = set()
    for prefix, attr in plan.moe_layers.items():
        layer = plan.skeleton.get_submodule(prefix)
        block = MoEBlock(plan.block, initialize=False)
        block.returns_tuple = plan.family.returns_tuple
        with torch.no_grad():
            plan.family.fill(block, lambda name, p=prefix: checkpoint.tensor(f"{p}.{name}"), plan.config)
        setattr(layer, attr, block)
        for owned in plan.family.owned:
            setattr(layer, owned, None)
        consumed |= {f"{prefix}.{name}." for name in (attr, *plan.family.owned)}
    return consumed


def build(plan: Plan, checkpoint: SafetensorsCheckpoint) -> DecoderLM:
    """The model of a checked plan, its weights read one tensor at a time (see the module docstring)."""
    consumed = _install_blocks(plan, checkpoint)
    model = plan.skeleton
    for name in plan.expected:
        if any(name.startswith(prefix) for prefix in consumed) or name not in checkpoint.tensors:
            continue  # a block's, a tied weight, or a persistent buffer the checkpoint omits (keeps its value)
        _set_tensor(model, name, checkpoint.tensor(name))
    if plan.tied:
        model.tie_weights()
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise PiMoEInputError(f"{checkpoint.directory}: no weights for {left[:4]}; the checkpoint is incomplete")
    return DecoderLM(model.eval(), plan.family)


def load_decoder(directory: str | Path, *, cache: bool = True) -> DecoderLM:
    """A Hugging Face MoE decoder directory as a :class:`DecoderLM` (checked first: see :func:`plan`), taking and
    returning its key/value cache where it fits the decoder I/O (``cache``; see the module docstring)."""
    directory = Path(directory)
    planned = plan(directory)
    with SafetensorsCheckpoint(directory) as checkpoint:
        check_checkpoint(planned, checkpoint)
        check_memory(planned, directory)
        model = build(planned, checkpoint)
    if cache:
        spec = decoder_spec(model, directory)
        if isinstance(spec, str):
            model.use_cache(None, spec)
        else:
            model.use_cache(spec)
    return model


def check_directory(directory: str | Path) -> None:
    """Everything :func:`load_decoder` checks before allocating, without allocating (commands call it before they
    write anything)."""
    directory = Path(directory)
    planned = plan(directory)
    with SafetensorsCheckpoint(directory) as checkpoint:
        check_checkpoint(planned, checkpoint)
    check_memory(planned, directory)


# ------------------------------------------------------------------------------------------ feeds
def positions(mask: np.ndarray) -> np.ndarray:
    """position_ids of a padded batch as Hugging Face's generate computes them: the count of valid tokens before
    each one (left padding starts every row at 0); padded positions get 0."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64) * (mask != 0)


def decoder_feed(ids: np.ndarray, mask: np.ndarray, spec: DecoderSpec | None = None) -> dict[str, np.ndarray]:
    """A prompt step: the tokens, their mask and positions, and (a model with a cache, ``spec``) an empty past."""
    feed = {MODEL_IDS_INPUT: ids.astype(np.int64), MODEL_MASK_INPUT: mask.astype(np.int64),
            MODEL_POSITIONS_INPUT: positions(mask)}
    if spec is not None:
        feed.update({name: np.zeros(spec.cache_shape(kind, ids.shape[0], 0), np.float32)
                     for name, kind in zip(spec.past_names, KV_KINDS * spec.num_layers, strict=True)})
    return feed


def export_example(spec: DecoderSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """The export example of a model with a cache: a decode-like step of 2 rows, 3 new tokens after 4 cached ones
    (every axis > 1, so batch, sequence and past length stay dynamic in the graph)."""
    rng = np.random.default_rng(seed)
    batch, past, sequence = 2, 4, 3
    feed = {MODEL_IDS_INPUT: rng.integers(0, spec.vocab_size, (batch, sequence)).astype(np.int64),
            MODEL_MASK_INPUT: np.ones((batch, past + sequence), np.int64),
            MODEL_POSITIONS_INPUT: np.tile(np.arange(past, past + sequence, dtype=np.int64), (batch, 1))}
    for name, kind in zip(spec.past_names, KV_KINDS * spec.num_layers, strict=True):
        feed[name] = rng.standard_normal(spec.cache_shape(kind, batch, past)).astype(np.float32)
    return feed


def random_decoder_feeds(vocab: int, seed: int, shapes: tuple[tuple[int, int, str], ...],
                         spec: DecoderSpec | None = None) -> list[dict[str, np.ndarray]]:
    """Seeded token ids [b, s] with ``padding`` "left", "right" or "none" (each row keeps at least one token); with
    ``spec``, an empty past (prompt steps)."""
    rng = np.random.default_rng(seed)
    feeds = []
    for batch, sequence, padding in shapes:
        mask = np.ones((batch, sequence), np.int64)
        if padding != "none":
            for row in range(batch):
                valid = int(rng.integers(1, sequence + 1)) if row else sequence  # row 0 full: the longest
                if padding == "right":
                    mask[row, valid:] = 0
                else:
                    mask[row, : sequence - valid] = 0
        feeds.append(decoder_feed(rng.integers(0, vocab, (batch, sequence)), mask, spec))
    return feeds


#: the held-out feeds a decoder's checks run on: no padding, right padding, left padding
CHECK_SHAPES = ((1, 5, "none"), (3, 12, "right"), (3, 12, "left"))
#: the default calibration: 4096 seeded token ids (a weak stand-in for real text: pass --calib); KL (entropy)
#: thresholds need many rows per expert, and 512 tokens gave twice the W8A8 error of 4096 on the tiny models
CALIBRATION_SHAPES = ((8, 64, "right"), (8, 64, "left")) * 4
#: the calibration method of decoders: gated (SwiGLU) experts feed their down projection a heavy-tailed GLU output
#: that KL clipping hurts (the per-layer W8A8 errors of the tiny models with mse: docs/models.md, "INT8")
CALIBRATION_METHOD = "mse"


def text_decoder_feeds(directory: Path, lines: list[str], spec: DecoderSpec | None = None
                       ) -> list[dict[str, np.ndarray]]:
    """Lines of text through the model's tokenizer (padded batches) with their position_ids (``spec``: and an empty
    past)."""
    from pimoe_export.hf.feeds import text_feeds

    return [decoder_feed(f[MODEL_IDS_INPUT], f[MODEL_MASK_INPUT], spec) for f in text_feeds(directory, lines)]


Feeds = list[dict[str, np.ndarray]]
FeedMaker = Callable[[int, int, int], dict[str, np.ndarray]]
