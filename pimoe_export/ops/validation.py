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


def attribute_problems(op: str, attrs: dict[str, Any], version: int = schema.OPSET_VERSION) -> list[str]:
    """Contract violations of one node's attributes (unknown, missing required, wrong kind or out of range, newer
    than the ``pimoe`` opset ``version`` the graph imports, inconsistent with each other)."""
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
        elif attr.introduced(attrs[name]) > version:
            what = name if attr.since > version else f"{name}={attrs[name]!r}"
            problems.append(f"attribute {what} needs pimoe opset {attr.introduced(attrs[name])} (op contract "
                            f"v{attr.introduced(attrs[name])}) but the graph imports opset {version}")
    if problems:
        return problems
    if op == schema.EXPERT_MLP:
        problems += _expert_mlp_problems(attrs)
    if op == schema.ROUTE:
        problems += _route_problems(attrs)
    return problems


def _value(op: str, attrs: dict[str, Any], name: str) -> Any:
    return attrs.get(name, schema.SCHEMAS[op].attribute(name).default)


def _route_problems(attrs: dict[str, Any], num_experts: int | None = None) -> list[str]:
    """Route attributes against each other (and against E where the graph's Dispatch gives it)."""
    groups, kept = _value(schema.ROUTE, attrs, "num_groups"), _value(schema.ROUTE, attrs, "groups_kept")
    problems = []
    if kept > groups:
        problems.append(f"groups_kept={kept} exceeds num_groups={groups}")
    if groups > 1 and _value(schema.ROUTE, attrs, "scoring") == "softmax_topk":
        problems.append("grouped selection (num_groups > 1) needs scoring softmax or sigmoid, not softmax_topk")
    if num_experts is not None and not problems:
        if num_experts % groups:
            problems.append(f"num_groups={groups} does not divide the number of experts E={num_experts}")
        elif groups > 1 and _value(schema.ROUTE, attrs, "group_score") == "sum_top2" and num_experts // groups < 2:
            problems.append(f"group_score sum_top2 needs at least 2 experts per group, got E/num_groups="
                            f"{num_experts // groups}")
        elif attrs["k"] > kept * (num_experts // groups):
            problems.append(f"k={attrs['k']} exceeds the experts of the kept groups, groups_kept * E/num_groups = "
                            f"{kept * (num_experts // groups)}")
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
    gated = _value(schema.EXPERT_MLP, attrs, "gated") == 1
    if gated and _value(schema.EXPERT_MLP, attrs, "layer_norm") == 1:
        problems.append("gated layers have no LayerNorm: set layer_norm=0")
    if gated and len(widths) < 3:
        problems.append("gated needs at least one hidden layer (widths with 3 or more entries)")
    activation = _value(schema.EXPERT_MLP, attrs, "activation")
    if activation in schema.GLU_ONLY_ACTIVATIONS and not gated:
        problems.append(f"activation {activation} is for gated layers only: set gated=1")
    return problems


def pimoe_opset(proto: Any) -> int | None:
    """The ``pimoe`` opset version a model imports (None: it imports none)."""
    for opset in proto.opset_import:
        if opset.domain == schema.DOMAIN:
            return int(opset.version)
    return None


def check_graph(model: str | Path | Any, name: str | None = None) -> None:
    """Raise ArtifactError when a node of ``model`` (a path or a ModelProto) breaks the op contract: one of our op
    names in another domain, an op of our domain the contract does not define, a ``pimoe`` opset newer than this
    package's, an attribute out of range or newer than the graph's opset, inconsistent route attributes (also against
    the dispatch's num_experts), a route whose k exceeds the dispatch's num_experts. ``name``: the model's name in
    the message (default: its path, or "the model")."""
    from pimoe_export.interface import read_onnx

    source = name or (str(model) if isinstance(model, (str, Path)) else "the model")
    proto = read_onnx(model) if isinstance(model, (str, Path)) else model
    problems: list[str] = []
    version = pimoe_opset(proto) or schema.OPSET_VERSION
    if version > schema.OPSET_VERSION:
        problems.append(f"it imports pimoe opset {version}, newer than this package's op contract "
                        f"v{schema.CONTRACT_VERSION}: upgrade pimoe-export")
    routes, experts = [], []
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
            found = attribute_problems(node.op_type, attrs, min(version, schema.OPSET_VERSION))
            problems += [f"{where}: {p}" for p in found]
            if node.op_type == schema.ROUTE and not found:
                routes.append((where, attrs))
            if node.op_type == schema.DISPATCH and isinstance(attrs.get("num_experts"), int):
                experts.append(attrs["num_experts"])
    if routes and experts:
        ks = [attrs["k"] for _, attrs in routes]
        if max(ks) > min(experts):
            problems.append(f"PiMoERoute k={max(ks)} exceeds PiMoEDispatch num_experts={min(experts)} (k <= E)")
        elif len(set(experts)) == 1:
            for where, attrs in routes:
                problems += [f"{where}: {p}" for p in _route_problems(attrs, experts[0])]
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
