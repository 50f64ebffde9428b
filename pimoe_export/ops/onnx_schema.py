"""Register op contract v1 with ONNX's schema registry (``onnx.defs.register_schema``).

With the schemas registered, ``onnx.checker`` validates our nodes (inputs, attributes, type constraints)
instead of skipping an unknown domain, and onnxscript can build ``pimoe`` nodes. Generated from
:mod:`pimoe_export.ops.schema`; idempotent.
"""

from __future__ import annotations

import onnx
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


def onnx_op_schema(op: schema.OpSchema) -> OpSchema:
    inputs = _collapse_variadic(op)
    constraints: dict[str, set[str]] = {}
    for spec in (*inputs, *op.outputs):
        if spec.type_param:
            constraints.setdefault(spec.type_param, set()).update(_ONNX_TYPES[d] for d in spec.dtypes)
    return OpSchema(
        op.name,
        schema.DOMAIN,
        schema.OPSET_VERSION,
        op.doc,
        inputs=[_formal(s) for s in inputs],
        outputs=[_formal(s) for s in op.outputs],
        type_constraints=[(name, sorted(types), "") for name, types in constraints.items()],
        attributes=[_attribute(a) for a in op.attributes],
    )


def register_onnx_schemas() -> None:
    for op in schema.SCHEMAS.values():
        try:
            onnx.defs.get_schema(op.name, schema.OPSET_VERSION, schema.DOMAIN)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(onnx_op_schema(op))


register_onnx_schemas()
