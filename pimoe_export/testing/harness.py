"""ctypes binding of plugins/harness: the pimoe TensorRT plugin objects, driven without TensorRT.

Two builds of one C API (plugins/harness/pimoe_harness.h):

- ``libpimoe_trt_harness.so`` (CUDA, built where nvcc is): the plugins' ``enqueue`` runs the CUDA kernels on a GPU.
  Needs a GPU to run kernels: ``scripts/gpu_check.sh`` runs it (verification rung 6, docs/verification.md).
- ``libpimoe_trt_harness_emu.so`` (plugins/emu, built everywhere): the same kernels, plugins and harness compiled
  against the CPU CUDA emulator; "device" memory is host memory. CI runs every op through it (rung 5e).

Layers, from the C API up:

- :class:`Harness` wraps the C API: ``prepare_profile`` builds a plugin for an optimisation profile the way
  TensorRT's builder does (symbolic output shapes, ``configurePlugin`` with min/opt/max, ``getWorkspaceSize`` for
  the profile, serialise, deserialise, ``attachToContext``); ``set_shapes`` is ``onShapeChange`` for one run shape;
  ``enqueue`` runs the kernels. Device memory comes from the build's own CUDA runtime (``alloc``/``copy``).
- :class:`PluginSession` is one built plugin with its build-time workspace (an execution context): ``run`` takes
  numpy arrays of any shape inside the profile, and checks after every run that no kernel wrote outside the
  workspace or the outputs (guard bytes around every buffer) and that the inputs are unchanged.
- :class:`HarnessOpBackend` runs single ops on numpy arrays (the ``emu`` and ``trt-harness`` op-test backends).
- :class:`BoundOp` binds a plugin to torch CUDA tensors for benchmarks and CUDA-graph capture (GPU only).

Nothing here imports torch except :class:`BoundOp` and :meth:`Harness.run_torch`.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pimoe_export.errors import PiMoEError, PluginLoadError
from pimoe_export.ops import schema

# nvinfer1::PluginFieldType
FIELD_FLOAT32, FIELD_FLOAT64, FIELD_INT8, FIELD_INT32, FIELD_CHAR, FIELD_INT64 = 1, 2, 3, 5, 6, 10
# nvinfer1::DataType
DT_FLOAT, DT_HALF, DT_INT8, DT_INT32 = 0, 1, 2, 3
_NP_TO_DT = {np.dtype(np.float32): DT_FLOAT, np.dtype(np.float16): DT_HALF, np.dtype(np.int8): DT_INT8,
             np.dtype(np.int32): DT_INT32}
_DT_TO_NP = {v: k for k, v in _NP_TO_DT.items()}
_HOST_TO_DEVICE, _DEVICE_TO_HOST = 1, 2

#: bytes of guard pattern before and after every buffer a PluginSession allocates (a multiple of 256 keeps the
#: 256-byte alignment of cudaMalloc); 0 under AddressSanitizer, which then sees exact-size heap blocks instead
GUARD_ENV = "PIMOE_HARNESS_GUARD_BYTES"
_GUARD_BYTE = 0xA5

Shape = tuple[int, ...]
ShapeAndDtype = tuple[Sequence[int], Any]  # (shape, numpy dtype)


class HarnessError(PiMoEError, RuntimeError):
    """A plugin entry point returned an error status (the message is the plugin's own)."""


class HarnessDataError(HarnessError):
    """The kernels ran but recorded inconsistent input data in their device status block."""


class HarnessMemoryError(HarnessError):
    """A kernel wrote outside the buffers it was given (workspace, outputs) or into an input."""


@dataclass(frozen=True)
class RawField:
    """A plugin field with an explicit PluginFieldType code, for tests of unusual or wrong field types."""

    type: int
    values: np.ndarray


class _Field(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("data", ctypes.c_void_p), ("type", ctypes.c_int32),
                ("length", ctypes.c_int32)]


class _Desc(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int32), ("rank", ctypes.c_int32), ("dims", ctypes.c_int64 * 8)]


def _attr_kind(op: str, name: str) -> str | None:
    try:
        return schema.SCHEMAS[op].attribute(name).kind
    except KeyError:
        return None


def make_fields(op: str, attrs: Mapping[str, Any]) -> tuple[ctypes.Array, list[Any]]:
    """Plugin fields as TensorRT's ONNX parser would pass them (INT(S) -> kINT32, FLOAT(S) -> kFLOAT32,
    STRING -> kCHAR with a NUL). Returns the ctypes array and the buffers it points into (keep both alive)."""
    keep: list[Any] = []
    fields = (_Field * max(1, len(attrs)))()
    for i, (name, value) in enumerate(attrs.items()):
        kind = _attr_kind(op, name)
        if isinstance(value, RawField):
            code, data = value.type, np.ascontiguousarray(value.values)
        elif isinstance(value, str):
            code, data = FIELD_CHAR, np.frombuffer(value.encode() + b"\0", dtype=np.int8).copy()
        elif kind in ("float", "floats") or (kind is None and isinstance(value, float)):
            code, data = FIELD_FLOAT32, np.atleast_1d(np.asarray(value, dtype=np.float32))
        else:
            code, data = FIELD_INT32, np.atleast_1d(np.asarray(value, dtype=np.int32))
        keep += [name.encode(), data]
        length = len(data) if code != FIELD_CHAR else data.size
        fields[i] = _Field(keep[-2], data.ctypes.data if data.size else None, code, length)
    return fields, keep


def expert_mlp_fields(expert_ids, widths, activation, layer_norm, eps=1e-5, quant_mode="none", act_scales=(),
                      **v2: Any) -> dict[str, Any]:
    """PiMoEExpertMLP plugin fields from the op's attributes (``v2``: gated, bias, alpha, limit, given ones only)."""
    return {"expert_ids": [int(e) for e in expert_ids], "widths": [int(w) for w in widths], "activation": activation,
            "layer_norm": int(layer_norm), "eps": float(eps), "quant_mode": quant_mode,
            "act_scales": [float(s) for s in act_scales]} | _fields_v2(v2)


def _fields_v2(v2: Mapping[str, Any]) -> dict[str, Any]:
    return {name: int(value) if isinstance(value, bool) else value for name, value in v2.items()}


def _desc(shape: Sequence[int], dtype: Any) -> _Desc:
    d = _Desc()
    d.dtype = _NP_TO_DT[np.dtype(dtype)]
    d.rank = len(shape)
    for i, s in enumerate(shape):
        d.dims[i] = int(s)
    return d


def _descs(specs: Sequence[ShapeAndDtype]) -> ctypes.Array:
    return (_Desc * max(1, len(specs)))(*[_desc(s, d) for s, d in specs])


@dataclass
class Prepared:
    """A built plugin: its outputs for the current run shapes (-1 where they depend on an unset run shape) and
    the workspace TensorRT would allocate for its profile."""

    handle: ctypes.c_void_p
    outputs: list[tuple[Shape, np.dtype]]
    workspace: int


@dataclass(frozen=True)
class PluginProfile:
    """An optimisation profile: (min, opt, max) shape of every input, and the input dtypes."""

    min: tuple[Shape, ...]
    opt: tuple[Shape, ...]
    max: tuple[Shape, ...]
    dtypes: tuple[np.dtype, ...]

    @classmethod
    def fixed(cls, inputs: Sequence[ShapeAndDtype]) -> PluginProfile:
        shapes = tuple(tuple(int(d) for d in s) for s, _ in inputs)
        return cls(shapes, shapes, shapes, tuple(np.dtype(d) for _, d in inputs))

    def specs(self, which: Sequence[Shape]) -> list[ShapeAndDtype]:
        return list(zip(which, self.dtypes, strict=True))


class Harness:
    """The C API of libpimoe_trt_harness[_emu].so (see plugins/harness/pimoe_harness.h)."""

    def __init__(self, path: str | Path) -> None:
        lib = ctypes.CDLL(str(path))
        vp, i32, size = ctypes.c_void_p, ctypes.c_int32, ctypes.c_size_t
        lib.pimoe_harness_last_error.restype = ctypes.c_char_p
        lib.pimoe_harness_prepare.argtypes = [ctypes.c_char_p, vp, i32, vp, i32, ctypes.POINTER(vp)]
        lib.pimoe_harness_prepare_profile.argtypes = [ctypes.c_char_p, vp, i32, vp, vp, vp, i32, ctypes.POINTER(vp)]
        lib.pimoe_harness_set_input_shapes.argtypes = [vp, vp, i32]
        lib.pimoe_harness_num_outputs.argtypes = [vp]
        lib.pimoe_harness_output_desc.argtypes = [vp, i32, ctypes.POINTER(_Desc)]
        lib.pimoe_harness_workspace_size.argtypes = [vp]
        lib.pimoe_harness_workspace_size.restype = size
        lib.pimoe_harness_enqueue.argtypes = [vp, vp, vp, vp, vp]
        lib.pimoe_harness_check_status.argtypes = [vp, vp]
        lib.pimoe_harness_enqueue_counting_allocations.argtypes = [vp, vp, vp, vp, vp,
                                                                   ctypes.POINTER(ctypes.c_longlong)]
        lib.pimoe_harness_release.argtypes = [vp]
        lib.pimoe_harness_device_alloc.argtypes = [size, ctypes.POINTER(vp)]
        lib.pimoe_harness_device_free.argtypes = [vp]
        lib.pimoe_harness_copy.argtypes = [vp, vp, size, i32]
        lib.pimoe_harness_emulator_diagnostics.argtypes = []
        self.lib = lib
        self.path = str(path)
        self.emulated = bool(lib.pimoe_harness_is_emulated())
        if lib.pimoe_harness_contract_version() != schema.CONTRACT_VERSION:
            raise HarnessError(f"{path} implements another op contract version; rebuild it")

    def last_error(self) -> str:
        return (self.lib.pimoe_harness_last_error() or b"").decode()

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise HarnessError(self.last_error())

    # -------------------------------------------------------------------------------------- build / shapes
    def prepare(self, op: str, attrs: Mapping[str, Any], inputs: Sequence[ShapeAndDtype]) -> Prepared:
        """Build `op` for fixed input shapes (a one-shape profile) and set them; no GPU needed."""
        fields, keep = make_fields(op, attrs)
        handle = ctypes.c_void_p()
        rc = self.lib.pimoe_harness_prepare(op.encode(), ctypes.cast(fields, ctypes.c_void_p), len(attrs),
                                            ctypes.cast(_descs(inputs), ctypes.c_void_p), len(inputs),
                                            ctypes.byref(handle))
        del keep
        self._check(rc)
        return self._prepared(handle)

    def prepare_profile(self, op: str, attrs: Mapping[str, Any], profile: PluginProfile) -> Prepared:
        """Build `op` for an optimisation profile, as TensorRT's builder would; no GPU needed."""
        fields, keep = make_fields(op, attrs)
        handle = ctypes.c_void_p()
        rc = self.lib.pimoe_harness_prepare_profile(
            op.encode(), ctypes.cast(fields, ctypes.c_void_p), len(attrs),
            *[ctypes.cast(_descs(profile.specs(s)), ctypes.c_void_p) for s in (profile.min, profile.opt, profile.max)],
            len(profile.dtypes), ctypes.byref(handle))
        del keep
        self._check(rc)
        return self._prepared(handle)

    def set_shapes(self, prepared: Prepared, inputs: Sequence[ShapeAndDtype]) -> list[tuple[Shape, np.dtype]]:
        """onShapeChange for run shapes inside the profile; returns (and records) the output shapes."""
        self._check(self.lib.pimoe_harness_set_input_shapes(prepared.handle,
                                                            ctypes.cast(_descs(inputs), ctypes.c_void_p), len(inputs)))
        prepared.outputs = self._outputs(prepared.handle)
        return prepared.outputs

    def _outputs(self, handle: ctypes.c_void_p) -> list[tuple[Shape, np.dtype]]:
        outputs = []
        for i in range(self.lib.pimoe_harness_num_outputs(handle)):
            d = _Desc()
            self._check(self.lib.pimoe_harness_output_desc(handle, i, ctypes.byref(d)))
            outputs.append((tuple(int(d.dims[j]) for j in range(d.rank)), _DT_TO_NP[d.dtype]))
        return outputs

    def _prepared(self, handle: ctypes.c_void_p) -> Prepared:
        try:
            return Prepared(handle, self._outputs(handle), int(self.lib.pimoe_harness_workspace_size(handle)))
        except HarnessError:
            self.lib.pimoe_harness_release(handle)
            raise

    def release(self, prepared: Prepared) -> None:
        if prepared.handle:
            self.lib.pimoe_harness_release(prepared.handle)
            prepared.handle = ctypes.c_void_p()

    # -------------------------------------------------------------------------------------- run
    def enqueue(self, prepared: Prepared, inputs: Sequence[int], outputs: Sequence[int], workspace: int,
                stream: int = 0) -> None:
        in_ptrs = (ctypes.c_void_p * max(1, len(inputs)))(*[p or None for p in inputs])
        out_ptrs = (ctypes.c_void_p * max(1, len(outputs)))(*[p or None for p in outputs])
        self._check(self.lib.pimoe_harness_enqueue(prepared.handle, in_ptrs, out_ptrs, workspace or None,
                                                   stream or None))

    def enqueue_counting_allocations(self, prepared: Prepared, inputs: Sequence[int], outputs: Sequence[int],
                                     workspace: int, stream: int = 0) -> int:
        """``enqueue``, returning the heap allocations the calling thread made during it. Needs the counting
        allocator (libpimoe_alloc_counter.so, next to the harness) in LD_PRELOAD."""
        in_ptrs = (ctypes.c_void_p * max(1, len(inputs)))(*[p or None for p in inputs])
        out_ptrs = (ctypes.c_void_p * max(1, len(outputs)))(*[p or None for p in outputs])
        count = ctypes.c_longlong(-1)
        self._check(self.lib.pimoe_harness_enqueue_counting_allocations(
            prepared.handle, in_ptrs, out_ptrs, workspace or None, stream or None, ctypes.byref(count)))
        return int(count.value)

    def check_status(self, prepared: Prepared, stream: int = 0, raise_data_error: bool = True) -> None:
        """Synchronise, read and clear the plugin's device status (it persists across enqueues):
        HarnessDataError for bad input data met since the last check (when asked)."""
        status = self.lib.pimoe_harness_check_status(prepared.handle, stream or None)
        if status < 0:
            raise HarnessError(self.last_error())
        if status > 0 and raise_data_error:
            raise HarnessDataError(self.last_error())

    def emulator_diagnostics(self) -> int:
        """Errors + warnings the emulator reported on stderr since the last call (0 for the CUDA build)."""
        return int(self.lib.pimoe_harness_emulator_diagnostics())

    # -------------------------------------------------------------------------------------- device memory
    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check(self.lib.pimoe_harness_device_alloc(nbytes, ctypes.byref(ptr)))
        return int(ptr.value or 0)

    def free(self, ptr: int) -> None:
        if ptr:
            self._check(self.lib.pimoe_harness_device_free(ptr))

    def upload(self, ptr: int, data: bytes | np.ndarray) -> None:
        buf = np.ascontiguousarray(np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data)
        if buf.nbytes:
            self._check(self.lib.pimoe_harness_copy(ptr, buf.ctypes.data, buf.nbytes, _HOST_TO_DEVICE))

    def download(self, ptr: int, nbytes: int) -> np.ndarray:
        out = np.empty(nbytes, np.uint8)
        if nbytes:
            self._check(self.lib.pimoe_harness_copy(out.ctypes.data, ptr, nbytes, _DEVICE_TO_HOST))
        return out

    # -------------------------------------------------------------------------------------- torch (GPU)
    def run_torch(self, op: str, attrs: Mapping[str, Any], inputs: Sequence[Any],
                  check_status: bool = True) -> list[Any]:
        """Enqueue `op` on torch CUDA tensors (current stream) and return its output tensors. Needs a CUDA GPU."""
        import torch

        prepared = self.prepare(op, attrs, [(tuple(t.shape), _torch_to_np(t.dtype)) for t in inputs])
        try:
            device = inputs[0].device
            outputs = [torch.empty(s, dtype=_np_to_torch(d), device=device) for s, d in prepared.outputs]
            workspace = torch.empty(max(prepared.workspace, 256), dtype=torch.uint8, device=device)
            stream = torch.cuda.current_stream(device).cuda_stream
            self.enqueue(prepared, [t.data_ptr() for t in inputs], [t.data_ptr() for t in outputs],
                         workspace.data_ptr(), stream)
            self.check_status(prepared, stream, check_status)
            return outputs
        finally:
            self.release(prepared)


def guard_bytes() -> int:
    value = os.environ.get(GUARD_ENV, "256")
    try:
        guard = int(value)
    except ValueError:
        raise HarnessError(f"{GUARD_ENV}={value!r} is not a number of bytes") from None
    if guard < 0 or guard % 256:
        raise HarnessError(f"{GUARD_ENV}={guard} must be a non-negative multiple of 256")
    return guard


class DeviceBuffer:
    """`nbytes` of device memory from the harness's CUDA runtime, between two guard regions of a known pattern."""

    def __init__(self, harness: Harness, nbytes: int, guard: int) -> None:
        self.harness, self.nbytes, self.guard = harness, int(nbytes), guard
        self.base = harness.alloc(self.nbytes + 2 * guard)
        self.ptr = self.base + guard
        if guard:
            pattern = bytes([_GUARD_BYTE]) * guard
            harness.upload(self.base, pattern)
            harness.upload(self.ptr + self.nbytes, pattern)

    def guards_intact(self) -> bool:
        if not self.guard:
            return True
        before = self.harness.download(self.base, self.guard)
        after = self.harness.download(self.ptr + self.nbytes, self.guard)
        return bool((before == _GUARD_BYTE).all() and (after == _GUARD_BYTE).all())

    def read(self) -> np.ndarray:
        return self.harness.download(self.ptr, self.nbytes)

    def free(self) -> None:
        if self.base:
            self.harness.free(self.base)
            self.base = self.ptr = 0


class PluginSession:
    """One plugin built for a profile with its build-time workspace, run for any shapes inside the profile.

    ``run`` does what an execution context does per inference: ``onShapeChange`` for the run shapes, then
    ``enqueue`` with the workspace sized at build time (never re-sized for the run shape). Every buffer has guard
    bytes around it; after each run the session raises :class:`HarnessMemoryError` when a kernel wrote past the
    workspace or an output, or changed an input, and :class:`HarnessDataError` when the kernels recorded bad input
    data (unless ``check_status=False``).
    """

    def __init__(self, harness: Harness, op: str, attrs: Mapping[str, Any], profile: PluginProfile) -> None:
        self.harness, self.op = harness, op
        self.guard = guard_bytes()
        self.prepared = harness.prepare_profile(op, attrs, profile)
        self.workspace = DeviceBuffer(harness, max(self.prepared.workspace, 256), self.guard)

    @property
    def workspace_bytes(self) -> int:
        return self.prepared.workspace

    def run(self, arrays: Sequence[np.ndarray], check_status: bool = True) -> list[np.ndarray]:
        arrays = [np.ascontiguousarray(a) for a in arrays]
        outputs = self.harness.set_shapes(self.prepared, [(a.shape, a.dtype) for a in arrays])
        buffers: list[DeviceBuffer] = []
        try:
            ins = [self._buffer(a.nbytes, buffers) for a in arrays]
            for buf, a in zip(ins, arrays, strict=True):
                self.harness.upload(buf.ptr, a)
            outs = [self._buffer(int(np.prod(s)) * np.dtype(d).itemsize, buffers) for s, d in outputs]
            self.harness.emulator_diagnostics()  # reports of earlier runs are theirs, not this run's
            self.harness.enqueue(self.prepared, [b.ptr for b in ins], [b.ptr for b in outs], self.workspace.ptr)
            self.harness.check_status(self.prepared, raise_data_error=check_status)
            if reports := self.harness.emulator_diagnostics():
                raise HarnessError(f"{self.op}: the CUDA emulator reported {reports} problem(s) in this run's kernels "
                                   "(races on barriers, bad warp collectives, misaligned accesses: see its messages "
                                   "on stderr)")
            self._check_memory(ins, arrays, outs)
            return [o.read().view(d).reshape(s) for o, (s, d) in zip(outs, outputs, strict=True)]
        finally:
            for buf in buffers:
                buf.free()

    def _buffer(self, nbytes: int, owned: list[DeviceBuffer]) -> DeviceBuffer:
        owned.append(DeviceBuffer(self.harness, nbytes, self.guard))
        return owned[-1]

    def _check_memory(self, ins: list[DeviceBuffer], arrays: list[np.ndarray], outs: list[DeviceBuffer]) -> None:
        if not self.workspace.guards_intact():
            raise HarnessMemoryError(f"{self.op}: a kernel wrote outside its workspace ({self.workspace_bytes} bytes, "
                                     "the build-time getWorkspaceSize of the profile)")
        for i, buf in enumerate(outs):
            if not buf.guards_intact():
                raise HarnessMemoryError(f"{self.op}: a kernel wrote outside output {i} ({buf.nbytes} bytes)")
        for i, (buf, a) in enumerate(zip(ins, arrays, strict=True)):
            if not buf.guards_intact() or not np.array_equal(buf.read(), a.reshape(-1).view(np.uint8)):
                raise HarnessMemoryError(f"{self.op}: a kernel wrote into input {i} or around it")

    def close(self) -> None:
        self.workspace.free()
        self.harness.release(self.prepared)

    def __enter__(self) -> PluginSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HarnessOpBackend:
    """The four ops on numpy arrays through the plugin objects (each call: a one-shape profile, one run).

    The ``emu`` op-test backend over libpimoe_trt_harness_emu.so, and the ``trt-harness`` backend on a GPU."""

    supports_w8a8 = True  # w8a8 / w8a8_dynamic: int8 tensor-core GEMM (plugins/kernels/cuda/gemm_i8_wmma.cu)

    def __init__(self, harness: Harness, name: str | None = None) -> None:
        self.harness = harness
        self.name = name or ("emu" if harness.emulated else "trt-harness")

    def run(self, op: str, attrs: Mapping[str, Any], arrays: Sequence[np.ndarray],
            check_status: bool = True) -> list[np.ndarray]:
        arrays = [np.ascontiguousarray(a) for a in arrays]
        profile = PluginProfile.fixed([(a.shape, a.dtype) for a in arrays])
        with PluginSession(self.harness, op, attrs, profile) as session:
            return session.run(arrays, check_status)

    def route(self, logits: np.ndarray, bias: np.ndarray | None, k: int, normalize: bool, **v2: Any):
        arrays = [logits] + ([bias] if bias is not None else [])
        return self.run(schema.ROUTE, {"k": k, "normalize": int(normalize)} | _fields_v2(v2), arrays)

    def dispatch(self, x: np.ndarray, ids: np.ndarray, num_experts: int):
        return self.run(schema.DISPATCH, {"num_experts": num_experts}, [x, ids])

    def combine(self, y_sorted: np.ndarray, flat_to_sorted: np.ndarray, weights: np.ndarray, **v2: Any):
        return self.run(schema.COMBINE, _fields_v2(v2), [y_sorted, flat_to_sorted, weights])[0]

    def expert_mlp(self, x_sorted: np.ndarray, offsets: np.ndarray, params: Sequence[np.ndarray], expert_ids,
                   widths, activation: str, layer_norm: bool, eps: float = 1e-5, quant_mode: str = "none",
                   act_scales: Sequence[float] = (), constant_params: bool = True, **v2: Any):
        # TensorRT hands constant initializers to the plugin as ordinary inputs: constant_params changes nothing
        attrs = expert_mlp_fields(expert_ids, widths, activation, layer_norm, eps, quant_mode, act_scales, **v2)
        return self.run(schema.EXPERT_MLP, attrs, [x_sorted, offsets, *params])[0]


class BoundOp:
    """One plugin prepared for fixed torch CUDA input tensors, with its outputs and workspace allocated once.

    ``enqueue()`` only launches the kernels on the current torch stream (no allocation, no synchronisation), so a
    chain of BoundOps can be timed without Python allocation overhead or captured into a CUDA graph
    (scripts/bench_gpu.py). Needs a CUDA GPU. Call ``close()`` when done.
    """

    def __init__(self, harness: Harness, op: str, attrs: Mapping[str, Any], inputs: Sequence[Any]) -> None:
        import torch

        self.harness = harness
        self.inputs = list(inputs)
        self.prepared = harness.prepare(op, attrs, [(tuple(t.shape), _torch_to_np(t.dtype)) for t in inputs])
        device = inputs[0].device
        self.outputs = [torch.empty(s, dtype=_np_to_torch(d), device=device) for s, d in self.prepared.outputs]
        self.workspace = torch.empty(max(self.prepared.workspace, 256), dtype=torch.uint8, device=device)

    def enqueue(self) -> None:
        import torch

        stream = torch.cuda.current_stream(self.workspace.device).cuda_stream
        self.harness.enqueue(self.prepared, [t.data_ptr() for t in self.inputs],
                             [t.data_ptr() for t in self.outputs], self.workspace.data_ptr(), stream)

    def check_status(self) -> None:
        import torch

        stream = torch.cuda.current_stream(self.workspace.device).cuda_stream
        self.harness.check_status(self.prepared, stream)

    def close(self) -> None:
        self.harness.release(self.prepared)


def _np_to_torch(dtype: Any):
    import torch

    return {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16, np.dtype(np.int8): torch.int8,
            np.dtype(np.int32): torch.int32}[np.dtype(dtype)]


def _torch_to_np(dtype: Any) -> np.dtype:
    import torch

    return {torch.float32: np.dtype(np.float32), torch.float16: np.dtype(np.float16),
            torch.int8: np.dtype(np.int8), torch.int32: np.dtype(np.int32)}[dtype]


def find_harness(emulated: bool = False) -> Path | None:
    """The built harness library (``emulated``: the CPU-emulator build), or None when it has not been built."""
    from pimoe_export.native.libraries import find_harness_library

    try:
        return find_harness_library(emulated=emulated)
    except PluginLoadError:
        return None


def cuda_backend_or_none() -> HarnessOpBackend | None:
    """The ``trt-harness`` backend on the current CUDA GPU, or None without a GPU or a built CUDA harness."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    path = find_harness()
    return None if path is None else HarnessOpBackend(Harness(path))


def emulated_backend_or_none() -> HarnessOpBackend | None:
    """The ``emu`` backend (CPU CUDA emulator), or None when libpimoe_trt_harness_emu.so has not been built."""
    path = find_harness(emulated=True)
    return None if path is None else HarnessOpBackend(Harness(path))
