"""torch -> ONNX: the custom-op graph (default) or the plugin-free standard-op graph."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from pimoe_export.errors import PiMoEExportError
from pimoe_export.export.modules import FLOAT_DTYPES, CustomOpPiMoE, StandardOpsPiMoE
from pimoe_export.interface import (
    BATCH_AXIS,
    LAYER_INPUT,
    LAYER_OUTPUTS,
    META_CONFIG,
    META_CONTRACT,
    META_EXPORTER,
    META_GRAPH,
    META_PRECISION,
    META_WEIGHTS,
    ONNX_OPSET,
    SEQUENCE_AXIS,
)
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


def _quiet_export(module: torch.nn.Module, example: torch.Tensor, table: dict | None) -> onnx.ModelProto:
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=65536)
    sequence = torch.export.Dim(SEQUENCE_AXIS, min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            custom_translation_table=table,
            dynamic_shapes={LAYER_INPUT: {0: batch, 1: sequence}},
            input_names=[LAYER_INPUT],
            output_names=list(LAYER_OUTPUTS),
            opset_version=ONNX_OPSET,
            # onnxscript's optimizer stays off: ORT and TensorRT optimise the graph themselves, and the written
            # graph keeps the exporter's structure (the pimoe schemas now infer types and shapes, so turning it
            # on is possible; not measured yet)
            optimize=False,
            verify=False,
            report=False,
            verbose=False,
        )
    if program is None:
        raise PiMoEExportError("torch.onnx.export returned no program")
    return program.model_proto


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
    """onnx.checker (full check) and shape inference; returns the shape-inferred model."""
    from pimoe_export.errors import ArtifactError
    from pimoe_export.ops.validation import check_graph

    register_onnx_schemas()
    try:
        check_graph(model)  # the op contract: attribute ranges, domains (the checker knows types, not ranges)
    except ArtifactError as exc:
        raise PiMoEExportError(f"the exported ONNX breaks the op contract: {exc}") from None
    try:
        onnx.checker.check_model(model, full_check=True)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=False)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise PiMoEExportError(f"the exported ONNX failed validation: {exc}") from None


def export_onnx(
    model: PiMoESystem,
    path: str | Path,
    *,
    precision: str = "fp32",
    standard_ops: bool = False,
    example_shape: tuple[int, int] = (2, 8),
) -> ExportResult:
    """Export ``model`` to ``path`` with dynamic batch and sequence axes.

    Inputs: ``hidden_states`` [batch, sequence, H] (fp32 or fp16). Outputs: ``output`` [batch, sequence, H],
    ``expert_ids`` [batch, sequence, k] int32, ``expert_weights`` [batch, sequence, k] fp32.
    """
    if precision not in FLOAT_DTYPES:
        raise PiMoEExportError(f"precision must be one of {sorted(FLOAT_DTYPES)} (INT8: `pimoe-export quantize`), "
                               f"got {precision!r}")
    start = time.perf_counter()
    module = (StandardOpsPiMoE if standard_ops else CustomOpPiMoE)(model, precision).eval()
    example = torch.randn(*example_shape, model.hidden_size, generator=torch.Generator().manual_seed(0)).to(
        FLOAT_DTYPES[precision]
    )
    table = None
    if not standard_ops:
        from pimoe_export.ops.onnx_translation import custom_translation_table

        table = custom_translation_table()
    with torch.no_grad():
        proto = _quiet_export(module, example, table)
    graph = "standard-ops" if standard_ops else "custom-ops"
    return finish_export(proto, path, model, graph, precision, {META_CONFIG: model.config.to_json()}, start)


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
    proto = validate_onnx(proto)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path))
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return ExportResult(path, graph, precision, time.perf_counter() - start, counts)
