"""The op contract applied to an ONNX graph before anything runs or builds it (``check``, ``build``, ``package``).

The kernels check their arguments again at every entry (plugins/common/pimoe_attrs.h); this is the same contract
read from :mod:`pimoe_export.ops.schema`, applied early so that a bad graph gives one clear error naming the node,
instead of an ONNX Runtime or TensorRT failure deep inside a session or a build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pimoe_export.errors import ArtifactError
from pimoe_export.ops import schema


def _attribute_value(attr: Any) -> Any:
    from onnx import helper

    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, list):
        return [v.decode(errors="replace") if isinstance(v, bytes) else v for v in value]
    return value


def attribute_problems(op: str, attrs: dict[str, Any]) -> list[str]:
    """Contract violations of one node's attributes (unknown, missing required, wrong kind or out of range)."""
    spec = schema.SCHEMAS[op]
    known = {a.name: a for a in spec.attributes}
    problems = [f"unknown attribute {name!r}" for name in attrs if name not in known]
    for name, attr in known.items():
        if name not in attrs:
            if attr.default is None:
                problems.append(f"missing required attribute {name!r}")
            continue
        if problem := attr.accepts(attrs[name]):
            problems.append(f"attribute {name} {problem}")
    if op == schema.EXPERT_MLP and not problems:
        problems += _expert_mlp_problems(attrs)
    return problems


def _expert_mlp_problems(attrs: dict[str, Any]) -> list[str]:
    problems = []
    ids, widths = list(attrs["expert_ids"]), list(attrs["widths"])
    if not ids or len(set(ids)) != len(ids):
        problems.append(f"expert_ids must list distinct experts, got {ids}")
    if not 2 <= len(widths) <= schema.MAX_LAYERS + 1:
        problems.append(f"widths must hold 2..{schema.MAX_LAYERS + 1} entries (layers + 1), got {len(widths)}")
    scales = list(attrs.get("act_scales", []))
    if attrs.get("quant_mode", "none") == "w8a8" and len(scales) != (len(widths) - 1) * len(ids):
        problems.append(f"quant_mode w8a8 needs act_scales with layers*G = {(len(widths) - 1) * len(ids)} entries, "
                        f"got {len(scales)}")
    return problems


def check_graph(model: str | Path | Any) -> None:
    """Raise ArtifactError when a node of ``model`` (a path or a ModelProto) breaks the op contract: one of our op
    names in another domain, an op of our domain the contract does not define, an attribute out of range, a route
    whose k exceeds the dispatch's num_experts."""
    from pimoe_export.interface import read_onnx

    source = str(model) if isinstance(model, (str, Path)) else "the model"
    proto = read_onnx(model) if isinstance(model, (str, Path)) else model
    problems: list[str] = []
    ks, experts = [], []
    for index, node in enumerate(proto.graph.node):
        where = f"node {index} ({node.name or node.op_type})"
        ours = node.op_type in schema.SCHEMAS
        if node.domain == schema.DOMAIN and not ours:
            problems.append(f"{where}: {node.op_type} is not an op of contract v{schema.CONTRACT_VERSION} "
                            f"(known: {sorted(schema.SCHEMAS)})")
        elif ours and node.domain != schema.DOMAIN:
            problems.append(f"{where}: {node.op_type} is in domain {node.domain or '(default)'!r}, not "
                            f"{schema.DOMAIN!r}; no runtime implements it there")
        elif ours:
            attrs = {a.name: _attribute_value(a) for a in node.attribute}
            problems += [f"{where}: {p}" for p in attribute_problems(node.op_type, attrs)]
            if node.op_type == schema.ROUTE and isinstance(attrs.get("k"), int):
                ks.append(attrs["k"])
            if node.op_type == schema.DISPATCH and isinstance(attrs.get("num_experts"), int):
                experts.append(attrs["num_experts"])
    if ks and experts and max(ks) > min(experts):
        problems.append(f"PiMoERoute k={max(ks)} exceeds PiMoEDispatch num_experts={min(experts)} (k <= E)")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ArtifactError(f"{source} breaks the pimoe op contract: {shown}. Re-export it with `pimoe-export "
                            "export` (or `quantize`) from a valid checkpoint")


def elements_per_token(model: Any) -> int:
    """The largest number of elements a pimoe op of ``model`` (a ModelProto) indexes per token: E for the routing
    probabilities, k times the widest activation for the dispatched rows (0 without pimoe ops). The contract keeps
    every indexed count below INT32_LIMIT, so a graph runs at most ``(INT32_LIMIT - 1) // elements_per_token``
    tokens per call."""
    k, widest, experts = 1, 1, 1
    for node in model.graph.node:
        if node.domain != schema.DOMAIN:
            continue
        attrs = {a.name: _attribute_value(a) for a in node.attribute}
        if node.op_type == schema.ROUTE and isinstance(attrs.get("k"), int):
            k = max(k, attrs["k"])
        elif node.op_type == schema.DISPATCH and isinstance(attrs.get("num_experts"), int):
            experts = max(experts, attrs["num_experts"])
        elif node.op_type == schema.EXPERT_MLP and attrs.get("widths"):
            widest = max(widest, *(int(w) for w in attrs["widths"]))
    return max(experts, k * widest) if any(n.domain == schema.DOMAIN for n in model.graph.node) else 0
