"""ONNX Runtime sessions with the pimoe custom-op library registered.

No torch here: a machine with only numpy + onnxruntime + the built library can run exported models. ONNX Runtime's
own exceptions are turned into the package's error types: a graph or library it refuses is an ArtifactError, a run
it refuses a PiMoEInputError.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pimoe_export.errors import ArtifactError, PluginLoadError
from pimoe_export.interface import MIN_ONNXRUNTIME, version_tuple
from pimoe_export.native.libraries import (
    check_ort_library,
    find_ort_cuda_library,
    find_ort_library,
    import_onnxruntime,
)

__all__ = ["check_ort_library", "create_session", "find_ort_library", "op_library_for", "session_options"]

CUDA_PROVIDER = "CUDAExecutionProvider"


def check_onnxruntime_version(version: str) -> None:
    """Refuse an ONNX Runtime too old for libpimoe_ort (it would register no op, and say nothing)."""
    if version_tuple(version) < MIN_ONNXRUNTIME:
        need = ".".join(map(str, MIN_ONNXRUNTIME))
        raise PluginLoadError(f"libpimoe_ort needs onnxruntime >= {need} (ONNX Runtime C API "
                              f"{MIN_ONNXRUNTIME[1]}); this environment has onnxruntime {version}, which would "
                              f"register none of the pimoe ops: pip install 'onnxruntime>={need}' (or "
                              f"onnxruntime-gpu >= {need}; Triton containers up to 25.03 ship 1.20.1)")


def session_options(threads: int | None = None, library: str | Path | None = None,
                    contract: int | None = None) -> Any:
    """``ort.SessionOptions`` with the pimoe library registered (``threads``: intra-op thread count; ``contract``: the
    op contract version the model needs, default this package's)."""
    ort = import_onnxruntime()
    check_onnxruntime_version(ort.__version__)
    path = str(library or find_ort_library())
    check_ort_library(path, *(() if contract is None else (contract,)))
    options = ort.SessionOptions()
    options.register_custom_ops_library(path)
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 4  # fatal only: a refused run or load reaches the caller as a typed error
    return options


def op_library_for(providers: Sequence[str] | None) -> Path:
    """The op library for a session with ``providers``: libpimoe_ort_cuda (the pimoe ops on the GPU) when the CUDA
    provider is asked for and it is built, else libpimoe_ort (CPU kernels; ONNX Runtime copies around them)."""
    if providers and CUDA_PROVIDER in providers:
        try:
            return find_ort_cuda_library()
        except PluginLoadError:
            pass
    return find_ort_library()


def create_session(
    model: str | Path | bytes,
    *,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    library: str | Path | None = None,
    contract: int | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` for a pimoe model (CPU provider unless ``providers`` says otherwise;
    with ``CUDAExecutionProvider`` and no ``library``, the pimoe ops run on the GPU where libpimoe_ort_cuda is
    built: :func:`op_library_for`)."""
    ort = import_onnxruntime()

    options = session_options(threads, library or op_library_for(providers), contract)
    source = model if isinstance(model, bytes) else str(model)
    what = "the model" if isinstance(model, bytes) else str(model)
    if not isinstance(model, bytes) and not Path(model).is_file():
        raise ArtifactError(f"{model} does not exist; write it with `pimoe-export export` or `pimoe-export quantize`")
    try:
        return ort.InferenceSession(source, options, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/InvalidArgument types
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"ONNX Runtime cannot load {what}: {detail}. Check the graph with `pimoe-export check` "
                            "or re-export it") from None
