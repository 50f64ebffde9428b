"""`Engine`: one API over the backends that serve a deployable unit (see pimoe_export.build.manifest).

    engine = Engine.load("engines/seed-512/ort-int8")     # manifest verified before anything is loaded
    y = engine.run(x)                                      # numpy in -> numpy out, torch in -> torch out
    y, expert_ids, expert_weights = engine.run(x, routing=True)

Backends:
- ``onnxruntime`` (the embedded default, CPU; the CUDA provider is used when onnxruntime-gpu is installed and
  ``providers`` asks for it): the unit's ONNX with the unit's own libpimoe_ort. Sessions are thread-safe, so
  concurrent ``run`` calls share one session.
- ``tensorrt``: the unit's engine, deserialised after the unit's plugin library is registered, run through
  Polygraphy's ``TrtRunner`` with one execution context per calling thread (safe for concurrent callers). Needs
  TensorRT and a GPU of one of the manifest's target SMs: it runs in the docker/ server image, not in CI.
  CUDA-graph capture is not offered (Polygraphy's runner has none); latency-critical callers can capture the
  execution context themselves.

The runtime never imports torch; a torch tensor given to ``run`` is converted at the edge.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from pimoe_export.build.manifest import Manifest, read_manifest, verify
from pimoe_export.errors import ArtifactError, BackendUnavailableError, PiMoEInputError

OUTPUT_NAMES = ("output", "expert_ids", "expert_weights")


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


class Engine:
    """Base class: input checking, numpy/torch conversion, the manifest. Use :meth:`load`."""

    def __init__(self, unit_dir: Path, manifest: Manifest) -> None:
        self.unit_dir = unit_dir
        self.manifest = manifest
        self.hidden_size = int(manifest.config["hidden_size"])
        self.input_dtype = np.dtype(np.float16 if manifest.precision == "fp16" else np.float32)

    @property
    def backend(self) -> str:
        return self.manifest.backend

    @staticmethod
    def load(unit_dir: str | Path, *, threads: int | None = None, providers: list[str] | None = None) -> Engine:
        """Verify the unit's manifest (artefact hashes, versions, SM) and load it with its backend."""
        unit_dir = Path(unit_dir)
        manifest = read_manifest(unit_dir)
        if manifest.backend == "onnxruntime":
            return OrtEngine(unit_dir, threads=threads, providers=providers)
        return TensorRTEngine(unit_dir)

    # ------------------------------------------------------------------ run
    def _prepare(self, x: Any) -> tuple[np.ndarray, bool]:
        torch_input = _is_torch(x)
        array = x.detach().cpu().numpy() if torch_input else x
        if not isinstance(array, np.ndarray):
            raise PiMoEInputError(f"run() takes a numpy array or torch tensor [batch, sequence, {self.hidden_size}], "
                                  f"got {type(x).__name__}")
        if array.ndim != 3 or array.shape[-1] != self.hidden_size:
            raise PiMoEInputError(f"input must be [batch, sequence, {self.hidden_size}], got shape {array.shape}")
        if array.dtype != self.input_dtype:
            raise PiMoEInputError(f"this {self.manifest.precision} unit takes {self.input_dtype} input, got "
                                  f"{array.dtype}; convert it with x.astype(np.{self.input_dtype})")
        problem = self.manifest.profile.check(int(array.shape[0]), int(array.shape[1]))
        if problem:
            raise PiMoEInputError(f"{problem}; split the batch, or rebuild the unit with a larger profile "
                                  f"(pimoe-export build --max-tokens BxS)")
        return np.ascontiguousarray(array), torch_input

    def run(self, x: Any, *, routing: bool = False) -> Any:
        array, torch_input = self._prepare(x)
        outputs = self._infer(array)
        if torch_input:
            import torch

            outputs = [torch.from_numpy(np.ascontiguousarray(o)) for o in outputs]
        return tuple(outputs) if routing else outputs[0]

    def _infer(self, x: np.ndarray) -> list[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

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
        import onnxruntime as ort

        from pimoe_export.runtime.ort import create_session

        manifest = verify(unit_dir, backend_version=ort.__version__)
        super().__init__(unit_dir, manifest)
        lib = unit_dir / manifest.artifact("ort_library").file
        self.session = create_session(unit_dir / manifest.artifact("onnx").file, threads=threads,
                                      providers=providers, library=lib)

    def _infer(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(list(OUTPUT_NAMES), {"hidden_states": x})

    def close(self) -> None:
        self.session = None


class TensorRTEngine(Engine):
    """TensorRT backend (needs TensorRT + a GPU of a target SM; exercised in the docker/ server image)."""

    def __init__(self, unit_dir: Path) -> None:
        from pimoe_export.build.tensorrt import import_tensorrt, load_plugin_library, process_logger
        from pimoe_export.build.units import local_gpu_sm

        manifest = read_manifest(unit_dir)
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
        manifest = verify(unit_dir, backend_version=str(trt.__version__), device_sm=sm)
        super().__init__(unit_dir, manifest)
        logger = process_logger(trt)
        self._runtime = trt.Runtime(logger)
        load_plugin_library(trt, unit_dir / manifest.artifact("plugin_library").file,
                            registry=self._runtime.get_plugin_registry(), logger=logger)
        engine = self._runtime.deserialize_cuda_engine((unit_dir / manifest.artifact("engine").file).read_bytes())
        if engine is None:
            raise ArtifactError(f"TensorRT could not deserialise {unit_dir / 'model.engine'} ({logger.errors()}); "
                                f"rebuild it: `pimoe-export build {unit_dir / 'model.onnx'} -o {unit_dir}`")
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

    def _infer(self, x: np.ndarray) -> list[np.ndarray]:
        outputs = self._runner().infer({"hidden_states": x})
        return [np.array(outputs[name]) for name in OUTPUT_NAMES]

    def close(self) -> None:
        with self._lock:
            for runner in self._runners:
                runner.deactivate()
            self._runners.clear()
