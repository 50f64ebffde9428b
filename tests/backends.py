"""Op backends for the parametrised op tests: every backend runs the same cases against the PyTorch reference.

- ``ort``: the ONNX Runtime custom-op library (CPU), through single-op graphs.
- ``trt-harness``: the TensorRT plugin objects on a CUDA GPU through plugins/harness (no TensorRT library);
  skipped without a GPU (``gpu`` mark).
- ``emu``: the same plugin objects and CUDA kernels built against the CPU CUDA emulator (plugins/emu), with
  numpy buffers as device memory (``emu`` mark; runs in CI).
- ``torch``: the PyTorch reference ops (pimoe_export/ops/torch_ops.py), for the tests that check every backend,
  the reference included, against a hand-written oracle (tests/ops/test_op_boundaries.py).
- ``ort-cuda-emu``: the ONNX Runtime CUDA execution-provider kernels of libpimoe_ort_cuda (attribute readers, input
  checks, parameter roles, scratch sizes) on the same emulated CUDA kernels, registered for the CPU provider
  (libpimoe_ort_cuda_emu; ``emu`` mark).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from op_graphs import expert_mlp_attrs, single_op_model, v2_attrs

from pimoe_export.runtime.ort import create_session


class OrtOpBackend:
    name = "ort"

    def __init__(self, library: str | None = None) -> None:
        self._cache: dict[bytes, object] = {}
        self._library = library

    def _run(self, model: bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        session = self._cache.get(model)
        if session is None:
            session = create_session(model, threads=2, library=self._library)
            if len(self._cache) < 64:
                self._cache[model] = session
        return session.run(None, feeds)  # type: ignore[attr-defined]

    def route(self, logits: np.ndarray, bias: np.ndarray | None, k: int, normalize: bool, **v2):
        """``v2``: contract-v2 attributes (scoring, num_groups, ...), written on the node when given."""
        inputs = [("logits", logits)] + ([("selection_bias", bias)] if bias is not None else [])
        model = single_op_model("PiMoERoute", inputs, [("weights", np.float32, 2), ("ids", np.int32, 2)],
                                {"k": k, "normalize": int(normalize)} | v2_attrs(v2))
        return self._run(model, dict(inputs))

    def dispatch(self, x: np.ndarray, ids: np.ndarray, num_experts: int):
        model = single_op_model("PiMoEDispatch", [("x", x), ("ids", ids)],
                                [("x_sorted", x.dtype, 2), ("offsets", np.int32, 1), ("flat_to_sorted", np.int32, 1)],
                                {"num_experts": num_experts})
        return self._run(model, {"x": x, "ids": ids})

    def combine(self, y_sorted: np.ndarray, flat_to_sorted: np.ndarray, weights: np.ndarray, **v2):
        model = single_op_model("PiMoECombine", [("y_sorted", y_sorted), ("flat_to_sorted", flat_to_sorted),
                                                 ("weights", weights)], [("y", y_sorted.dtype, 2)], v2_attrs(v2))
        return self._run(model, {"y_sorted": y_sorted, "flat_to_sorted": flat_to_sorted, "weights": weights})[0]

    def expert_mlp(self, x_sorted: np.ndarray, offsets: np.ndarray, params: Sequence[np.ndarray], expert_ids,
                   widths, activation: str, layer_norm: bool, eps: float = 1e-5, quant_mode: str = "none",
                   act_scales: Sequence[float] = (), constant_params: bool = True, **v2):
        attrs = expert_mlp_attrs(expert_ids, widths, activation, layer_norm, eps, quant_mode, act_scales, **v2)
        named = [(f"p{i}", p) for i, p in enumerate(params)]
        inputs = [("x_sorted", x_sorted), ("offsets", offsets)]
        if constant_params:
            model = single_op_model("PiMoEExpertMLP", inputs, [("y_sorted", x_sorted.dtype, 2)], attrs, named)
            feeds = dict(inputs)
        else:
            model = single_op_model("PiMoEExpertMLP", inputs + named, [("y_sorted", x_sorted.dtype, 2)], attrs)
            feeds = dict(inputs + named)
        return self._run(model, feeds)[0]


class TorchOpBackend:
    """The PyTorch reference ops on numpy arrays (the same calls as the other backends)."""

    name = "torch"

    def route(self, logits: np.ndarray, bias: np.ndarray | None, k: int, normalize: bool, **v2):
        import torch

        from pimoe_export.ops import torch_ops

        t_bias = None if bias is None else torch.from_numpy(bias)
        weights, ids = torch_ops.route(torch.from_numpy(logits), t_bias, k, normalize, **v2)
        return [weights.numpy(), ids.numpy()]

    def dispatch(self, x: np.ndarray, ids: np.ndarray, num_experts: int):
        import torch

        from pimoe_export.ops import torch_ops

        return [t.numpy() for t in torch_ops.dispatch(torch.from_numpy(x), torch.from_numpy(ids), num_experts)]

    def combine(self, y_sorted: np.ndarray, flat_to_sorted: np.ndarray, weights: np.ndarray, **v2):
        import torch

        from pimoe_export.ops import torch_ops

        return torch_ops.combine(torch.from_numpy(y_sorted), torch.from_numpy(flat_to_sorted),
                                 torch.from_numpy(weights), **v2).numpy()

    def expert_mlp(self, x_sorted: np.ndarray, offsets: np.ndarray, params: Sequence[np.ndarray], expert_ids,
                   widths, activation: str, layer_norm: bool, eps: float = 1e-5, quant_mode: str = "none",
                   act_scales: Sequence[float] = (), constant_params: bool = True, **v2):
        import torch

        from pimoe_export.ops import torch_ops

        return torch_ops.expert_mlp(torch.from_numpy(x_sorted), torch.from_numpy(offsets),
                                    [torch.from_numpy(np.ascontiguousarray(p)) for p in params], list(expert_ids),
                                    list(widths), activation, layer_norm, eps, quant_mode, list(act_scales),
                                    **v2).numpy()


_BACKENDS: dict[str, object] = {}
#: why a backend is not available (the only reason a backend-parametrised test skips it)
_MISSING = {
    "trt-harness": "no CUDA GPU here, or plugins/harness was not built (build/plugins/harness)",
    "emu": "the emulated-GPU harness libpimoe_trt_harness_emu.so was not built (build/plugins/emu)",
    "ort-cuda-emu": "libpimoe_ort_cuda_emu.so (the ORT CUDA-EP kernels on the emulated GPU) was not built",
}


def get_backend(name: str):
    if name not in _BACKENDS:
        if name == "ort":
            _BACKENDS[name] = OrtOpBackend()
        elif name == "torch":
            _BACKENDS[name] = TorchOpBackend()
        elif name == "trt-harness":
            from pimoe_export.testing.harness import cuda_backend_or_none

            _BACKENDS[name] = cuda_backend_or_none()
        elif name == "emu":
            from pimoe_export.testing.harness import emulated_backend_or_none

            _BACKENDS[name] = emulated_backend_or_none()
        elif name == "ort-cuda-emu":
            from pimoe_export.errors import PluginLoadError
            from pimoe_export.native.libraries import find_ort_cuda_library

            try:
                _BACKENDS[name] = OrtOpBackend(str(find_ort_cuda_library(emulated=True)))
            except PluginLoadError:
                _BACKENDS[name] = None
        else:  # pragma: no cover
            raise ValueError(name)
    backend = _BACKENDS[name]
    if backend is None:
        pytest.skip(f"backend {name}: {_MISSING[name]}")
    return backend


BACKEND_PARAMS = [
    pytest.param("ort", id="ort"),
    pytest.param("trt-harness", id="trt-harness", marks=pytest.mark.gpu),
    pytest.param("emu", id="emu", marks=pytest.mark.emu),
    pytest.param("ort-cuda-emu", id="ort-cuda-emu", marks=pytest.mark.emu),
]

#: every backend implementing the ops, the PyTorch reference first: the boundary tests (ties, NaN, limits) run on
#: each against hand-written references; the ONNX Runtime CPU library's other kernel sets run them in subprocesses
#: (tests/cpu_kernel_sets.py)
ALL_BACKEND_PARAMS = [pytest.param("torch", id="torch"), *BACKEND_PARAMS]
