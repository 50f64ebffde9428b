"""A real Triton Inference Server in front of deployable units (``pimoe-export serve``).

The ``tritonserver`` binary and its Python backend come with the ``nvidia-pytriton`` wheel (the ``serve`` extra).
Each unit is verified and loaded as an :class:`~pimoe_export.runtime.engine.Engine` in this process; PyTriton binds
one Triton model per unit whose Python-backend stub forwards every request (over a local IPC socket, no TCP) to the
engine here. So what Triton serves is exactly what ``Engine.run`` computes on the unit:

- model name: ``--name`` or ``<pipeline dir>_<unit dir>`` (as ``pimoe-export triton`` names it); version 1; inputs
  and outputs, their names, dtypes and dims, from the verified manifest's interface;
- dynamic batching (``max_batch > 0``): Triton groups requests along the batch axis (the leading ``batch`` axis of
  every tensor) up to ``max_batch`` rows, waiting at most ``queue_delay_us`` for more; the inference function runs
  each group of equal-shape requests as one ``Engine.run_named`` call and splits the result back per request;
  ``max_batch == 0`` turns batching off: every request runs alone, batch as an explicit dimension;
- HTTP, gRPC and Prometheus metrics listen on ``host`` only (default 127.0.0.1; tritonserver's own default is
  0.0.0.0 for all three, so the address is always passed explicitly), health at ``/v2/health/live|ready``;
- a bad request (wrong shape, dtype, hidden size, empty, outside the unit's profile) is refused by Triton's own
  checks or by the engine's, and comes back to that client as an error; the server keeps serving;
- a decoder unit (an LLM with a KV cache, manifest ``decoder``) is served for generation instead: Triton's generate
  extension (``/v2/models/<name>/generate`` and ``generate_stream``) through a decoupled Python-backend model that
  runs the unit's engine in Triton's stub process and batches concurrent requests per decode step
  (serve/generate_model.py); ``max_batch`` is the most sequences decoded together there;
- :meth:`Server.stop` (the command calls it on SIGINT/SIGTERM) sends SIGINT to tritonserver, which stops taking
  requests and waits for those in flight before it exits; the engines are closed after that.
- PyTriton's start-up race: with ``instances > 1`` the stub of a model's second instance connects to the first
  instance's handshake socket as soon as the socket file exists, which can be before that socket listens; the model
  then fails to load with ``ConnectionRefusedError`` in ``get_config_from_handshake_server``. :meth:`Server.start`
  recognises exactly that failure, stops that tritonserver (the engines stay open) and starts a fresh one, at most
  :data:`START_ATTEMPTS` times in all, saying so on stderr; any other failure, or the race every time, is reported.

libpython: the Python-backend stub is linked against ``libpython3.X.so.1.0`` and must load the *same* library as the
interpreter running PyTriton's side. With a non-system Python (pyenv, a self-built one) the dynamic loader would
otherwise find the distribution's libpython of the same minor version, which then runs against the other Python's
standard library and fails (e.g. ``'_thread.RLock' object has no attribute '_recursion_count'``).
:func:`stub_environment` puts this interpreter's ``LIBDIR`` first on the server's ``LD_LIBRARY_PATH``, and refuses an
interpreter built without a shared libpython unless it is the system's own.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pimoe_export.artifacts.manifest import Unit, read_manifest, verify
from pimoe_export.errors import BackendUnavailableError, PiMoEError, PiMoEInputError
from pimoe_export.interface import BATCH_AXIS, TensorInterface
from pimoe_export.runtime.engine import Engine
from pimoe_export.serve.generate_model import write_generate_model
from pimoe_export.serve.triton import default_model_name

MODEL_VERSION = 1
#: tritonserver starts tried when a model load hits PyTriton's handshake race (module docstring)
START_ATTEMPTS = 3
#: what Triton's load error says when PyTriton's handshake race is what failed it (all of these)
HANDSHAKE_RACE = ("get_config_from_handshake_server", "ConnectionRefusedError")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
#: what `pip install` brings the server (the `serve` extra of pyproject.toml)
INSTALL_HINT = "install the serve extra: .venv/bin/pip install -e '.[serve]' (scripts/setup.sh does)"


class ServeError(PiMoEError, ValueError):
    """A serve request that cannot be honoured as given (names, ports, batch size against the unit's profile)."""


@dataclass(frozen=True)
class ServeOptions:
    """Server settings (the command's flags)."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 8  # 0: no dynamic batching
    queue_delay_us: int = 200
    instances: int = 1
    exit_timeout_s: int = 30
    log_verbose: int = 0


@dataclass
class ServedModel:
    """One unit behind one Triton model (``engine`` None: a decoder unit, served by its generate model, whose engine
    lives in Triton's stub process)."""

    name: str
    unit: Unit
    engine: Engine | None
    version: int = MODEL_VERSION
    batching: bool = False
    max_batch: int = 0
    calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def generates(self) -> bool:
        return self.engine is None


# ---------------------------------------------------------------------------------------------- environment
def import_pytriton() -> Any:
    """The pytriton package, or BackendUnavailableError naming the extra that brings it."""
    try:
        import pytriton.triton
    except ImportError as exc:
        raise BackendUnavailableError(f"serving needs nvidia-pytriton (tritonserver + Python backend), which is not "
                                      f"importable here ({exc}); {INSTALL_HINT}") from None
    return pytriton


def stub_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment variables tritonserver needs so that its Python-backend stub loads this interpreter's
    libpython (see the module docstring): ``{"LD_LIBRARY_PATH": ...}``, or ``{}`` when nothing is needed."""
    environ = dict(os.environ) if environ is None else environ
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    soname = sysconfig.get_config_var("INSTSONAME") or ""
    shared = bool(sysconfig.get_config_var("Py_ENABLE_SHARED"))
    if shared and libdir and soname and (Path(libdir) / soname).exists():
        current = [p for p in environ.get("LD_LIBRARY_PATH", "").split(":") if p]
        if current[:1] == [libdir]:
            return {}
        return {"LD_LIBRARY_PATH": ":".join([libdir, *[p for p in current if p != libdir]])}
    if Path(sys.base_prefix).resolve() == Path("/usr"):
        return {}  # the distribution's Python: the stub finds its libpython in the system library path
    raise BackendUnavailableError(
        f"this Python ({sys.executable}, {sys.version.split()[0]}) has no shared libpython (Py_ENABLE_SHARED=0), so "
        f"Triton's Python-backend stub would load a different Python's library; recreate .venv with a Python built "
        f"with --enable-shared (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install ...) or the system python3")


def check_ports_free(options: ServeOptions) -> None:
    """Refuse (ServeError) a port that is already taken on the address, before tritonserver fails on it."""
    for flag, port in (("--http-port", options.http_port), ("--grpc-port", options.grpc_port),
                       ("--metrics-port", options.metrics_port)):
        family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((options.host, port))
            except OSError as exc:
                raise ServeError(f"cannot listen on {options.host}:{port} ({exc.strerror or exc}); choose another "
                                 f"{flag}, or another --host") from None


def wait_ports_free(options: ServeOptions, timeout_s: float = 30.0) -> None:
    """Wait until the server's ports can be bound again (a stopped tritonserver may take a moment to let go of them);
    after ``timeout_s``, check_ports_free's refusal."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check_ports_free(options)
            return
        except ServeError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def hit_handshake_race(exc: BaseException) -> bool:
    """Whether a failed start is PyTriton's handshake race (module docstring), judged by the load error's text."""
    text = str(exc)
    return all(marker in text for marker in HANDSHAKE_RACE)


# ---------------------------------------------------------------------------------------------- models
def _batchable(engine: Engine) -> bool:
    specs = (*engine.interface.inputs, *engine.interface.outputs)
    return all(spec.dims and spec.dims[0] == BATCH_AXIS for spec in specs)


def _check_options(options: ServeOptions) -> None:
    ports = [options.http_port, options.grpc_port, options.metrics_port]
    if len(set(ports)) != len(ports) or not all(1 <= p <= 65535 for p in ports):
        raise ServeError(f"the HTTP, gRPC and metrics ports must be distinct and in 1..65535, got {ports}")
    if options.max_batch < 0 or options.queue_delay_us < 0 or options.instances < 1:
        raise ServeError("--max-batch and --queue-delay-us must be >= 0 and --instances >= 1")


def load_models(units: Sequence[str | Path], name: str | None, options: ServeOptions,
                threads: int | None = None) -> list[ServedModel]:
    """Verify and load every unit (a unit that does not verify is refused: ArtifactError, nothing served)."""
    _check_options(options)
    if name is not None and len(units) != 1:
        raise ServeError(f"--name names one model, but {len(units)} units were given; serve them under their "
                         "default names (<pipeline dir>_<unit dir>) or start one server per unit")
    names = [name] if name is not None else [default_model_name(u) for u in units]
    for model_name in names:
        if not _NAME.match(model_name):
            raise ServeError(f"model name {model_name!r} is not usable by Triton: use letters, digits, '_', '-' and "
                             "'.', not starting with '.'")
    if len(set(names)) != len(names):
        raise ServeError(f"two units would be served under the same model name ({names}); serve them separately "
                         "with --name")
    models: list[ServedModel] = []
    try:
        for unit_dir, model_name in zip(units, names, strict=True):
            if read_manifest(unit_dir).decoder:
                unit = verify(unit_dir)  # the stub process loads it again, verified again
                models.append(ServedModel(model_name, unit, None, **_decoding_rows(unit, options)))
                continue
            engine = Engine.load(unit_dir, threads=threads)
            models.append(ServedModel(model_name, engine.unit, engine, **_batching(engine, unit_dir, options)))
    except BaseException:
        for model in models:
            if model.engine is not None:
                model.engine.close()
        raise
    return models


def _decoding_rows(unit: Unit, options: ServeOptions) -> dict[str, Any]:
    rows = max(options.max_batch, 1)
    if rows > unit.manifest.profile.max_shape[0]:
        raise ServeError(f"--max-batch {rows} is more rows than {unit.dir}'s profile takes (batch up to "
                         f"{unit.manifest.profile.max_shape[0]})")
    return {"batching": options.max_batch > 0, "max_batch": rows}


def _batching(engine: Engine, unit_dir: str | Path, options: ServeOptions) -> dict[str, Any]:
    if options.max_batch == 0:
        return {"batching": False, "max_batch": 0}
    profile = engine.manifest.profile
    if not _batchable(engine):
        raise ServeError(f"{unit_dir}: not every input and output has a leading batch axis, so Triton cannot batch "
                         "its requests; serve it with --max-batch 0")
    if profile.min_shape[0] > 1 or options.max_batch > profile.max_shape[0]:
        raise ServeError(f"--max-batch {options.max_batch} does not fit {unit_dir}'s profile (batch "
                         f"{profile.min_shape[0]}..{profile.max_shape[0]}); use --max-batch between 1 and "
                         f"{profile.max_shape[0]}, or 0 to turn dynamic batching off")
    return {"batching": True, "max_batch": options.max_batch}


def triton_tensors(specs: Sequence[TensorInterface], batching: bool) -> list[Any]:
    """PyTriton tensor declarations: dynamic axes -1; with batching, without the batch axis (Triton adds it)."""
    from pytriton.model_config import Tensor

    result = []
    for spec in specs:
        dims = tuple(-1 if isinstance(d, str) else int(d) for d in spec.dims)
        result.append(Tensor(name=spec.name, dtype=np.dtype(spec.dtype), shape=dims[1:] if batching else dims))
    return result


# ---------------------------------------------------------------------------------------------- inference
def _request_arrays(model: ServedModel, request: Any) -> dict[str, np.ndarray]:
    names = model.engine.interface.input_names
    missing = [n for n in names if n not in request]
    if missing:
        raise PiMoEInputError(f"model {model.name} takes the inputs {list(names)}; missing {missing}")
    return {n: np.asarray(request[n]) for n in names}


def infer_requests(model: ServedModel, requests: Sequence[Any]) -> list[dict[str, np.ndarray]]:
    """Run Triton's requests (one, or a dynamic batch of several) through the engine: consecutive requests of equal
    shapes are concatenated along the batch axis into one ``run_named`` call and the outputs split back."""
    feeds = [_request_arrays(model, r) for r in requests]
    results: list[dict[str, np.ndarray]] = []
    start = 0
    while start < len(feeds):
        key = {n: a.shape[1:] for n, a in feeds[start].items()}
        end = start + 1
        while model.batching and end < len(feeds) and {n: a.shape[1:] for n, a in feeds[end].items()} == key:
            end += 1
        group = feeds[start:end]
        if len(group) == 1:
            outputs = model.engine.run_named(group[0])
            results.append({k: np.asarray(v) for k, v in outputs.items()})
        else:
            joined = {n: np.concatenate([f[n] for f in group]) for n in key}
            outputs = model.engine.run_named(joined)
            sizes = np.cumsum([next(iter(f.values())).shape[0] for f in group])[:-1]
            pieces = {k: np.split(np.asarray(v), sizes) for k, v in outputs.items()}
            results.extend({k: pieces[k][i] for k in pieces} for i in range(len(group)))
        start = end
    with model.lock:
        model.calls += 1
    return results


def make_infer_function(model: ServedModel) -> Callable[[list[Any]], list[dict[str, np.ndarray]]]:
    def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        try:
            return infer_requests(model, requests)
        except PiMoEError as exc:  # the client gets this one line (PyTriton adds the traceback of this frame)
            raise PiMoEInputError(f"model {model.name}: {exc}") from None

    infer.__name__ = f"infer_{re.sub(r'[^A-Za-z0-9_]', '_', model.name)}"
    return infer


# ---------------------------------------------------------------------------------------------- server
def triton_config(options: ServeOptions, repository: Path | None = None) -> Any:
    from pytriton.triton import TritonConfig

    return TritonConfig(
        model_repository=repository,
        http_address=options.host, http_port=options.http_port,
        grpc_address=options.host, grpc_port=options.grpc_port,
        metrics_address=options.host, metrics_port=options.metrics_port,
        allow_metrics=True, allow_gpu_metrics=False, allow_cpu_metrics=True,
        allow_sagemaker=False, allow_vertex_ai=False,
        exit_timeout_secs=options.exit_timeout_s, log_verbose=options.log_verbose,
    )


class Server:
    """tritonserver with one model per unit (see the module docstring). ``start`` returns once every model is
    ready; ``stop`` drains in-flight requests, stops the server and closes the engines."""

    def __init__(self, models: list[ServedModel], options: ServeOptions) -> None:
        self.models = models
        self.options = options
        self._triton: Any = None
        self._repository: Path | None = None
        self.threads: int | None = None

    def start(self) -> None:
        import_pytriton()
        check_ports_free(self.options)
        os.environ.update(stub_environment())  # tritonserver inherits this process's environment
        logging.getLogger("pytriton").setLevel(logging.DEBUG if self.options.log_verbose else logging.WARNING)
        self._repository = Path(tempfile.mkdtemp(prefix="pimoe-serve-"))  # tritonserver loads every model in it
        try:
            for model in self.models:
                if model.generates:
                    write_generate_model(self._repository, model.name, model.unit.dir, model.max_batch, self.threads)
            for attempt in range(1, START_ATTEMPTS + 1):
                try:
                    self._run_triton()
                    return
                except Exception as exc:
                    self._stop_triton()
                    if not hit_handshake_race(exc):
                        raise
                    if attempt == START_ATTEMPTS:
                        raise ServeError(
                            f"tritonserver could not load the models in {START_ATTEMPTS} starts: each time a model "
                            f"instance's stub connected to PyTriton's handshake socket before it listened (a start-up "
                            f"race in PyTriton with --instances > 1); run serve again, or with --instances 1") from exc
                    print(f"serve: PyTriton's handshake race failed a model load at start {attempt} of "
                          f"{START_ATTEMPTS} (--instances {self.options.instances}); starting tritonserver again",
                          file=sys.stderr, flush=True)
                    wait_ports_free(self.options)
        except BaseException:
            self.stop()
            raise

    def _run_triton(self) -> None:
        """Start one tritonserver, bind every ONNX model unit and wait until all models are loaded."""
        from pytriton.model_config import DynamicBatcher, ModelConfig
        from pytriton.triton import Triton

        triton = Triton(config=triton_config(self.options, self._repository))
        self._triton = triton
        for model in (m for m in self.models if not m.generates):
            config = ModelConfig(batching=model.batching, max_batch_size=model.max_batch,
                                 batcher=DynamicBatcher(max_queue_delay_microseconds=self.options.queue_delay_us))
            interface = model.engine.interface
            triton.bind(model_name=model.name, model_version=model.version,
                        infer_func=[make_infer_function(model) for _ in range(self.options.instances)],
                        inputs=triton_tensors(interface.inputs, model.batching),
                        outputs=triton_tensors(interface.outputs, model.batching), config=config, strict=True)
        triton.run()

    def _stop_triton(self) -> None:
        triton, self._triton = self._triton, None
        if triton is not None:
            triton.stop()

    def is_alive(self) -> bool:
        return self._triton is not None and bool(self._triton.is_alive())

    def stop(self) -> None:
        try:
            self._stop_triton()
        finally:
            for model in self.models:
                if model.engine is not None:
                    model.engine.close()
            if self._repository is not None:
                shutil.rmtree(self._repository, ignore_errors=True)
                self._repository = None

    def urls(self) -> dict[str, str]:
        host = f"[{self.options.host}]" if ":" in self.options.host else self.options.host
        return {"http": f"http://{host}:{self.options.http_port}", "grpc": f"{host}:{self.options.grpc_port}",
                "metrics": f"http://{host}:{self.options.metrics_port}/metrics"}
