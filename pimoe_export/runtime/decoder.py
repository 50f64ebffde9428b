"""One forward call of a decoder graph with its KV cache, per backend, and the batch of rows a cache belongs to.

A call takes input_ids / attention_mask / position_ids and the past cache and returns the last position's logits
(numpy, what sampling reads) and the present cache (interface.py "decoders"). The cache stays in the backend's own
values between calls:

- :class:`OrtDecoder` (ONNX Runtime): each present output is an OrtValue ONNX Runtime allocates on the session's
  device and is fed as the next call's past input unchanged, so the cache is never copied through numpy between
  steps. On the CPU a call is one ``run_with_ort_values`` of the session's native object (inputs and outputs as
  OrtValues, only the logits and the presents fetched); elsewhere, and where that object is missing, I/O binding
  with the logits written straight into a bound numpy buffer. Both give the same bits; the CPU path exists because
  a decode step's own Python is part of its latency: the binding path makes ~15 calls through onnxruntime's Python
  wrappers per step, each a few microseconds once the step's kernels have evicted it from the caches
  (docs/benchmarks.md, generation: 0.1-0.17 ms of a ~2 ms step of the mid-size unit).
- :class:`ArrayDecoder` (any engine that runs numpy feeds, e.g. TensorRT through Polygraphy): the cache travels as
  numpy arrays.

:class:`Rows` is the state of a batch of rows: their attention mask, next positions and cache. Rows leave it
(:meth:`Rows.select`: finished or cancelled) and batches merge (:meth:`Rows.merge`: continuous batching); both copy
the cache once through numpy, left-padding every row to the longest (padding is masked: it changes no result).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pimoe_export.errors import RunError
from pimoe_export.interface import (
    DECODER_LOGITS,
    DECODER_POSITIONS_INPUT,
    MODEL_IDS_INPUT,
    MODEL_MASK_INPUT,
    DecoderSpec,
)


class Decoder:
    """Base: what :class:`Rows` and the generation loop need of a backend."""

    def __init__(self, spec: DecoderSpec, cache_dtype: str, logits_dtype: str) -> None:
        self.spec = spec
        self.cache_dtype = np.dtype(cache_dtype)
        self.logits_dtype = np.dtype(logits_dtype)

    def forward(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache: Sequence[Any] | None,
                all_positions: bool = False) -> tuple[np.ndarray, list[Any]]:  # pragma: no cover - abstract
        """(logits of the last position [B, V] float32 (``all_positions``: of every position, [B, S, V]), the present
        cache) for [B, S] ids/positions, a [B, P + S] mask and a past cache of P positions (None: empty)."""
        raise NotImplementedError

    def to_numpy(self, cache: Sequence[Any]) -> list[np.ndarray]:
        return [np.asarray(c) for c in cache]

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        """An empty past ([batch, kv_heads, 0, head dim] each; the values' head dim may differ from the keys')."""
        kv_heads = self.spec.num_kv_heads
        return [np.zeros((batch, kv_heads, 0, dim), self.cache_dtype) for dim in self.spec.cache_head_dims]


class OrtDecoder(Decoder):
    """ONNX Runtime (see the module docstring); ``device``: where the cache lives ("cpu", "cuda")."""

    def __init__(self, session: Any, spec: DecoderSpec, cache_dtype: str, logits_dtype: str,
                 device: str = "cpu") -> None:
        super().__init__(spec, cache_dtype, logits_dtype)
        self.session = session
        self.device = device
        self._outputs = [DECODER_LOGITS, *spec.present_names]
        self._native = _native_cpu_run(session) if device == "cpu" else None

    def forward(self, ids, mask, positions, cache, all_positions=False):
        batch = ids.shape[0]
        inputs = [np.ascontiguousarray(a, np.int64) for a in (ids, mask, positions)]
        past = self.empty_cache(batch) if cache is None else cache
        try:
            if self._native is not None:
                logits, present = self._native_forward(inputs, past)
            else:
                logits, present = self._bound_forward(inputs, past)
        except Exception as exc:  # onnxruntime's own Fail / InvalidArgument
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RunError(f"ONNX Runtime could not run the decoder step: {detail}") from None
        return (logits if all_positions else logits[:, -1, :]).astype(np.float32), present

    def _native_forward(self, inputs: list[np.ndarray], past: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
        """One ``run_with_ort_values`` of the native session: numpy inputs wrapped without a copy (``held`` keeps
        them alive for the call), past OrtValues passed as they are, presents wrapped as OrtValues."""
        import onnxruntime as ort

        run, from_numpy, device = self._native
        names = (MODEL_IDS_INPUT, MODEL_MASK_INPUT, DECODER_POSITIONS_INPUT, *self.spec.past_names)
        held = list(inputs)
        for value in past:
            held.append(value._ortvalue if isinstance(value, ort.OrtValue) else np.ascontiguousarray(value))
        feeds = {name: from_numpy(value, device) if isinstance(value, np.ndarray) else value
                 for name, value in zip(names, held, strict=True)}
        out = run(feeds, self._outputs, None)
        return out[0].numpy(), [ort.OrtValue(out[i]) for i in range(1, len(self._outputs))]

    def _bound_forward(self, inputs: list[np.ndarray], past: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
        """I/O binding (any device): presents allocated on the session's device, logits into a numpy buffer."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, array in zip((MODEL_IDS_INPUT, MODEL_MASK_INPUT, DECODER_POSITIONS_INPUT), inputs, strict=True):
            binding.bind_cpu_input(name, array)
        for name, value in zip(self.spec.past_names, past, strict=True):
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        batch, sequence = inputs[0].shape
        logits = np.empty((batch, sequence, self.spec.vocab_size), self.logits_dtype)
        binding.bind_output(DECODER_LOGITS, "cpu", 0, logits.dtype.type, list(logits.shape), logits.ctypes.data)
        for name in self.spec.present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return logits, binding.get_outputs()[1:]

    def to_numpy(self, cache):
        return [c.numpy() if hasattr(c, "numpy") else np.asarray(c) for c in cache]


def _native_cpu_run(session: Any) -> tuple[Any, Any, Any] | None:
    """(run_with_ort_values, OrtValue-from-numpy, the CPU device) of the native session under an
    ``onnxruntime.InferenceSession``, or None where this onnxruntime has not got them (then I/O binding)."""
    try:
        import onnxruntime as ort
        from onnxruntime.capi import _pybind_state as native_api

        run = session._sess.run_with_ort_values
        from_numpy = native_api.OrtValue.ortvalue_from_numpy
        device = ort.OrtDevice.make("cpu", 0)._get_c_device()
    except (ImportError, AttributeError, TypeError):
        return None
    return run, from_numpy, device


class ArrayDecoder(Decoder):
    """Any backend that runs numpy feeds by name (``infer(feeds) -> {name: array}``)."""

    def __init__(self, infer: Callable[[dict[str, np.ndarray]], dict[str, Any]], spec: DecoderSpec,
                 cache_dtype: str, logits_dtype: str) -> None:
        super().__init__(spec, cache_dtype, logits_dtype)
        self.infer = infer

    def forward(self, ids, mask, positions, cache, all_positions=False):
        feeds = {MODEL_IDS_INPUT: ids.astype(np.int64), MODEL_MASK_INPUT: mask.astype(np.int64),
                 DECODER_POSITIONS_INPUT: positions.astype(np.int64)}
        cache = self.empty_cache(ids.shape[0]) if cache is None else cache
        feeds.update({name: np.ascontiguousarray(c) for name, c in zip(self.spec.past_names, cache, strict=True)})
        outputs = self.infer(feeds)
        logits = np.asarray(outputs[DECODER_LOGITS])
        logits = (logits if all_positions else logits[:, -1, :]).astype(np.float32)
        return logits, [np.asarray(outputs[name]) for name in self.spec.present_names]


def prompt_positions(mask: np.ndarray) -> np.ndarray:
    """position_ids of left-padded prompts, as Hugging Face computes them: the count of real tokens before each one,
    1 at padding."""
    positions = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, positions).astype(np.int64)


@dataclass
class Rows:
    """A batch of rows and their cache (see the module docstring): ``mask`` [B, T] of the T cached positions,
    ``positions`` [B] the position of each row's next token."""

    mask: np.ndarray
    positions: np.ndarray
    cache: list[Any]

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @classmethod
    def prefill(cls, decoder: Decoder, prompts: Sequence[Sequence[int]]) -> tuple[Rows, np.ndarray]:
        """Run left-padded prompts with an empty cache: (their rows, the logits of each prompt's last token)."""
        width = max(len(p) for p in prompts)
        pad = decoder.spec.pad_token_id
        ids = np.array([[pad] * (width - len(p)) + list(p) for p in prompts], np.int64)
        mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], np.int64)
        logits, cache = decoder.forward(ids, mask, prompt_positions(mask), None)
        return cls(mask, mask.sum(axis=1).astype(np.int64), cache), logits

    def step(self, decoder: Decoder, tokens: Sequence[int]) -> np.ndarray:
        """Feed each row its next token; returns the logits [B, V] of the token after it."""
        ids = np.asarray(tokens, np.int64).reshape(self.size, 1)
        self.mask = np.concatenate([self.mask, np.ones((self.size, 1), np.int64)], axis=1)
        logits, self.cache = decoder.forward(ids, self.mask, self.positions.reshape(-1, 1), self.cache)
        self.positions = self.positions + 1
        return logits

    def select(self, decoder: Decoder, rows: Sequence[int], trim: bool = False) -> Rows:
        """The given rows (in that order); ``trim``: without the leading positions that are padding in all of them."""
        index = np.asarray(rows, np.int64)
        mask = self.mask[index]
        start = int(np.argmax(mask.any(axis=0))) if trim and mask.size else 0
        cache = [c[index][:, :, start:] for c in decoder.to_numpy(self.cache)]
        return Rows(mask[:, start:], self.positions[index], cache)

    @staticmethod
    def merge(decoder: Decoder, parts: Sequence[Rows]) -> Rows:
        """One batch of the rows of ``parts``, each left-padded to the longest cache."""
        width = max(p.mask.shape[1] for p in parts)
        masks, caches = [], []
        for part in parts:
            pad = width - part.mask.shape[1]
            masks.append(np.pad(part.mask, ((0, 0), (pad, 0))))
            caches.append([np.pad(c, ((0, 0), (0, 0), (pad, 0), (0, 0))) for c in decoder.to_numpy(part.cache)])
        cache = [np.concatenate([c[i] for c in caches]) for i in range(len(decoder.spec.past_names))]
        return Rows(np.concatenate(masks), np.concatenate([p.positions for p in parts]), cache)
