"""torch -> ONNX: the one export entry point, for a bare PiMoE layer and for a whole model alike.

    model (nn.Module with PiMoE layers) + named example inputs
      -> a copy whose PiMoE layers are ExportedLayers (tracing.py): the four pimoe ops (or standard ops only)
      -> torch.onnx (dynamo), inputs named, batch/sequence axes dynamic, outputs flat and named
      -> metadata (config of every layer, graph interface, contract, precision, weights fingerprint)
      -> contract check, onnx.checker, shape inference -> the file

:func:`export_model` is that path. :func:`export_source` feeds it a :class:`~pimoe_export.model.source.ModelSource`
(what the pipeline and the CLI hold); :func:`export_onnx` a bare layer with the layer interface
(``hidden_states`` in; ``output``, ``expert_ids``, ``expert_weights`` out).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from pimoe_export.errors import PiMoEExportError
from pimoe_export.export.tracing import (
    ForExport,
    axes_of,
    graph_interface,
    name_output_axes,
    prepare_for_export,
    split_sequences,
)
from pimoe_export.interface import (
    EXTERNAL_DATA_BYTES,
    META_CONTRACT,
    META_EXPORTER,
    META_GRAPH,
    META_PRECISION,
    META_WEIGHTS,
    ONNX_OPSET,
    ROOT_LAYER,
    external_data_files,
    graph_metadata,
    write_onnx,
)
from pimoe_export.model.source import ModelSource, layer_source
from pimoe_export.model.system import PiMoESystem
from pimoe_export.ops import schema
from pimoe_export.ops.onnx_schema import register_onnx_schemas


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the model's parameters and buffers (name, dtype, shape, bytes), in state_dict order;
    statistics buffers excluded."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        leaf = name.rsplit(".", 1)[-1]  # a layer's own buffers, or those of the layers inside a whole model
        if leaf in ("expert_usage_count", "routed_prob_mass", "total_tokens") or leaf.startswith("window_"):
            continue
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass
class ExportResult:
    path: Path
    graph: str
    precision: str
    seconds: float
    node_counts: dict[str, int]


def set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for key, value in values.items():
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)


def get_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def validate_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx.checker (full check) and shape inference; returns the shape-inferred model. A graph whose weights live
    in external data is checked once written: :func:`save_validated`."""
    from pimoe_export.errors import ArtifactError
    from pimoe_export.ops.validation import check_graph

    register_onnx_schemas()
    try:
        check_graph(model)  # the op contract: attribute ranges, domains (the checker knows types, not ranges)
    except ArtifactError as exc:
        raise PiMoEExportError(f"the exported ONNX breaks the op contract: {exc}") from None
    if external_data_files(model):
        return model
    try:
        onnx.checker.check_model(model, full_check=True)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=False)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise PiMoEExportError(f"the exported ONNX failed validation: {exc}") from None


def save_validated(proto: onnx.ModelProto, path: str | Path) -> onnx.ModelProto:
    """Validate ``proto`` (:func:`validate_onnx`) and write it (external data beside it past 2 GB); a graph with
    external data is checked and shape-inferred from the file, as the checker reads such graphs."""
    proto = validate_onnx(proto)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_onnx(proto, path)
    if not external_data_files(proto):
        return proto
    try:
        onnx.checker.check_model(str(path), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(path), str(path), check_type=True, strict_mode=False)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise PiMoEExportError(f"the exported ONNX failed validation: {exc}") from None
    return onnx.load(str(path), load_external_data=False)


def finish_export(proto: onnx.ModelProto, path: str | Path, model: torch.nn.Module, graph: str, precision: str,
                  metadata: dict[str, str], start: float) -> ExportResult:
    """The common end of every export: the pimoe opset, metadata (``metadata`` plus contract, graph kind,
    precision, exporter versions, weights fingerprint), validation, the file, node counts."""
    if graph == "custom-ops" and not any(o.domain == schema.DOMAIN for o in proto.opset_import):
        proto.opset_import.add(domain=schema.DOMAIN, version=schema.OPSET_VERSION)
    set_metadata(proto, {
        **metadata,
        META_CONTRACT: str(schema.CONTRACT_VERSION),
        META_GRAPH: graph,
        META_PRECISION: precision,
        META_EXPORTER: json.dumps({"torch": torch.__version__, "onnx": onnx.__version__}),
        META_WEIGHTS: weights_fingerprint(model),
    })
    proto.producer_name = "pimoe-export"
    path = Path(path)
    proto = save_validated(proto, path)
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return ExportResult(path, graph, precision, time.perf_counter() - start, counts)


def export_model(
    model: nn.Module,
    path: str | Path,
    example_inputs: Mapping[str, torch.Tensor],
    *,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    precision: str = "fp32",
    routing_outputs: bool = False,
    standard_ops: bool = False,
    metadata: Mapping[str, str] | None = None,
    bounded_axes: bool = True,
) -> ExportResult:
    """Export ``model`` (called as ``model(**inputs)``) to one ONNX graph at ``path``.

    ``example_inputs``: the named inputs (their names become the graph's). ``dynamic_axes``: {input: {axis: name}},
    default axis 0 ``batch`` and axis 1 ``sequence`` of every input. Outputs are named by
    :func:`~pimoe_export.export.tracing.flatten_outputs`; ``routing_outputs`` adds ``<layer path>/expert_ids`` and
    ``/expert_weights`` for every PiMoE layer (a bare layer's: ``expert_ids``, ``expert_weights``).
    ``standard_ops``: every PiMoE layer with standard ONNX ops only (TopK, every expert evaluated densely).
    ``metadata``: further metadata of the graph (e.g. a decoder's ``pimoe.decoder``). ``bounded_axes`` False:
    the dynamic axes are not bounded to [1, 65536] while tracing (:func:`~pimoe_export.export.tracing.axes_of`).
    """
    start = time.perf_counter()
    example = dict(example_inputs)
    if not example or not all(isinstance(t, torch.Tensor) for t in example.values()):
        raise PiMoEExportError("example_inputs must map input names to tensors")
    work, layers, routing = prepare_for_export(model, precision, routing_outputs, standard_ops)
    wrapper = ForExport(work, list(example), routing).eval()
    if precision == "fp16":
        example = {n: t.half() if t.is_floating_point() else t for n, t in example.items()}
    specs, axes = axes_of(example, dynamic_axes, bounded_axes)
    table = None
    if not standard_ops:
        from pimoe_export.ops.onnx_translation import custom_translation_table

        table = custom_translation_table()

    with torch.no_grad():
        outputs = wrapper(*example.values())  # eager: output names, and the model runs at all
        names = list(wrapper.output_names)
        if len(set(names)) != len(names):
            raise PiMoEExportError(f"the model's outputs have repeated names {names}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # a whole model is constant-folded by onnxscript's optimizer (TensorRT's parser needs build-time
            # constants where torch computes shapes and axes); a bare layer's graph keeps its contract-v1 form
            program = torch.onnx.export(
                wrapper, tuple(example.values()), dynamo=True, custom_translation_table=table,
                dynamic_shapes={"args": tuple(specs)}, input_names=list(example), output_names=names,
                opset_version=ONNX_OPSET, optimize=list(layers) != [ROOT_LAYER], verify=False, report=False,
                verbose=False)
    if program is None:
        raise PiMoEExportError("torch.onnx.export returned no program")
    proto = _program_proto(program, work, Path(path))
    split_sequences(proto)
    name_output_axes(proto, list(outputs), names, example, axes)
    interface = graph_interface(proto, example, list(outputs), names, axes)
    graph_meta = graph_metadata(type(model).__name__, {p: layer.config.to_json() for p, layer in layers.items()},
                                interface)
    clash = sorted(set(graph_meta) & set(metadata or {}))
    if clash:
        raise PiMoEExportError(f"the model source's metadata would replace the exporter's own keys {clash}: give "
                               f"it other names")
    return finish_export(proto, path, model, "standard-ops" if standard_ops else "custom-ops", precision,
                         {**graph_meta, **(metadata or {})}, start)


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each tensor once)."""
    seen = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in seen.values())


def _program_proto(program: torch.onnx.ONNXProgram, model: nn.Module, path: Path) -> onnx.ModelProto:
    """The exported graph as a proto. Past 2 GB of weights the program writes them straight into external data
    beside ``path`` (one tensor at a time, from the model's own memory) and the proto refers to them."""
    if state_bytes(model) <= EXTERNAL_DATA_BYTES:
        return program.model_proto
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=True)
    return onnx.load(str(path), load_external_data=False)


def export_source(source: ModelSource, path: str | Path, *, precision: str = "fp32",
                  standard_ops: bool = False) -> ExportResult:
    """Export a model source with its example inputs (its inputs' axis names dynamic), its metadata and every
    layer's routing as outputs."""
    if standard_ops and not source.standard_ops:
        raise PiMoEExportError("this model is exported with the pimoe ops only (its source offers no standard-op "
                               "graph); drop standard_ops")
    axes = {t.name: {axis: d for axis, d in enumerate(t.dims) if isinstance(d, str)} for t in source.inputs}
    return export_model(source.module, path, source.example_tensors(), dynamic_axes=axes, precision=precision,
                        routing_outputs=True, standard_ops=standard_ops, metadata=source.metadata,
                        bounded_axes=source.bounded_axes)


def export_onnx(
    model: PiMoESystem,
    path: str | Path,
    *,
    precision: str = "fp32",
    standard_ops: bool = False,
    example_shape: tuple[int, int] = (2, 8),
) -> ExportResult:
    """Export a bare PiMoE layer with dynamic batch and sequence axes (:func:`export_source` of its
    :func:`~pimoe_export.model.source.layer_source`).

    Inputs: ``hidden_states`` [batch, sequence, H] (fp32 or fp16). Outputs: ``output`` [batch, sequence, H],
    ``expert_ids`` [batch, sequence, k] int32, ``expert_weights`` [batch, sequence, k] fp32.
    """
    return export_source(layer_source(model, example_shape), path, precision=precision, standard_ops=standard_ops)
