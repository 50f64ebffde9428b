"""What the exporter traces: a copy of the model whose PiMoE layers are :class:`ExportedLayer` modules, called with its
named inputs, with flat named outputs (and every layer's routing).

Every :class:`PiMoESystem` (adaptive included) or :class:`EnhancedPiMoEIntegration` submodule is replaced, in a
copy of the model, by an :class:`ExportedLayer` (the same layer as :class:`CustomOpPiMoE`, or
:class:`StandardOpsPiMoE` for the plugin-free graph); the model's own ``forward`` is traced unchanged with its inputs
named and its batch/sequence axes dynamic. A bare layer is the model whose root is the layer: it is replaced whole.

Padding: an exported layer routes and computes every position, padded or not (each token is routed on its own, so
padded tokens cannot change a valid token's result), and writes 0 where ``attention_mask`` is 0 — the same output
as the PyTorch layer, which skips those positions. Routing outputs, when asked for, cover every position.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from pimoe_export.errors import PiMoEExportError
from pimoe_export.export.modules import FLOAT_DTYPES, custom_op_form
from pimoe_export.interface import (
    BATCH_AXIS,
    LAYER_EXPERT_IDS,
    LAYER_EXPERT_WEIGHTS,
    LAYER_OUTPUT,
    SEQUENCE_AXIS,
    GraphInterface,
    TensorInterface,
)
from pimoe_export.model.source import MoELayer, moe_layers

#: the largest batch and sequence the exported graph's dynamic axes declare
MAX_AXIS = 65536


class ExportedLayer(nn.Module):
    """Drop-in replacement for a PiMoE layer inside a model being exported (see the module docstring)."""

    def __init__(self, layer: MoELayer, path: str, precision: str, routing: list | None,
                 standard_ops: bool = False) -> None:
        super().__init__()
        self.inner: nn.Module = custom_op_form(layer, precision, standard_ops)
        self.dtype = FLOAT_DTYPES[precision]
        self.path = path
        self._routing = routing  # the export's routing-output list, or None
        self.returns_tuple = bool(getattr(layer, "returns_tuple", False))  # the host model's convention

    @classmethod
    def around(cls, inner: nn.Module, path: str, routing: list | None) -> ExportedLayer:
        """The same stand-in around any module with CustomOpPiMoE's outputs (the fake-quant reference, fp32)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.inner, layer.dtype, layer.path, layer._routing = inner, torch.float32, path, routing
        layer.returns_tuple = bool(getattr(getattr(inner, "block", None), "returns_tuple", False))
        return layer

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_routing_info: bool = False, return_metrics: bool = False) -> torch.Tensor:
        if return_routing_info or return_metrics:
            raise PiMoEExportError(f"{self.path}: the model asks the PiMoE layer for routing info/metrics; export "
                                   "with routing_outputs=True instead and call the layer with hidden states only")
        dtype = hidden_states.dtype
        y, ids, weights = self.inner(hidden_states.to(self.dtype))
        if attention_mask is not None:
            keep = (attention_mask != 0).reshape(*attention_mask.shape[:2], 1)
            y = torch.where(keep, y, torch.zeros_like(y))
        if self._routing is not None:
            self._routing.append((self.path, ids, weights))
        return (y.to(dtype), None) if self.returns_tuple else y.to(dtype)


def replace_module(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """``root`` with the submodule at ``path`` replaced by ``new`` (path "": ``new`` itself)."""
    if not path:
        return new
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)
    return root


def flatten_outputs(out: Any, prefix: str = LAYER_OUTPUT) -> list[tuple[str, torch.Tensor]]:
    """A model's outputs as (name, tensor): a tensor is ``output``; a mapping (a Hugging Face ModelOutput too) keeps
    its keys; a tuple or list is ``output_0``, ``output_1``, ... (nested: ``output_0_1``). ``None`` is skipped."""
    if out is None:
        return []
    if isinstance(out, torch.Tensor):
        return [(prefix, out)]
    if isinstance(out, Mapping):
        return [item for key, value in out.items() for item in flatten_outputs(value, str(key))]
    if isinstance(out, Sequence) and not isinstance(out, str):
        return [item for i, value in enumerate(out) for item in flatten_outputs(value, f"{prefix}_{i}")]
    raise PiMoEExportError(f"model output {prefix!r} is a {type(out).__name__}; outputs must be tensors, or "
                           "tuples/lists/dicts of tensors")


class ForExport(nn.Module):
    """Positional named inputs -> the model -> flat outputs (+ routing outputs of every layer, in call order)."""

    def __init__(self, model: nn.Module, input_names: list[str], routing: list | None) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.routing = routing
        self.output_names: list[str] = []

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.routing is not None:
            self.routing.clear()
        flat = flatten_outputs(self.model(**dict(zip(self.input_names, args, strict=True))))
        extra = [] if self.routing is None else [
            item for path, ids, weights in self.routing
            for item in ((routing_name(path, LAYER_EXPERT_IDS), ids), (routing_name(path, LAYER_EXPERT_WEIGHTS),
                                                                          weights))]
        self.output_names = [name for name, _ in flat + extra]
        return tuple(t for _, t in flat + extra)


def routing_name(layer_path: str, output: str) -> str:
    """Graph output name of a layer's routing output, e.g. ``encoder.layer.0.moe/expert_ids``; a bare layer's
    (path "") is the output's own name, as in the layer interface."""
    return f"{layer_path}/{output}" if layer_path else output


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def axes_of(example: dict[str, torch.Tensor], dynamic_axes: Mapping[str, Mapping[int, str]] | None,
            bounded: bool = True):
    """torch.export Dims for every input (batch, sequence by default) and the axis names per input. ``bounded``
    False: each axis is its name (torch.onnx exports it as ``Dim.DYNAMIC`` and names the graph's axis so), for a
    model whose tracing adds guards past the declared bounds (a decoder's cache and masks: torch.export traces every
    size as >= 2; the ONNX graph has no such bound and runs one-token steps and empty pasts)."""
    if dynamic_axes is None:
        dynamic_axes = {name: {0: BATCH_AXIS, 1: SEQUENCE_AXIS} if t.dim() >= 2 else {0: BATCH_AXIS}
                        for name, t in example.items()}
    unknown = set(dynamic_axes) - set(example)
    if unknown:
        raise PiMoEExportError(f"dynamic_axes names inputs {sorted(unknown)} that example_inputs do not have")
    dims: dict[str, Any] = {}
    specs = []
    for name, t in example.items():
        axes = dict(dynamic_axes.get(name, {}))
        if any(not 0 <= a < t.dim() for a in axes):
            raise PiMoEExportError(f"dynamic_axes[{name!r}] names axes {sorted(axes)} of a {t.dim()}-d input")
        for a in axes.values():
            dims.setdefault(a, torch.export.Dim(a.replace(" ", "_"), min=1, max=MAX_AXIS) if bounded else a)
        specs.append({a: dims[n] for a, n in axes.items()})
    return specs, dynamic_axes


def name_output_axes(proto: onnx.ModelProto, outputs: list[torch.Tensor], output_names: list[str],
                     example: dict[str, torch.Tensor], axes: Mapping[str, Mapping[int, str]]) -> None:
    """Name the output axes the exporter left as sums of input axes (a decoder's present key/values:
    ``sequence + past_sequence``) after the one named input axis of the same size in the example (its
    ``total_sequence``); any other expression, or a sum no input axis matches, keeps its form."""
    by_size: dict[int, set[str]] = {}
    for name, t in example.items():
        for axis, axis_name in axes.get(name, {}).items():
            by_size.setdefault(int(t.shape[axis]), set()).add(axis_name)
    inputs = {d.dim_param for i in proto.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
    shapes = dict(zip(output_names, (t.shape for t in outputs), strict=True))
    for output in proto.graph.output:
        for axis, d in enumerate(output.type.tensor_type.shape.dim):
            terms = [t.strip() for t in d.dim_param.split("+")]
            if len(terms) < 2 or not all(t in inputs for t in terms) or output.name not in shapes:
                continue
            names = by_size.get(int(shapes[output.name][axis]), set())
            if len(names) == 1:
                d.dim_param = next(iter(names))


def graph_interface(proto: onnx.ModelProto, example: dict[str, torch.Tensor], outputs: list[torch.Tensor],
               output_names: list[str], axes: Mapping[str, Mapping[int, str]]) -> GraphInterface:
    """The graph's I/O with axis names: inputs from ``axes``; outputs take the name of an input axis they share
    in the exported graph (dim_param), fixed sizes otherwise."""
    graph_dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
                  for o in proto.graph.output}
    symbols: dict[str, str] = {}
    for i in proto.graph.input:
        for axis, d in enumerate(i.type.tensor_type.shape.dim):
            if d.dim_param and axis in axes.get(i.name, {}):
                symbols[d.dim_param] = axes[i.name][axis]
    inputs = tuple(TensorInterface(n, _dtype_name(t), tuple(axes.get(n, {}).get(a, int(s)) for a, s in
                                                          enumerate(t.shape))) for n, t in example.items())
    outs = []
    for name, t in zip(output_names, outputs, strict=True):
        dims = graph_dims.get(name, list(t.shape))
        outs.append(TensorInterface(name, _dtype_name(t), tuple(
            symbols.get(d, BATCH_AXIS if d else -1) if isinstance(d, str) else int(d) for d in dims)))
    return GraphInterface(inputs, tuple(outs))


def split_sequences(proto: onnx.ModelProto) -> int:
    """Rewrite ``SplitToSequence`` + constant-index ``SequenceAt`` (what ``torch.chunk``/``split`` export to) as one
    ``Split``: TensorRT's parser has no sequence types. Patterns it cannot resolve statically are left as they are
    (the build then names the node). Returns the number rewritten."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer  # small constants (split sizes) only
              if i.data_location != onnx.TensorProto.EXTERNAL and i.ByteSize() <= 4096}
    for n in graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.input]}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    replaced: dict[int, list[onnx.NodeProto]] = {}  # id(node) -> its replacement nodes (empty: removed)
    rewritten = 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        users = consumers.get(node.output[0], [])
        if node.op_type != "SplitToSequence" or attrs.get("keepdims", 1) != 1 or len(node.input) < 2 or \
                node.input[1] not in consts or not users or \
                any(u.op_type != "SequenceAt" or u.input[1] not in consts for u in users):
            continue
        axis, split = int(attrs.get("axis", 0)), consts[node.input[1]]
        dims = shapes.get(node.input[0])
        if split.ndim == 0:
            total = dims[axis] if dims and -len(dims) <= axis < len(dims) else None
            if not total:
                continue
            chunk = int(split)
            sizes = [chunk] * (total // chunk) + ([total % chunk] if total % chunk else [])
        else:
            sizes = [int(v) for v in split]
        outputs = [f"{node.output[0]}__part{i}" for i in range(len(sizes))]
        sizes_name = f"{node.output[0]}__sizes"
        graph.initializer.append(numpy_helper.from_array(np.asarray(sizes, np.int64), sizes_name))
        replaced[id(node)] = [helper.make_node("Split", [node.input[0], sizes_name], outputs, axis=axis,
                                               name=f"{node.name or node.output[0]}__split")]
        for user in users:
            index = int(consts[user.input[1]])
            replaced[id(user)] = [helper.make_node("Identity", [outputs[index % len(sizes)]], [user.output[0]],
                                                   name=f"{user.name or user.output[0]}__part")]
        rewritten += 1
    if rewritten:
        nodes = [new for n in graph.node for new in replaced.get(id(n), [n])]
        del graph.node[:]
        graph.node.extend(nodes)
    return rewritten


def prepare_for_export(model: nn.Module, precision: str = "fp32", routing_outputs: bool = False,
                       standard_ops: bool = False) -> tuple[nn.Module, dict[str, MoELayer], list | None]:
    """A copy of ``model`` (eval mode, ``precision``) whose MoE layers are :class:`ExportedLayer`s. An fp32 copy
    shares the model's parameters and buffers (nothing changes them), so a large model is not held twice."""
    if precision not in FLOAT_DTYPES:
        raise PiMoEExportError(f"precision must be one of {sorted(FLOAT_DTYPES)} (INT8: quantize the exported "
                               f"model), got {precision!r}")
    layers = moe_layers(model)
    if not layers:
        raise PiMoEExportError(f"{type(model).__name__} contains no PiMoE layer (PiMoESystem, AdaptivePiMoE or "
                               "EnhancedPiMoEIntegration); there is nothing to express with the pimoe ops")
    routing: list | None = [] if routing_outputs else None
    shared = {} if precision == "fp16" else {id(t): t for t in (*model.parameters(), *model.buffers())}
    work = copy.deepcopy(model, shared).eval()
    if precision == "fp16":
        work = work.half()  # before the layers are replaced: their fp32 router, biases and norms stay fp32
    for path, layer in layers.items():  # built from the caller's (fp32) layers
        work = replace_module(work, path, ExportedLayer(layer, path, precision, routing, standard_ops))
    return work, layers, routing
