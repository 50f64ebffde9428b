"""ONNX Runtime backend: locate the pimoe custom-op library and create sessions with it registered.

No torch here: a machine with only numpy + onnxruntime + the built library can run exported models.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from pimoe_export.errors import PluginLoadError
from pimoe_export.ops.schema import CONTRACT_VERSION

LIBRARY_ENV = "PIMOE_ORT_LIBRARY"
LIBRARY_NAME = "libpimoe_ort.so"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_SEARCH = (
    Path(__file__).resolve().parents[1] / "_lib" / LIBRARY_NAME,  # a wheel/packaged install
    _REPO_ROOT / "build" / "plugins" / LIBRARY_NAME,  # scripts/setup.sh build tree
)


def find_ort_library() -> Path:
    """Path of libpimoe_ort: ``$PIMOE_ORT_LIBRARY`` if set, else the packaged or build-tree copy."""
    override = os.environ.get(LIBRARY_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise PluginLoadError(f"{LIBRARY_ENV}={override} does not exist; point it at a built {LIBRARY_NAME} "
                                  f"or unset it to use the build tree")
        return path
    for path in _SEARCH:
        if path.is_file():
            return path
    raise PluginLoadError(
        f"the pimoe ONNX Runtime op library ({LIBRARY_NAME}) was not found in {[str(p) for p in _SEARCH]}; "
        f"build it with scripts/setup.sh, or set {LIBRARY_ENV} to its path"
    )


@lru_cache(maxsize=8)
def check_ort_library(path: str) -> dict[str, Any]:
    """Load the library once with ctypes and verify it implements this package's op-contract version."""
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise PluginLoadError(f"cannot load {path}: {exc}; rebuild it with scripts/setup.sh") from None
    try:
        version = int(lib.pimoe_ort_contract_version())
        lib.pimoe_ort_cpu_isa.restype = ctypes.c_char_p
        isa = lib.pimoe_ort_cpu_isa().decode()
    except AttributeError:
        raise PluginLoadError(f"{path} is not a pimoe ONNX Runtime op library (no pimoe_ort_contract_version "
                              f"symbol); rebuild it with scripts/setup.sh") from None
    if version != CONTRACT_VERSION:
        raise PluginLoadError(f"{path} implements op contract v{version}, this package needs v{CONTRACT_VERSION}; "
                              f"rebuild it with scripts/setup.sh")
    return {"path": path, "contract_version": version, "cpu_isa": isa}


def session_options(threads: int | None = None, library: str | Path | None = None) -> Any:
    """``ort.SessionOptions`` with the pimoe library registered (``threads``: intra-op thread count)."""
    import onnxruntime as ort

    path = str(library or find_ort_library())
    check_ort_library(path)
    options = ort.SessionOptions()
    options.register_custom_ops_library(path)
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3
    return options


def create_session(
    model: str | Path | bytes,
    *,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    library: str | Path | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` for a pimoe model (CPU provider unless ``providers`` says otherwise)."""
    import onnxruntime as ort

    options = session_options(threads, library)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=list(providers or ["CPUExecutionProvider"]))
