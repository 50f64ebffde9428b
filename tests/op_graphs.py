"""Single-op ONNX graphs for op-level tests of every backend (built with onnx.helper, no exporter)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pimoe_export.ops import schema

NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
              np.dtype(np.int32): TensorProto.INT32, np.dtype(np.int8): TensorProto.INT8,
              np.dtype(np.int64): TensorProto.INT64, np.dtype(np.float64): TensorProto.DOUBLE}


def _value(name: str, dtype: Any, rank: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, NP_TO_ONNX[np.dtype(dtype)], [None] * rank)


def single_op_model(
    op_type: str,
    inputs: Sequence[tuple[str, np.ndarray]],
    outputs: Sequence[tuple[str, Any, int]],
    attrs: dict[str, Any],
    initializers: Sequence[tuple[str, np.ndarray]] = (),
) -> bytes:
    """A model with one pimoe node: ``inputs`` become graph inputs (dynamic dims, given dtypes),
    ``initializers`` constant inputs appended after them."""
    node = helper.make_node(
        op_type,
        [name for name, _ in inputs] + [name for name, _ in initializers],
        [name for name, _, _ in outputs],
        domain=schema.DOMAIN,
        **attrs,
    )
    graph = helper.make_graph(
        [node],
        f"single_{op_type}",
        [_value(name, arr.dtype, arr.ndim) for name, arr in inputs],
        [_value(name, dtype, rank) for name, dtype, rank in outputs],
        initializer=[numpy_helper.from_array(arr, name) for name, arr in initializers],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(schema.DOMAIN, schema.OPSET_VERSION)]
    )
    model.ir_version = 10
    return model.SerializeToString()


def expert_mlp_attrs(expert_ids, widths, activation, layer_norm, eps=1e-5, quant_mode="none", act_scales=(),
                     **v2):
    """The node's attributes; ``v2``: contract-v2 attributes (gated, bias, alpha, limit), written when given."""
    attrs = {"expert_ids": list(expert_ids), "widths": list(widths), "activation": activation,
             "layer_norm": int(layer_norm), "eps": float(eps), "quant_mode": quant_mode}
    if act_scales:
        attrs["act_scales"] = [float(s) for s in act_scales]
    return attrs | v2_attrs(v2)


def v2_attrs(v2: dict[str, Any]) -> dict[str, Any]:
    """Contract-v2 attributes as ONNX attribute values (flags as ints, numbers as floats)."""
    out: dict[str, Any] = {}
    for name, value in v2.items():
        out[name] = int(value) if isinstance(value, bool) else float(value) if isinstance(value, float) else value
    return out
