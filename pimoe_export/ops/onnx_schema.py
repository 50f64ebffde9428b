"""Register the op contract with ONNX's schema registry (``onnx.defs.register_schema``), once per contract version.

Each op is registered at every ``pimoe`` opset version 1..OPSET_VERSION with the attributes that version defines
(``AttrSpec.since``), so ``onnx.checker`` validates a v1 graph (opset import ``pimoe`` 1) against v1 and refuses a
v2 attribute in it.

With the schemas registered, ``onnx.checker`` validates our nodes (inputs, attributes, type constraints)
instead of skipping an unknown domain, onnxscript can build ``pimoe`` nodes, and shape inference types every
output (strict mode works on a graph stripped of its ``value_info``). Generated from
:mod:`pimoe_export.ops.schema` (the inference evaluates the schema's symbolic shapes); idempotent.
"""

from __future__ import annotations

import re
from typing import Any

import onnx
from onnx import TensorProto, helper
from onnx.defs import OpSchema

from pimoe_export.ops import schema

_ONNX_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int32": "tensor(int32)",
               "int8": "tensor(int8)"}
_ATTR_TYPES = {
    "int": OpSchema.AttrType.INT,
    "ints": OpSchema.AttrType.INTS,
    "float": OpSchema.AttrType.FLOAT,
    "floats": OpSchema.AttrType.FLOATS,
    "string": OpSchema.AttrType.STRING,
}


def _formal(spec: schema.TensorSpec) -> OpSchema.FormalParameter:
    type_str = spec.type_param or _ONNX_TYPES[spec.dtypes[0]]
    if spec.variadic:
        option = OpSchema.FormalParameterOption.Variadic
    elif spec.optional:
        option = OpSchema.FormalParameterOption.Optional
    else:
        option = OpSchema.FormalParameterOption.Single
    return OpSchema.FormalParameter(spec.name, type_str, spec.doc, param_option=option,
                                    is_homogeneous=not spec.variadic, min_arity=1)


def _attribute(attr: schema.AttrSpec) -> OpSchema.Attribute:
    if attr.default is None:
        return OpSchema.Attribute(attr.name, _ATTR_TYPES[attr.kind], attr.doc, required=True)
    return OpSchema.Attribute(attr.name, _ATTR_TYPES[attr.kind], attr.doc, required=False)


def _collapse_variadic(op: schema.OpSchema) -> tuple[schema.TensorSpec, ...]:
    """Inputs as registered with ONNX.

    An op whose variadic input follows fixed inputs (`PiMoEExpertMLP`) is registered with ONE heterogeneous
    variadic input covering all of them: torch.onnx's dynamo exporter binds every positional argument to a
    variadic parameter, whatever precedes it, so the exact signature would duplicate the leading inputs.
    The node's inputs are identical either way; the per-input contract stays in schema.py and every kernel
    checks it.
    """
    if not any(spec.variadic for spec in op.inputs) or op.inputs[0].variadic:
        return op.inputs
    dtypes = tuple(sorted({d for spec in op.inputs for d in spec.dtypes}))
    names = ", ".join(spec.name for spec in op.inputs)
    return (schema.TensorSpec("inputs", dtypes, "", variadic=True, type_param="V", doc=f"{names} (see schema.py)"),)


_ELEM_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int32": TensorProto.INT32,
               "int8": TensorProto.INT8}
#: attributes that give a symbol of the schema's shapes
_ATTR_SYMBOLS = {"k": "k", "num_experts": "E", "widths": "widths"}
_TERM = re.compile(r"^(\w+)(?:\[(-?\d+)\])?$")

Dim = int | str | None  # a size, a symbolic dim_param, or unknown


def _dims(type_proto: Any) -> list[Dim] | None:
    if not type_proto.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in type_proto.tensor_type.shape.dim]


def _evaluate(expr: str, symbols: dict[str, Any]) -> Dim:
    """One dim of a schema shape: ``N``, ``widths[-1]``, ``E+1``, ``N*k`` (a product or sum of unknowns is unknown)."""
    for op, combine in (("+", lambda a, b: a + b), ("*", lambda a, b: a * b)):
        if op in expr:
            left, right = (_evaluate(part.strip(), symbols) for part in expr.split(op, 1))
            return combine(left, right) if isinstance(left, int) and isinstance(right, int) else None
    if expr.isdigit():
        return int(expr)
    match = _TERM.match(expr)
    if match is None:
        return None
    value = symbols.get(match.group(1))
    if match.group(2) is not None:
        return value[int(match.group(2))] if isinstance(value, list) and value else None
    return value


def _shape_terms(shape: str) -> list[str]:
    return [t.strip() for t in shape[1:-1].split(",")] if shape.startswith("[") and shape.endswith("]") else []


def _inference(op: schema.OpSchema) -> Any:
    """Type and shape inference for ``op``: outputs' element types from the type parameters, shapes by evaluating
    the schema's symbolic shapes with symbols bound from the inputs' dims and the attributes."""
    fixed_inputs = [spec for spec in op.inputs if not spec.variadic]

    def infer(ctx: Any) -> None:
        symbols: dict[str, Any] = {}
        types: dict[str, int] = {}
        for index, spec in enumerate(fixed_inputs):
            if index >= ctx.get_num_inputs() or not ctx.has_input(index):
                continue
            proto = ctx.get_input_type(index)
            if proto is None or not proto.HasField("tensor_type"):
                continue
            if spec.type_param:
                types.setdefault(spec.type_param, proto.tensor_type.elem_type)
            dims = _dims(proto)
            terms = _shape_terms(spec.shape)
            if dims is not None and len(dims) == len(terms):
                for term, dim in zip(terms, dims, strict=True):
                    if re.fullmatch(r"[A-Za-z]\w*", term) and dim is not None:
                        symbols.setdefault(term, dim)
        for attr_name, symbol in _ATTR_SYMBOLS.items():
            attr = ctx.get_attribute(attr_name)
            if attr is not None:
                symbols[symbol] = helper.get_attribute_value(attr)
                if isinstance(symbols[symbol], list | tuple):
                    symbols[symbol] = [int(v) for v in symbols[symbol]]
        for index, spec in enumerate(op.outputs):
            if spec.type_param and spec.type_param not in types:
                continue  # the input that fixes this output's type is untyped: leave the output to the graph
            elem = types[spec.type_param] if spec.type_param else _ELEM_TYPES[spec.dtypes[0]]
            dims = [_evaluate(term, symbols) for term in _shape_terms(spec.shape)]
            shape = [d if d is not None else "" for d in dims]
            out = helper.make_tensor_type_proto(elem, shape)
            for dim, value in zip(out.tensor_type.shape.dim, dims, strict=True):
                if value is None:  # unknown: neither value nor name
                    dim.Clear()
            ctx.set_output_type(index, out)

    return infer


def onnx_op_schema(op: schema.OpSchema, version: int = schema.OPSET_VERSION) -> OpSchema:
    inputs = _collapse_variadic(op)
    constraints: dict[str, set[str]] = {}
    for spec in (*inputs, *op.outputs):
        if spec.type_param:
            constraints.setdefault(spec.type_param, set()).update(_ONNX_TYPES[d] for d in spec.dtypes)
    registered = OpSchema(
        op.name,
        schema.DOMAIN,
        version,
        op.doc,
        inputs=[_formal(s) for s in inputs],
        outputs=[_formal(s) for s in op.outputs],
        type_constraints=[(name, sorted(types), "") for name, types in constraints.items()],
        attributes=[_attribute(a) for a in op.attributes if a.since <= version],
    )
    registered.set_type_and_shape_inference_function(_inference(op))
    return registered


def register_onnx_schemas() -> None:
    for op in schema.SCHEMAS.values():
        for version in range(1, schema.OPSET_VERSION + 1):
            try:
                registered = onnx.defs.get_schema(op.name, version, schema.DOMAIN)
            except onnx.defs.SchemaError:
                registered = None
            if registered is None or registered.since_version != version:
                onnx.defs.register_schema(onnx_op_schema(op, version))


register_onnx_schemas()
