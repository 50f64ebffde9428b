"""The reference side of a parity check: seeded inputs for a graph interface, and the PyTorch model as a
Polygraphy runner (CPU-safe: Polygraphy's own PytRunner calls .cuda() and mis-casts dtypes)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from pimoe_export.interface import (
    BATCH_AXIS,
    LAYER_EXPERT_IDS,
    LAYER_EXPERT_WEIGHTS,
    LAYER_INPUT,
    LAYER_OUTPUT,
    SEQUENCE_AXIS,
    GraphInterface,
)


def make_inputs(interface: GraphInterface, shapes: Sequence[tuple[int, int]], seed: int) -> list[dict[str, Any]]:
    """One feed per (batch, sequence) shape: standard-normal values for float inputs (the interface's dtypes)."""
    rng = np.random.default_rng(seed)
    feeds = []
    for batch, sequence in shapes:
        feed = {}
        for tensor in interface.inputs:
            axes = {BATCH_AXIS: batch, SEQUENCE_AXIS: sequence}
            shape = tuple(axes[d] if isinstance(d, str) else int(d) for d in tensor.dims)
            feed[tensor.name] = rng.standard_normal(shape).astype(tensor.dtype)
        feeds.append(feed)
    return feeds


def input_metadata(interface: GraphInterface) -> TensorMetadata:
    """Polygraphy's input metadata of an interface (a dynamic axis is -1)."""
    meta = TensorMetadata()
    for t in interface.inputs:
        meta.add(t.name, np.dtype(t.dtype), tuple(d if isinstance(d, int) else -1 for d in t.dims))
    return meta


class PyTorchLayerRunner(BaseRunner):
    """The fp32 PyTorch PiMoE layer, inputs upcast to fp32, outputs named like the exported graph's."""

    def __init__(self, model: Any, name: str = "pytorch") -> None:
        super().__init__(name=name, prefix="pytorch-runner")
        self.model = model

    def activate_impl(self) -> None:
        self.model = self.model.float().eval()
        self._tracking = self.model.track_stats
        self.model.track_stats = False  # a parity run must not change the model's statistics

    def get_input_metadata_impl(self) -> TensorMetadata:
        return TensorMetadata().add(LAYER_INPUT, np.float32, (-1, -1, self.model.hidden_size))

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        import torch

        (x,) = feed_dict.values()
        start = time.perf_counter()
        with torch.no_grad():
            y, info = self.model(torch.from_numpy(np.asarray(x, dtype=np.float32)), return_routing_info=True)
        self.inference_time = time.perf_counter() - start
        return OrderedDict([(LAYER_OUTPUT, y.numpy()), (LAYER_EXPERT_IDS, info.ids.numpy()),
                            (LAYER_EXPERT_WEIGHTS, info.weights.float().numpy())])

    def deactivate_impl(self) -> None:
        self.model.track_stats = self._tracking


def pytorch_reference(model: Any, feeds: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Outputs of the fp32 PyTorch model for each feed."""
    with PyTorchLayerRunner(model) as runner:
        return [dict(runner.infer(feed)) for feed in feeds]


class PyTorchModelRunner(BaseRunner):
    """A whole PyTorch model with PiMoE layers inside, called as ``model(**inputs)``; outputs named as
    :func:`pimoe_export.export.model_export.export_model` names them, with every layer's routing when the graph
    has routing outputs. A layer's routing is taken from a second, unmasked call of the layer (the exported graph
    routes padded positions too); its output is the model's own (masked) call."""

    def __init__(self, model: Any, interface: GraphInterface, name: str = "pytorch") -> None:
        super().__init__(name=name, prefix="pytorch-model-runner")
        self.model = model
        self.interface = interface

    def activate_impl(self) -> None:
        import copy

        from pimoe_export.export.model_export import moe_layers

        self.work = copy.deepcopy(self.model).float().eval()
        self.routing: dict[str, tuple[Any, Any]] = {}
        for path, layer in moe_layers(self.work).items():
            layer.track_stats = False
            layer.register_forward_hook(self._recorder(path), with_kwargs=True)

    def _recorder(self, path: str):
        def hook(layer: Any, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = args[0] if args else kwargs[LAYER_INPUT]  # PiMoESystem.forward(hidden_states, ...)
            with _hooks_off(layer):
                _, info = layer(hidden, None, return_routing_info=True)
            self.routing[path] = (info.ids, info.weights)
        return hook

    def get_input_metadata_impl(self) -> TensorMetadata:
        return input_metadata(self.interface)

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        import torch

        from pimoe_export.export.model_export import flatten_outputs, routing_name

        inputs = {}
        for name, x in feed_dict.items():
            t = torch.from_numpy(np.ascontiguousarray(x))
            inputs[name] = t.float() if t.is_floating_point() else t
        start = time.perf_counter()
        self.routing.clear()
        with torch.no_grad():
            flat = dict(flatten_outputs(self.work(**inputs)))
        self.inference_time = time.perf_counter() - start
        for path, (ids, weights) in self.routing.items():
            flat[routing_name(path, LAYER_EXPERT_IDS)] = ids
            flat[routing_name(path, LAYER_EXPERT_WEIGHTS)] = weights.float()
        return OrderedDict((t.name, flat[t.name].detach().numpy()) for t in self.interface.outputs)

    def deactivate_impl(self) -> None:
        del self.work


class _hooks_off:
    """Run a module without its forward hooks (the recorder calls the layer again from inside its own hook)."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.saved = dict(self.module._forward_hooks)
        self.module._forward_hooks.clear()

    def __exit__(self, *exc: object) -> None:
        self.module._forward_hooks.update(self.saved)
