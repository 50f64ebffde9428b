"""Standard Q/DQ INT8 for the Linear layers OUTSIDE the PiMoE layers of a whole-model graph (attention
projections, pooler), through ONNX Runtime's own quantiser (``onnxruntime.quantization.quantize_static``).

The PiMoE layers are already INT8 through our ops (W8A8 experts) and their routers stay fp32 by design; this adds
the rest of the model's weight GEMMs in the QDQ format that ONNX Runtime (and TensorRT) fuse into int8 kernels:
symmetric int8 activations (static scales from the calibration feeds) and per-output-channel symmetric int8
weights. Only MatMul/Gemm nodes with a constant weight are quantised; products of two activations (attention
scores) and every node that computes a PiMoE router's logits stay fp32.

ONNX Runtime's calibrator builds its own InferenceSession of the graph, which holds our custom ops: while it runs,
``onnxruntime.SessionOptions`` returns options with libpimoe_ort registered (the quantiser has no hook for custom
op libraries).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pimoe_export.errors import PiMoEExportError, PiMoEInputError
from pimoe_export.interface import read_onnx
from pimoe_export.native.libraries import find_ort_library, import_onnxruntime
from pimoe_export.ops.schema import DISPATCH, DOMAIN, ROUTE

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def router_nodes(graph: Any) -> set[str]:
    """Names of the nodes that compute a PiMoE router's inputs: every ancestor of a PiMoERoute input, walking back
    until the hidden states that the same layer's PiMoEDispatch takes (the layer's input)."""
    producer = {out: node for node in graph.node for out in node.output}
    routes = [n for n in graph.node if n.domain == DOMAIN and n.op_type == ROUTE]
    stops = {n.input[0] for n in graph.node if n.domain == DOMAIN and n.op_type == DISPATCH}
    found: set[str] = set()
    pending = [name for route in routes for name in route.input]
    while pending:
        node = producer.get(pending.pop())
        if node is None or node.name in found:
            continue
        found.add(node.name)
        pending += [name for name in node.input if name not in stops]
    return found


def fold_weight_transposes(model: Any) -> int:
    """Replace every Transpose of an initializer (how the exporter writes a Linear's ``x @ W.T``) by the transposed
    initializer, in place, so the quantiser sees the weight as a constant it can quantise per channel. Returns
    how many were folded."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    folded = {}
    for node in list(graph.node):
        if node.op_type == "Transpose" and node.domain in ("", "ai.onnx") and node.input[0] in inits:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            value = numpy_helper.to_array(inits[node.input[0]])
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(np.transpose(value, perm)),
                                                             node.output[0]))
            folded[node.output[0]] = node
    for node in folded.values():
        graph.node.remove(node)
    sources = {node.input[0] for node in folded.values()}  # the untransposed weights, unless still read elsewhere
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for init in [init for init in graph.initializer if init.name in sources - used]:
        graph.initializer.remove(init)
    return len(folded)


def linear_nodes(graph: Any) -> list[str]:
    """MatMul/Gemm nodes whose weight is an initializer and that are not part of a router (what this module
    quantises); run :func:`fold_weight_transposes` first."""
    constants = {init.name for init in graph.initializer}
    routers = router_nodes(graph)
    return [n.name for n in graph.node if n.domain in ("", "ai.onnx") and n.op_type in ("MatMul", "Gemm")
            and len(n.input) > 1 and n.input[1] in constants and n.name not in routers]


@contextlib.contextmanager
def _custom_ops_in_every_session(ort: Any, library: Path) -> Iterator[None]:
    original = ort.SessionOptions

    def with_library() -> Any:
        options = original()
        options.register_custom_ops_library(str(library))
        return options

    ort.SessionOptions = with_library
    try:
        yield
    finally:
        ort.SessionOptions = original


def quantize_linears(onnx_in: str | Path, onnx_out: str | Path, feeds: Sequence[Mapping[str, Any]], *,
                     method: str = "minmax", library: str | Path | None = None) -> dict[str, Any]:
    """Write ``onnx_in`` with its non-PiMoE Linear layers in QDQ INT8 to ``onnx_out``, calibrated on ``feeds``
    (dicts of the graph's named inputs). Returns what was quantised."""

    ort = import_onnxruntime()
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if method not in CALIBRATION_METHODS:
        raise PiMoEInputError(f"Q/DQ calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    if not feeds:
        raise PiMoEInputError("Q/DQ of the Linear layers needs calibration inputs (feeds of the graph's inputs)")
    model = read_onnx(onnx_in, external_data=True)
    fold_weight_transposes(model)
    graph = model.graph
    nodes = linear_nodes(graph)
    if not nodes:
        raise PiMoEExportError(f"{onnx_in} has no Linear (MatMul/Gemm with a constant weight) outside the PiMoE "
                               "layers to quantise")

    class Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{k: np.asarray(v) for k, v in f.items()} for f in feeds])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.Entropy}[method]
    library = Path(library) if library is not None else find_ort_library()
    with _custom_ops_in_every_session(ort, library):
        quantize_static(model, str(onnx_out), Feeds(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=nodes, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=calibrate,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
                        calibration_providers=["CPUExecutionProvider"])
    return {"quantized_linears": len(nodes), "router_nodes_kept_fp32": len(router_nodes(graph)), "method": method,
            "format": "QDQ, int8 symmetric activations (static), per-channel int8 weights"}
