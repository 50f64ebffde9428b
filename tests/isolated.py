"""Native code fed bad input, run in a separate process: a refusal is checked as an assertion on its message, and a
bug that makes the native code accept the input and crash (an out-of-bounds read or write: k > E accepted, an id
equal to E accepted) fails the one test that fed it, naming the case, instead of killing the test run.

    outcome = isolated().call(ort_run, model_bytes, feeds)      # ("ok", result) | ("error", type, message)
    assert_refused(outcome, "is outside [0, 4)", "PiMoEDispatch with id 4")  #   | ("crashed", detail)

The worker is one spawned Python process (no fork of this process: torch and ONNX Runtime threads are not fork-safe)
kept for the session and replaced after a crash. It imports the package the test process imports (the same
sys.path) and inherits the environment (PIMOE_ORT_LIBRARY, a mutation run's MUTANT_UNDER_TEST); ``env`` adds
variables read once per process (PIMOE_CPU_ISA).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

Outcome = tuple


def _init(env: dict[str, str]) -> None:
    os.environ.update(env)


def _call(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Outcome:
    try:
        return ("ok", fn(*args, **kwargs))
    except Exception as exc:  # any refusal: its type and message travel back as text
        return ("error", type(exc).__name__, str(exc))


class Isolated:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = dict(env or {})
        self._pool: ProcessPoolExecutor | None = None

    def _discard(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        for process in list(getattr(pool, "_processes", {}).values()):  # a hung worker is killed, not waited for
            if process.is_alive():
                process.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 600, **kwargs: Any) -> Outcome:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_init,
                                             initargs=(self.env,))
        future = self._pool.submit(_call, fn, args, kwargs)
        try:
            return future.result(timeout)
        except BrokenProcessPool as exc:
            self._discard()
            return ("crashed", f"the process running it died ({exc})")
        except FutureTimeout:
            self._discard()
            return ("crashed", f"no answer within {timeout:g} s (hung)")

    def close(self) -> None:
        self._discard()


_WORKERS: dict[tuple[tuple[str, str], ...], Isolated] = {}


def isolated(env: dict[str, str] | None = None) -> Isolated:
    """The session's worker for ``env``."""
    key = tuple(sorted((env or {}).items()))
    if key not in _WORKERS:
        _WORKERS[key] = Isolated(env)
    return _WORKERS[key]


def assert_refused(outcome: Outcome, fragment: str, what: str, types: Sequence[str] | None = None) -> str:
    """``outcome`` is an error whose message holds ``fragment`` (and whose type is one of ``types``); returns it."""
    if outcome[0] == "crashed":
        raise AssertionError(f"{what}: crashed instead of refusing it ({outcome[1]}); expected an error saying "
                             f"{fragment!r}")
    if outcome[0] == "ok":
        raise AssertionError(f"{what}: accepted; expected an error saying {fragment!r}")
    _, kind, message = outcome
    assert fragment in message, f"{what}: refused, but the message does not say {fragment!r}: {kind}: {message}"
    if types is not None:
        assert kind in types, f"{what}: refused with {kind}, expected one of {list(types)}: {message}"
    return message


def assert_ran(outcome: Outcome, what: str) -> Any:
    """``outcome`` is a result (no error, no crash); returns it."""
    assert outcome[0] == "ok", f"{what}: {outcome[1:]}"
    return outcome[1]


# ------------------------------------------------------------------------------------------ what the worker runs
def ort_session(model: bytes, threads: int | None = None) -> None:
    """Create (only) an ONNX Runtime session of ``model`` with the pimoe op library."""
    from pimoe_export.runtime.ort import create_session

    create_session(model, threads=threads)


def ort_run(model: bytes, feeds: dict[str, np.ndarray], threads: int | None = None,
            library: str | None = None) -> list[np.ndarray]:
    """Run ``model`` once on ``feeds`` with the pimoe op library (``library``: another build of it, such as the ORT
    CUDA-EP kernels on the emulated GPU)."""
    from pimoe_export.runtime.ort import create_session

    return [np.asarray(o) for o in create_session(model, threads=threads, library=library).run(None, feeds)]


def harness_prepare(op: str, fields: dict[str, Any], inputs: list[tuple[tuple[int, ...], Any]],
                    emulated: bool = True) -> None:
    """Prepare (creator -> plugin -> build calls) and release one plugin through the harness."""
    from pimoe_export.testing.harness import Harness, find_harness

    path = find_harness(emulated=emulated)
    if path is None:
        raise LookupError("harness not built")
    harness = Harness(path)
    harness.release(harness.prepare(op, fields, inputs))


def emulated_op(method: str, *args: Any, **kwargs: Any) -> Any:
    """One op of the emulated-GPU backend (the TensorRT plugin objects and CUDA kernels on the CPU emulator)."""
    from pimoe_export.testing.harness import emulated_backend_or_none

    backend = emulated_backend_or_none()
    if backend is None:
        raise LookupError("emulated harness not built")
    return getattr(backend, method)(*args, **kwargs)


def harness_op(emulated: bool, method: str, *args: Any, **kwargs: Any) -> Any:
    """One op of the TensorRT plugin objects through the harness: on the emulated GPU, or on a CUDA GPU."""
    from pimoe_export.testing.harness import cuda_backend_or_none, emulated_backend_or_none

    backend = emulated_backend_or_none() if emulated else cuda_backend_or_none()
    if backend is None:
        raise LookupError("harness not built" if emulated else "no CUDA GPU or CUDA harness")
    return getattr(backend, method)(*args, **kwargs)


def emulated_available() -> bool:
    from pimoe_export.testing.harness import find_harness

    return find_harness(emulated=True) is not None


def harness_backend_run(emulated: bool, op: str, attrs: dict[str, Any], arrays: list[np.ndarray],
                        check_status: bool = True) -> list[np.ndarray]:
    """One run of ``op`` through the plugin objects of the emulated (or the CUDA) harness build (``check_status``
    False: the outputs of a run whose input data the kernels reported, without raising the report)."""
    from pimoe_export.testing.harness import Harness, HarnessOpBackend, find_harness

    path = find_harness(emulated=emulated)
    if path is None:
        raise LookupError("harness not built")
    return HarnessOpBackend(Harness(path)).run(op, attrs, arrays, check_status)


def profile_session_run(op: str, attrs: dict[str, Any], profile: Any, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Build ``op`` for ``profile`` on the emulated harness and run it once on ``arrays`` (shapes the profile may
    not cover)."""
    from pimoe_export.testing.harness import Harness, PluginSession, find_harness

    path = find_harness(emulated=True)
    if path is None:
        raise LookupError("emulated harness not built")
    with PluginSession(Harness(path), op, attrs, profile) as session:
        return session.run(arrays)


@contextmanager
def limited_memory(extra_bytes: int) -> Iterator[None]:
    """Cap this (worker) process's address space at what it maps now plus ``extra_bytes`` while inside: a copy the
    code under test should never make fails with MemoryError instead of exhausting the machine."""
    import resource

    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    mapped = int(status["VmSize"].split()[0]) * 1024
    before = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra_bytes, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, before)


def engine_run_broadcast(unit_dir: str, shape: tuple[int, ...], extra_bytes: int) -> tuple[str, str, int]:
    """Engine.run on a zero-stride float32 input of ``shape`` with the address space capped (:func:`limit_memory`):
    (the error type, its message, the peak of Python allocations) when the engine refuses it."""
    import tracemalloc

    from pimoe_export.errors import PiMoEInputError
    from pimoe_export.runtime.engine import Engine

    with Engine.load(unit_dir) as engine, limited_memory(extra_bytes):
        huge = np.broadcast_to(np.zeros(1, np.float32), shape)
        tracemalloc.start()
        try:
            engine.run(huge)
        except PiMoEInputError as exc:
            return type(exc).__name__, str(exc), tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    return "accepted", "", 0
