"""`Engine`: one API over the backends that serve a deployable unit (see pimoe_export.artifacts.manifest).

    engine = Engine.load("engines/seed-512/ort-int8")     # the unit is verified before anything is loaded
    y = engine.run(x)                                      # numpy in -> numpy out, torch in -> torch out
    y, expert_ids, expert_weights = engine.run(x, routing=True)
    outputs = engine.run_named({name: array, ...})       # every named input and output (several for a model)
    results = engine.generate(["Once upon a time"], max_new_tokens=32)   # decoder units (an LLM with a KV cache)

Backends:
- ``onnxruntime`` (the embedded default, CPU; the CUDA provider is used when onnxruntime-gpu is installed and
  ``providers`` asks for it): the unit's ONNX with the unit's own libpimoe_ort. Sessions are thread-safe, so
  concurrent ``run`` calls share one session.
- ``tensorrt``: the unit's engine, deserialised after the unit's plugin library is registered, run through
  Polygraphy's ``TrtRunner`` with one execution context per calling thread (safe for concurrent callers). Needs
  TensorRT and a GPU of one of the manifest's target SMs: it runs in the docker/ server image, not in CI.

``generate`` runs on a decoder unit (its manifest's ``decoder``): a batch of prompts (token ids, or text when the unit
ships its tokenizer), greedy or seeded sampling, EOS and stop sequences per row, a streaming callback; the KV cache
stays in ONNX Runtime's values between steps (runtime/decoder.py, runtime/generation.py).

Every failure is one of the package's error types: a unit that does not verify is an ArtifactError (nothing of it
is loaded), an input of the wrong name, rank, size or dtype a PiMoEInputError (checked before anything is copied),
a backend that refuses to run a RunError. The runtime never imports torch; a torch tensor is converted at the edge.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pimoe_export.artifacts.manifest import Unit, read_manifest, verify
from pimoe_export.errors import ArtifactError, BackendUnavailableError, PiMoEInputError, RunError
from pimoe_export.interface import (
    BATCH_AXIS,
    DECODER_LOGITS,
    INT32_LIMIT,
    LAYER_OUTPUTS,
    MAX_HOST_ELEMENTS,
    SEQUENCE_AXIS,
    DecoderSpec,
    GraphInterface,
    TensorInterface,
    element_count,
)
from pimoe_export.runtime.decoder import ArrayDecoder, Decoder, OrtDecoder
from pimoe_export.runtime.generation import Generation, Request, TokenEvent, generate
from pimoe_export.runtime.sampling import DEFAULT_MAX_NEW_TOKENS, SamplingSettings
from pimoe_export.runtime.tokenizer import Tokenizer


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


class Engine:
    """Base class: input checking, numpy/torch conversion, the verified unit. Use :meth:`load`."""

    def __init__(self, unit: Unit) -> None:
        self.unit = unit
        self.unit_dir = unit.dir
        self.manifest = unit.manifest
        self.interface: GraphInterface = unit.interface
        self.input_dtype = np.dtype(self.interface.inputs[0].dtype)
        self._tokenizer: Tokenizer | None = None

    @property
    def decoder_spec(self) -> DecoderSpec | None:
        """The decoder description of a decoder unit (None: not a decoder)."""
        return self.unit.decoder

    @property
    def backend(self) -> str:
        return self.manifest.backend

    @staticmethod
    def load(unit_dir: str | Path, *, threads: int | None = None, providers: list[str] | None = None) -> Engine:
        """Verify the unit (containment, artefact hashes, manifest vs ONNX, versions, SM) and load it."""
        unit_dir = Path(unit_dir)
        if read_manifest(unit_dir).backend == "onnxruntime":
            return OrtEngine(unit_dir, threads=threads, providers=providers)
        return TensorRTEngine(unit_dir)

    # ------------------------------------------------------------------ inputs
    def _check_input(self, spec: TensorInterface, x: Any) -> dict[str, int]:
        """The size of every named axis of ``x`` for the input ``spec``; checked from its shape and dtype alone."""
        shape = tuple(int(d) for d in getattr(x, "shape", ()))
        dtype = str(getattr(x, "dtype", type(x).__name__)).replace("torch.", "")
        dims = [f"{d}" for d in spec.dims]
        if not hasattr(x, "shape") or not (isinstance(x, np.ndarray) or _is_torch(x)):
            raise PiMoEInputError(f"input {spec.name} must be a numpy array or torch tensor [{', '.join(dims)}], "
                                  f"got {type(x).__name__}")
        fixed_ok = len(shape) == len(spec.dims) and all(isinstance(d, str) or d == s
                                                         for d, s in zip(spec.dims, shape, strict=True))
        if not fixed_ok:
            raise PiMoEInputError(f"input {spec.name} must be [{', '.join(dims)}], got shape {list(shape)}")
        if dtype != spec.dtype:
            raise PiMoEInputError(f"this {self.manifest.precision} unit takes {spec.dtype} input, got {dtype} for "
                                  f"{spec.name}; convert it (numpy: x.astype(np.{spec.dtype}))")
        axes = {d: s for d, s in zip(spec.dims, shape, strict=True) if isinstance(d, str)}
        batch, sequence = axes.get(BATCH_AXIS, 1), axes.get(SEQUENCE_AXIS, 1)
        if problem := self.manifest.profile.check(batch, sequence):
            raise PiMoEInputError(f"{problem}; split the batch, or rebuild the unit with a larger profile "
                                  "(pimoe-export build --max-tokens BxS)")
        if element_count(shape) > MAX_HOST_ELEMENTS:
            raise PiMoEInputError(f"input {spec.name} has {element_count(shape)} elements, more than "
                                  f"{MAX_HOST_ELEMENTS}; split the batch")
        if batch * sequence > self.unit.max_tokens:  # before anything is copied: a broadcast input costs nothing yet
            raise PiMoEInputError(f"input {spec.name} holds {batch * sequence} tokens; this unit's ops index at most "
                                  f"{self.unit.max_tokens} per call (the op contract's element counts stay below "
                                  f"{INT32_LIMIT}); split the batch")
        return axes

    def _feeds(self, inputs: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], bool]:
        names = set(self.interface.input_names)
        if set(inputs) != names:
            raise PiMoEInputError(f"this unit takes the inputs {sorted(names)}, got {sorted(inputs)}")
        sizes: dict[str, set[int]] = {}
        for spec in self.interface.inputs:
            for axis, size in self._check_input(spec, inputs[spec.name]).items():
                sizes.setdefault(axis, set()).add(size)
        unequal = {axis: sorted(values) for axis, values in sizes.items() if len(values) > 1}
        if unequal:
            raise PiMoEInputError(f"the inputs disagree on the size of their named axes: {unequal}; every input "
                                  "with an axis of one name must have the same size along it")
        torch_input = any(_is_torch(x) for x in inputs.values())
        feeds = {name: np.ascontiguousarray(x.detach().cpu().numpy() if _is_torch(x) else x)
                 for name, x in inputs.items()}
        return feeds, torch_input

    # ------------------------------------------------------------------ run
    def run_named(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Every output by name, for inputs given by name (torch tensors in -> torch tensors out)."""
        feeds, torch_input = self._feeds(inputs)
        outputs = dict(zip(self.interface.output_names, self._infer(feeds), strict=True))
        if torch_input:
            import torch

            outputs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in outputs.items()}
        return outputs

    def run(self, x: Any, *, routing: bool = False) -> Any:
        """The PiMoE layer's output for ``hidden_states`` ``x`` (with ``routing``: also expert ids and weights)."""
        if len(self.interface.inputs) != 1:
            raise PiMoEInputError(f"this unit takes several inputs {list(self.interface.input_names)}: use "
                                  "run_named({name: array, ...})")
        outputs = self.run_named({self.interface.inputs[0].name: x})
        ordered = [outputs[name] for name in self.interface.output_names]
        if routing and tuple(self.interface.output_names) != LAYER_OUTPUTS:
            raise PiMoEInputError("routing=True needs the layer interface (output, expert_ids, expert_weights)")
        return tuple(ordered) if routing else ordered[0]

    def _infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ generate (decoder units)
    def _spec(self) -> DecoderSpec:
        spec = self.decoder_spec
        if spec is None:
            raise PiMoEInputError(f"{self.unit_dir} is not a decoder unit (its manifest records no decoder with a "
                                  "KV cache): generate runs on the units of decoder LLMs; use run/run_named here")
        return spec

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The unit's tokenizer (None when it ships none: prompts are token ids then)."""
        if self._tokenizer is None and "tokenizer" in self.unit.files:
            self._tokenizer = Tokenizer(self.unit.files["tokenizer"])
        return self._tokenizer

    def decoder(self) -> Decoder:
        """One call of the decoder graph with its cache (runtime/decoder.py); numpy feeds through ``_infer``."""
        spec = self._spec()
        dtypes = {t.name: t.dtype for t in (*self.interface.inputs, *self.interface.outputs)}

        def infer(feeds: dict[str, np.ndarray]) -> dict[str, Any]:
            return dict(zip(self.interface.output_names, self._infer(feeds), strict=True))

        return ArrayDecoder(infer, spec, dtypes[spec.past_names[0]], dtypes[DECODER_LOGITS])

    def prompt_ids(self, prompts: str | Sequence[str] | Sequence[Sequence[int]] | Sequence[int]) -> list[list[int]]:
        """Token ids of each prompt: text through the unit's tokenizer, token ids as given."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, int | np.integer) for t in prompts):
            prompts = [prompts]  # one prompt of token ids
        if not prompts:
            raise PiMoEInputError("no prompts given")
        ids = []
        for prompt in prompts:
            if isinstance(prompt, str):
                if not prompt:
                    raise PiMoEInputError("the prompt is empty: give some text (or at least one token id)")
                if self.tokenizer is None:
                    raise PiMoEInputError(f"{self.unit_dir} ships no tokenizer (tokenizer.json): pass token ids, or "
                                          "re-package the unit with the model's tokenizer files")
                ids.append(self.tokenizer.encode(prompt))
            elif isinstance(prompt, Sequence | np.ndarray) and all(isinstance(t, int | np.integer) for t in prompt):
                ids.append([int(t) for t in prompt])
            else:
                raise PiMoEInputError(f"a prompt is a string or a sequence of token ids, got {type(prompt).__name__}")
        return ids

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]] | Sequence[int],
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[Sequence[int]] = (),
        eos_token_ids: Sequence[int] | None = None,
        on_token: Callable[[TokenEvent], None] | None = None,
    ) -> list[Generation]:
        """Generate a continuation of every prompt (a decoder unit; see runtime/generation.py).

        Prompts are left-padded into one batch; ``temperature`` 0 is greedy, above 0 samples (``top_k`` 0 and
        ``top_p`` 1 turn those filters off) from a generator seeded by ``seed`` and the row (a fresh seed, reported
        in each result, without one); each row ends at EOS (the unit's, or ``eos_token_ids``), a ``stop`` string,
        one of ``stop_token_ids`` or ``max_new_tokens``; ``on_token`` is called with every token as it comes."""
        spec = self._spec()
        settings = SamplingSettings(max_new_tokens, temperature, top_k, top_p, seed, tuple(stop),
                                    tuple(tuple(s) for s in stop_token_ids),
                                    None if eos_token_ids is None else tuple(eos_token_ids))
        requests = [Request(i, ids, settings, spec, self.tokenizer, on_token)
                    for i, ids in enumerate(self.prompt_ids(prompts))]
        return generate(self.decoder(), requests)

    def close(self) -> None:
        """Release backend resources (the object cannot run afterwards)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        return {"unit": str(self.unit_dir), "backend": m.backend, "backend_version": m.backend_version,
                "precision": m.precision, "profile": {"min": m.profile.min_shape, "opt": m.profile.opt_shape,
                                                      "max": m.profile.max_shape},
                "target_sms": m.target_sms, "io": m.io}


class OrtEngine(Engine):
    def __init__(self, unit_dir: Path, threads: int | None = None, providers: list[str] | None = None) -> None:
        from pimoe_export.native.libraries import import_onnxruntime
        from pimoe_export.runtime.ort import create_session

        ort = import_onnxruntime()

        unit = verify(unit_dir, backend_version=ort.__version__)
        super().__init__(unit)
        self.session = create_session(unit.files["onnx"], threads=threads, providers=providers,
                                      library=unit.files["ort_library"], contract=unit.manifest.contract_version)

    def _infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.session is None:
            raise RunError(f"the engine of {self.unit_dir} was closed")
        try:
            return self.session.run(list(self.interface.output_names), feeds)
        except Exception as exc:  # onnxruntime's own Fail / InvalidArgument / RuntimeException
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RunError(f"ONNX Runtime could not run {self.unit_dir}: {detail}") from None

    def close(self) -> None:
        self.session = None

    def decoder(self) -> Decoder:
        """The session's decoder (runtime/decoder.py: the native run on the CPU, I/O binding elsewhere); the cache
        lives on the session's first provider's device."""
        spec = self._spec()
        if self.session is None:
            raise RunError(f"the engine of {self.unit_dir} was closed")
        dtypes = {t.name: t.dtype for t in (*self.interface.inputs, *self.interface.outputs)}
        device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        return OrtDecoder(self.session, spec, dtypes[spec.past_names[0]], dtypes[DECODER_LOGITS], device)


class TensorRTEngine(Engine):
    """TensorRT backend (needs TensorRT + a GPU of a target SM; exercised in the docker/ server image)."""

    def __init__(self, unit_dir: Path) -> None:
        from pimoe_export.native.devices import local_gpu_sm
        from pimoe_export.native.tensorrt_loader import import_tensorrt, load_plugin_library, process_logger

        manifest = verify(unit_dir).manifest  # integrity first: a tampered unit is refused whatever the machine
        if manifest.backend == "tensorrt-rtx":
            raise BackendUnavailableError(
                f"{unit_dir} holds a TensorRT-RTX engine (built ahead of time for {manifest.target_sms}); it runs on "
                f"RTX GPUs with the TensorRT-RTX runtime, not here. Build a TensorRT engine for this GPU with "
                f"`pimoe-export build {unit_dir / 'model.onnx'} -o DIR --flavour tensorrt`")
        trt = import_tensorrt("tensorrt")
        sm = local_gpu_sm()
        if sm is None:
            raise BackendUnavailableError("no NVIDIA GPU is visible (nvidia-smi found none); the TensorRT backend "
                                          "needs one: use the onnxruntime unit on this machine")
        unit = verify(unit_dir, backend_version=str(trt.__version__), device_sm=sm)
        super().__init__(unit)
        logger = process_logger(trt)
        self._runtime = trt.Runtime(logger)
        load_plugin_library(trt, unit.files["plugin_library"], needs=unit.manifest.contract_version,
                            registry=self._runtime.get_plugin_registry(),
                            logger=logger)
        engine = self._runtime.deserialize_cuda_engine(unit.files["engine"].read_bytes())
        if engine is None:
            raise ArtifactError(f"TensorRT could not deserialise {unit.files['engine']} ({logger.errors()}); "
                                f"rebuild it: `pimoe-export build MODEL.onnx -o {unit_dir} --force`")
        self.engine = engine
        self._local = threading.local()
        self._runners: list[Any] = []
        self._lock = threading.Lock()

    def _runner(self) -> Any:
        runner = getattr(self._local, "runner", None)
        if runner is None:
            from polygraphy.backend.trt import TrtRunner

            runner = TrtRunner(self.engine, name=f"pimoe-trt-{threading.get_ident()}")
            runner.activate()  # one execution context per thread
            self._local.runner = runner
            with self._lock:
                self._runners.append(runner)
        return runner

    def _infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            outputs = self._runner().infer(feeds)
        except Exception as exc:  # Polygraphy/TensorRT report a failed enqueue as an exception
            raise RunError(f"TensorRT could not run {self.unit_dir}: {exc}") from None
        return [np.array(outputs[name]) for name in self.interface.output_names]

    def close(self) -> None:
        with self._lock:
            for runner in self._runners:
                runner.deactivate()
            self._runners.clear()
