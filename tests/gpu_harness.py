"""ctypes driver of plugins/harness (``libpimoe_trt_harness.so``): the TensorRT plugin objects, without TensorRT.

- :class:`Harness` wraps the C ABI (plugins/harness/pimoe_harness.h). ``prepare`` runs only the plugins' host-side
  build/runtime methods (creator, output types/shapes, formats, configure, workspace size, serialisation,
  onShapeChange) and needs no GPU; ``run`` enqueues the CUDA kernels on torch CUDA tensors and the current stream.
- :class:`HarnessOpBackend` is the ``trt-harness`` backend of tests/backends.py: the same methods as
  ``OrtOpBackend`` (numpy in, numpy out), torch CUDA tensors inside.
- :func:`harness_backend_or_skip` returns that backend, or None (the tests then skip) when torch.cuda is not
  available or the library has not been built.

Everything that enqueues kernels needs a CUDA GPU: scripts/gpu_check.sh runs it (rung 6 of the verification
ladder); CI only exercises ``prepare``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pimoe_export.ops import schema

# nvinfer1::PluginFieldType
FIELD_FLOAT32, FIELD_FLOAT64, FIELD_INT8, FIELD_INT32, FIELD_CHAR, FIELD_INT64 = 1, 2, 3, 5, 6, 10
# nvinfer1::DataType
DT_FLOAT, DT_HALF, DT_INT8, DT_INT32 = 0, 1, 2, 3
_NP_TO_DT = {np.dtype(np.float32): DT_FLOAT, np.dtype(np.float16): DT_HALF, np.dtype(np.int8): DT_INT8,
             np.dtype(np.int32): DT_INT32}
_DT_TO_NP = {v: k for k, v in _NP_TO_DT.items()}


class HarnessError(RuntimeError):
    """A plugin entry point returned an error status (the message is the plugin's own)."""


class HarnessDataError(HarnessError):
    """The kernels ran but recorded inconsistent input data in their device status block."""


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


def _desc(shape: Sequence[int], dtype: np.dtype) -> _Desc:
    d = _Desc()
    d.dtype = _NP_TO_DT[np.dtype(dtype)]
    d.rank = len(shape)
    for i, s in enumerate(shape):
        d.dims[i] = int(s)
    return d


@dataclass
class Prepared:
    handle: ctypes.c_void_p
    outputs: list[tuple[tuple[int, ...], np.dtype]]
    workspace: int


class Harness:
    """The C ABI of libpimoe_trt_harness.so (see plugins/harness/pimoe_harness.h)."""

    def __init__(self, path: str | Path) -> None:
        lib = ctypes.CDLL(str(path))
        lib.pimoe_harness_last_error.restype = ctypes.c_char_p
        lib.pimoe_harness_prepare.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p,
                                              ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p)]
        lib.pimoe_harness_num_outputs.argtypes = [ctypes.c_void_p]
        lib.pimoe_harness_output_desc.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(_Desc)]
        lib.pimoe_harness_workspace_size.argtypes = [ctypes.c_void_p]
        lib.pimoe_harness_workspace_size.restype = ctypes.c_size_t
        lib.pimoe_harness_enqueue.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                              ctypes.c_void_p]
        lib.pimoe_harness_check_status.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.pimoe_harness_release.argtypes = [ctypes.c_void_p]
        self.lib = lib
        self.path = str(path)
        if lib.pimoe_harness_contract_version() != schema.CONTRACT_VERSION:
            raise HarnessError(f"{path} implements another op contract version; rebuild it")

    def last_error(self) -> str:
        return (self.lib.pimoe_harness_last_error() or b"").decode()

    def prepare(self, op: str, attrs: Mapping[str, Any],
                inputs: Sequence[tuple[Sequence[int], Any]]) -> Prepared:
        """Create and configure the plugin for inputs given as (shape, numpy dtype); no GPU needed."""
        fields, keep = make_fields(op, attrs)
        descs = (_Desc * max(1, len(inputs)))(*[_desc(s, d) for s, d in inputs])
        handle = ctypes.c_void_p()
        rc = self.lib.pimoe_harness_prepare(op.encode(), ctypes.cast(fields, ctypes.c_void_p), len(attrs),
                                            ctypes.cast(descs, ctypes.c_void_p), len(inputs), ctypes.byref(handle))
        del keep
        if rc != 0:
            raise HarnessError(self.last_error())
        outputs = []
        for i in range(self.lib.pimoe_harness_num_outputs(handle)):
            d = _Desc()
            if self.lib.pimoe_harness_output_desc(handle, i, ctypes.byref(d)) != 0:
                self.release(Prepared(handle, [], 0))
                raise HarnessError(self.last_error())
            outputs.append((tuple(int(d.dims[j]) for j in range(d.rank)), _DT_TO_NP[d.dtype]))
        return Prepared(handle, outputs, int(self.lib.pimoe_harness_workspace_size(handle)))

    def release(self, prepared: Prepared) -> None:
        if prepared.handle:
            self.lib.pimoe_harness_release(prepared.handle)
            prepared.handle = ctypes.c_void_p()

    def run(self, op: str, attrs: Mapping[str, Any], inputs: Sequence[Any], check_status: bool = True) -> list[Any]:
        """Enqueue `op` on CUDA tensors (contiguous, on the current device) and return its output tensors.

        Raises HarnessError for an error status and, with ``check_status``, HarnessDataError when the kernels
        recorded bad input data (ids out of range, inconsistent offsets, ...). Needs a CUDA GPU.
        """
        import torch

        prepared = self.prepare(op, attrs, [(tuple(t.shape), _torch_to_np(t.dtype)) for t in inputs])
        try:
            outputs = [torch.empty(shape, dtype=_np_to_torch(dtype), device=inputs[0].device)
                       for shape, dtype in prepared.outputs]
            workspace = torch.empty(max(prepared.workspace, 256), dtype=torch.uint8, device=inputs[0].device)
            stream = torch.cuda.current_stream(inputs[0].device).cuda_stream
            in_ptrs = (ctypes.c_void_p * len(inputs))(*[t.data_ptr() or None for t in inputs])
            out_ptrs = (ctypes.c_void_p * len(outputs))(*[t.data_ptr() or None for t in outputs])
            rc = self.lib.pimoe_harness_enqueue(prepared.handle, in_ptrs, out_ptrs, workspace.data_ptr(), stream)
            if rc != 0:
                raise HarnessError(self.last_error())
            status = self.lib.pimoe_harness_check_status(workspace.data_ptr(), stream)
            if status < 0:
                raise HarnessError(self.last_error())
            if status > 0 and check_status:
                raise HarnessDataError(self.last_error())
            return outputs
        finally:
            self.release(prepared)


class BoundOp:
    """One plugin prepared for fixed CUDA input tensors, with its outputs and workspace allocated once.

    ``enqueue()`` only launches the kernels on the current torch stream (no allocation, no synchronisation), so a
    chain of BoundOps can be timed without Python allocation overhead or captured into a CUDA graph
    (scripts/bench_gpu.py). Call ``close()`` when done.
    """

    def __init__(self, harness: Harness, op: str, attrs: Mapping[str, Any], inputs: Sequence[Any]) -> None:
        import torch

        self.harness = harness
        self.inputs = list(inputs)
        self.prepared = harness.prepare(op, attrs, [(tuple(t.shape), _torch_to_np(t.dtype)) for t in inputs])
        device = inputs[0].device
        self.outputs = [torch.empty(shape, dtype=_np_to_torch(dtype), device=device)
                        for shape, dtype in self.prepared.outputs]
        self.workspace = torch.empty(max(self.prepared.workspace, 256), dtype=torch.uint8, device=device)
        self._in = (ctypes.c_void_p * len(inputs))(*[t.data_ptr() or None for t in inputs])
        self._out = (ctypes.c_void_p * len(self.outputs))(*[t.data_ptr() or None for t in self.outputs])

    def enqueue(self) -> None:
        import torch

        stream = torch.cuda.current_stream(self.workspace.device).cuda_stream
        if self.harness.lib.pimoe_harness_enqueue(self.prepared.handle, self._in, self._out,
                                                  self.workspace.data_ptr(), stream) != 0:
            raise HarnessError(self.harness.last_error())

    def check_status(self) -> None:
        import torch

        stream = torch.cuda.current_stream(self.workspace.device).cuda_stream
        status = self.harness.lib.pimoe_harness_check_status(self.workspace.data_ptr(), stream)
        if status != 0:
            raise (HarnessDataError if status > 0 else HarnessError)(self.harness.last_error())

    def close(self) -> None:
        self.harness.release(self.prepared)


def _np_to_torch(dtype: np.dtype):
    import torch

    return {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16, np.dtype(np.int8): torch.int8,
            np.dtype(np.int32): torch.int32}[np.dtype(dtype)]


def _torch_to_np(dtype) -> np.dtype:
    import torch

    return {torch.float32: np.dtype(np.float32), torch.float16: np.dtype(np.float16),
            torch.int8: np.dtype(np.int8), torch.int32: np.dtype(np.int32)}[dtype]


def find_harness() -> Path | None:
    from pimoe_export.build.tensorrt import find_harness_library
    from pimoe_export.errors import PluginLoadError

    try:
        return find_harness_library()
    except PluginLoadError:
        return None


class HarnessOpBackend:
    """Op backend over the plugin objects on a CUDA GPU (numpy in/out, like tests/backends.OrtOpBackend)."""

    name = "trt-harness"
    supports_w8a8 = True  # w8a8 / w8a8_dynamic: int8 tensor-core GEMM (plugins/kernels/cuda/gemm_i8_wmma.cu)

    def __init__(self, harness: Harness, device: str = "cuda") -> None:
        self.harness = harness
        self.device = device

    def _cuda(self, array: np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _run(self, op: str, attrs: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        outputs = self.harness.run(op, attrs, [self._cuda(a) for a in arrays])
        return [t.cpu().numpy() for t in outputs]

    def route(self, logits: np.ndarray, bias: np.ndarray | None, k: int, normalize: bool):
        arrays = [logits] + ([bias] if bias is not None else [])
        return self._run(schema.ROUTE, {"k": k, "normalize": int(normalize)}, arrays)

    def dispatch(self, x: np.ndarray, ids: np.ndarray, num_experts: int):
        return self._run(schema.DISPATCH, {"num_experts": num_experts}, [x, ids])

    def combine(self, y_sorted: np.ndarray, flat_to_sorted: np.ndarray, weights: np.ndarray):
        return self._run(schema.COMBINE, {}, [y_sorted, flat_to_sorted, weights])[0]

    def expert_mlp(self, x_sorted: np.ndarray, offsets: np.ndarray, params: Sequence[np.ndarray], expert_ids,
                   widths, activation: str, layer_norm: bool, eps: float = 1e-5, quant_mode: str = "none",
                   act_scales: Sequence[float] = (), constant_params: bool = True):
        # TensorRT hands constant initializers to the plugin as ordinary inputs: constant_params changes nothing
        attrs = expert_mlp_fields(expert_ids, widths, activation, layer_norm, eps, quant_mode, act_scales)
        return self._run(schema.EXPERT_MLP, attrs, [x_sorted, offsets, *params])[0]


def expert_mlp_fields(expert_ids, widths, activation, layer_norm, eps=1e-5, quant_mode="none", act_scales=()):
    return {"expert_ids": [int(e) for e in expert_ids], "widths": [int(w) for w in widths], "activation": activation,
            "layer_norm": int(layer_norm), "eps": float(eps), "quant_mode": quant_mode,
            "act_scales": [float(s) for s in act_scales]}


def harness_backend_or_skip():
    """HarnessOpBackend on the current CUDA device, or None when there is no GPU or no built harness."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    path = find_harness()
    if path is None:
        return None
    return HarnessOpBackend(Harness(path))
