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
    SEQUENCE_AXIS,
    GraphInterface,
    layer_interface,
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


class PyTorchRunner(BaseRunner):
    """The fp32 PyTorch model with PiMoE layers inside (a bare layer too), called as ``model(**inputs)`` with float
    inputs upcast to fp32; outputs named as :func:`pimoe_export.export.exporter.export_model` names them, with every
    layer's routing when the graph has routing outputs. A layer's routing is taken from a second, unmasked call of
    the layer (the exported graph routes padded positions too); its output is the model's own (masked) call. The
    model is run on a copy, so a check never changes its statistics."""

    def __init__(self, model: Any, interface: GraphInterface, name: str = "pytorch") -> None:
        super().__init__(name=name, prefix="pytorch-runner")
        self.model = model
        self.interface = interface

    def activate_impl(self) -> None:
        import copy

        from pimoe_export.model.source import moe_layers

        self.work = copy.deepcopy(self.model).float().eval()
        self.routing: dict[str, tuple[Any, Any]] = {}
        for path, layer in moe_layers(self.work).items():
            layer.track_stats = False
            layer.register_forward_hook(self._recorder(path), with_kwargs=True)

    def _recorder(self, path: str):
        from pimoe_export.model.source import layer_routing

        def hook(layer: Any, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = args[0] if args else kwargs[LAYER_INPUT]  # PiMoESystem / MoEBlock.forward(hidden_states, ...)
            with _hooks_off(layer):
                self.routing[path] = layer_routing(layer, hidden)
        return hook

    def get_input_metadata_impl(self) -> TensorMetadata:
        return input_metadata(self.interface)

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        import torch

        from pimoe_export.export.tracing import flatten_outputs, routing_name

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


def pytorch_reference(model: Any, feeds: Sequence[dict[str, np.ndarray]],
                      interface: GraphInterface | None = None) -> list[dict[str, np.ndarray]]:
    """Outputs of the fp32 PyTorch model for each feed (``interface``: the graph's; default: the layer interface of
    a bare layer)."""
    if interface is None:
        interface = layer_interface(model.hidden_size, model.config.top_k, "fp32")
    with PyTorchRunner(model, interface) as runner:
        return [dict(runner.infer(feed)) for feed in feeds]


class _hooks_off:
    """Run a module without its forward hooks (the recorder calls the layer again from inside its own hook)."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.saved = dict(self.module._forward_hooks)
        self.module._forward_hooks.clear()

    def __exit__(self, *exc: object) -> None:
        self.module._forward_hooks.update(self.saved)
