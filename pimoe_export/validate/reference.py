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
