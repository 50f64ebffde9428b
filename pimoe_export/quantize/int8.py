"""W8A8 quantisation of the expert groups: parameters, the INT8 ONNX, and the fake-quant PyTorch module.

One :class:`QuantParams` object feeds both the INT8 ONNX (``write_int8_onnx``) and the fake-quant reference
(:class:`FakeQuantPiMoE`), and can be read back from an INT8 ONNX (``read_quant_params``), so a parity check
always compares the kernels with the very codes and scales they run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from pimoe_export.errors import PiMoEExportError
from pimoe_export.export.modules import CustomOpBlock, CustomOpPiMoE
from pimoe_export.interface import META_PRECISION, META_QUANT, read_onnx
from pimoe_export.model.moe_block import MoEBlock
from pimoe_export.model.system import PiMoESystem
from pimoe_export.ops import schema
from pimoe_export.quantize.calibrate import CalibrationStats, threshold

QUANT_MODES = ("w8a8", "w8a8_dynamic")


@dataclass
class LayerQuant:
    weight: np.ndarray  # int8 [G, out, in]; codes of W * act_smooth (per column)
    w_scale: np.ndarray  # float32 [G, out]
    act_smooth: np.ndarray  # float32 [G, in]; the layer input is divided by it before quantisation (1: none)


@dataclass
class GroupQuant:
    expert_ids: list[int]
    layers: list[LayerQuant]
    act_scales: list[float]  # w8a8: [layers * G], layer-major; w8a8_dynamic: []


@dataclass
class QuantParams:
    mode: str
    method: str
    groups: list[GroupQuant]
    info: dict[str, Any] = field(default_factory=dict)


def quantize_weight(weight: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: scale = max|W[o, :]| / 127 (1 for an all-zero row)."""
    w = np.asarray(weight.detach().float().numpy() if isinstance(weight, torch.Tensor) else weight, np.float32)
    amax = np.abs(w).max(axis=-1)
    scale = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.round(w / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale


@dataclass
class _Group:
    """One PiMoEExpertMLP node's experts as quantisation sees them: the node's expert ids, the calibration key of
    each (a MoE block's shared expert: E), and each layer's stacked fp32 weight [G, rows, in]."""

    expert_ids: list[int]
    keys: list[int]
    weights: list[Any]  # per layer: () -> torch.Tensor


def _groups_of(model: PiMoESystem | MoEBlock) -> list[_Group]:
    """Every expert group of the layer in graph order (a MoE block: the routed groups, then the shared expert)."""
    if isinstance(model, MoEBlock):
        groups = [_Group(list(g.expert_ids), list(g.expert_ids), [lambda w=w: w.detach().float() for w in g.weights()])
                  for g in model.routed]
        if model.shared is not None:
            groups.append(_Group([0], [model.num_experts], [lambda w=w: w.detach().float()
                                                              for w in model.shared.weights()]))
        return groups
    return [_Group(list(ids), list(ids), [
        lambda layer=layer, ids=ids: torch.stack([model.experts[e].layers[layer].weight.detach().float() for e in ids])
        for layer in range(spec.num_layers)]) for spec, ids in model.config.expert_groups()]


def _act_scales(group: _Group, stats: CalibrationStats, method: str, percentile: float, uncalibrated: list[int],
                thresholds: dict[str, float]) -> list[float]:
    act_scales: list[float] = []
    for layer in range(len(group.weights)):
        found = {key: threshold(st, method, percentile) for key in group.keys
                 if (st := stats.get(key, layer)) is not None}
        # an expert that saw no calibration token takes its group's widest range for the layer
        fallback = max(found.values(), default=0.0)
        for key in group.keys:
            t = found.get(key, fallback)
            if key not in found and key not in uncalibrated:
                uncalibrated.append(key)
            thresholds[f"expert{key}_layer{layer}"] = t
            act_scales.append(float(np.float32(t / 127.0)) if t > 0 else 1.0)
    return act_scales


def compute_quant_params(
    model: PiMoESystem | MoEBlock, stats: CalibrationStats | None, method: str, mode: str = "w8a8",
    percentile: float = 99.99
) -> QuantParams:
    """Quantisation parameters of every expert group. Smoothing factors come from ``stats`` (collected with
    ``smooth_alpha``); an expert without statistics gets no smoothing."""
    if mode not in QUANT_MODES:
        raise PiMoEExportError(f"quantisation mode must be one of {QUANT_MODES}, got {mode!r}")
    if mode == "w8a8" and stats is None:
        raise PiMoEExportError("static w8a8 needs calibration statistics (or use mode w8a8_dynamic)")
    groups = []
    uncalibrated: list[int] = []
    thresholds: dict[str, float] = {}
    for group in _groups_of(model):
        layers = []
        for layer, weight in enumerate(group.weights):
            stacked = weight()
            smooth = np.ones((len(group.keys), stacked.shape[-1]), np.float32)
            for g, key in enumerate(group.keys):
                st = stats.get(key, layer) if stats is not None else None
                if st is not None and st.smooth is not None:
                    smooth[g] = st.smooth
            q, s = quantize_weight(stacked.numpy() * smooth[:, None, :])
            layers.append(LayerQuant(q, s, smooth))
        act_scales = _act_scales(group, stats, method, percentile, uncalibrated, thresholds) \
            if mode == "w8a8" and stats is not None else []
        groups.append(GroupQuant(group.expert_ids, layers, act_scales))
    info = {
        "mode": mode,
        "method": method if mode == "w8a8" else "dynamic-per-row",
        "percentile": percentile if method == "percentile" else None,
        "calibration_tokens": stats.tokens if stats is not None else 0,
        "uncalibrated_experts": sorted(uncalibrated),
        "thresholds": thresholds,
        "weights": "int8 symmetric per output channel",
        "smoothing": stats.smooth_alpha if stats is not None else None,
        "router": "fp32",
    }
    return QuantParams(mode, info["method"], groups, info)


# ------------------------------------------------------------------------------------------ ONNX
def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _groups_for(nodes: list[onnx.NodeProto], params: list[QuantParams], source: Any) -> list[GroupQuant]:
    """The quantisation parameters of each PiMoEExpertMLP node: one QuantParams per PiMoE layer, in the order the
    layers run (the order of their nodes in the graph), each node checked against its group."""
    groups = [g for p in params for g in p.groups]
    if len(nodes) != len(groups):
        raise PiMoEExportError(f"{source} has {len(nodes)} PiMoEExpertMLP nodes, the quantisation parameters "
                               f"cover {len(groups)} expert groups; quantise the ONNX exported from this model")
    for node, group in zip(nodes, groups, strict=True):
        attrs = _attrs(node)
        widths = [int(w) for w in attrs["widths"]]
        rows = [schema.expert_mlp_param_rows(widths, layer, bool(attrs.get("gated", 0)))
                for layer in range(len(widths) - 1)]
        if list(attrs["expert_ids"]) != group.expert_ids or [q.weight.shape[1] for q in group.layers] != rows:
            raise PiMoEExportError(f"{source}: PiMoEExpertMLP {node.name} (experts {list(attrs['expert_ids'])}, "
                                   f"widths {widths}) does not match the next layer's parameters; quantise the ONNX "
                                   "exported from this model")
    return groups


def write_int8_onnx(fp32_onnx: str | Path, params: QuantParams | list[QuantParams], out_path: str | Path,
                    info: dict[str, Any] | None = None) -> Path:
    """Rewrite the fp32 custom-op graph: every PiMoEExpertMLP gets int8 weights, per-channel scales and the
    activation scales; everything else (router included) stays as exported. ``params``: one QuantParams per PiMoE
    layer of the graph, in the order the layers run (one alone for a graph of one layer); ``info`` describes them
    all (default: the first layer's)."""
    from pimoe_export.export.exporter import save_validated, set_metadata

    proto = read_onnx(fp32_onnx, external_data=True)
    graph = proto.graph
    nodes = [n for n in graph.node if n.domain == schema.DOMAIN and n.op_type == schema.EXPERT_MLP]
    if any(_attrs(n).get("quant_mode", b"none") not in (b"none", "none") for n in nodes):
        raise PiMoEExportError(f"{fp32_onnx} is already quantised")
    params = params if isinstance(params, list) else [params]
    mode = params[0].mode
    new_inits = []
    for index, (node, group) in enumerate(zip(nodes, _groups_for(nodes, params, fp32_onnx), strict=True)):
        attrs = _attrs(node)
        n_layers = len(attrs["widths"]) - 1
        layer_norm, bias = bool(attrs.get("layer_norm", 1)), bool(attrs.get("bias", 1))  # bias: contract v2
        old = dict(zip(schema.expert_mlp_param_layout(n_layers, layer_norm, "none", bias=bias), node.input[2:],
                       strict=True))
        inputs = list(node.input[:2])
        prefix = f"expert_group{index}"
        for layer, role in schema.expert_mlp_param_layout(n_layers, layer_norm, mode, bias=bias):
            if role == "weight":
                name = f"{prefix}.weight_{layer}.int8"
                new_inits.append(numpy_helper.from_array(group.layers[layer].weight, name))
            elif role == "w_scale":
                name = f"{prefix}.w_scale_{layer}"
                new_inits.append(numpy_helper.from_array(group.layers[layer].w_scale.astype(np.float32), name))
            elif role == "act_smooth":
                name = f"{prefix}.act_smooth_{layer}"
                new_inits.append(numpy_helper.from_array(group.layers[layer].act_smooth.astype(np.float32), name))
            else:
                name = old[(layer, role)]
            inputs.append(name)
        del node.input[:]
        node.input.extend(inputs)
        kept = [a for a in node.attribute if a.name not in ("quant_mode", "act_scales")]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.append(helper.make_attribute("quant_mode", mode))
        if mode == "w8a8":
            node.attribute.append(helper.make_attribute("act_scales", [float(s) for s in group.act_scales]))
    graph.initializer.extend(new_inits)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    info = info if info is not None else params[0].info
    set_metadata(proto, {META_PRECISION: mode, META_QUANT: json.dumps(info, sort_keys=True)})
    out_path = Path(out_path)
    save_validated(proto, out_path)
    return out_path


def dynamic_params_from_onnx(fp32_onnx: str | Path) -> list[QuantParams]:
    """``w8a8_dynamic`` parameters of every PiMoEExpertMLP node of an fp32 custom-op graph, read from the graph's own
    weight initializers: int8 symmetric per output channel, no smoothing, activations quantised per row at run time
    (no calibration). For graphs whose PyTorch model is not a PiMoESystem (a decoder exported with its MoE blocks as
    pimoe ops); feed the result to :func:`write_int8_onnx`, one QuantParams per node in graph order."""
    proto = read_onnx(fp32_onnx, external_data=True)
    inits = {t.name: t for t in proto.graph.initializer}
    params = []
    for node in proto.graph.node:
        if node.domain != schema.DOMAIN or node.op_type != schema.EXPERT_MLP:
            continue
        attrs = _attrs(node)
        n_layers = len(attrs["widths"]) - 1
        named = dict(zip(schema.expert_mlp_param_layout(n_layers, bool(attrs.get("layer_norm", 1)), "none",
                                                        bias=bool(attrs.get("bias", 1))), node.input[2:], strict=True))
        layers = []
        for layer in range(n_layers):
            name = named[(layer, "weight")]
            if name not in inits:
                raise PiMoEExportError(f"{fp32_onnx}: PiMoEExpertMLP {node.name}'s weight {name!r} is computed in "
                                       "the graph, not an initializer; export with the weights as constants")
            weight = numpy_helper.to_array(inits[name]).astype(np.float32)
            q, scale = quantize_weight(weight)
            layers.append(LayerQuant(q, scale, np.ones((weight.shape[0], weight.shape[2]), np.float32)))
        info = {"mode": "w8a8_dynamic", "method": "dynamic-per-row", "weights": "int8 symmetric per output channel",
                "smoothing": None, "router": "fp32", "calibration_tokens": 0}
        params.append(QuantParams("w8a8_dynamic", "dynamic-per-row",
                                  [GroupQuant([int(e) for e in attrs["expert_ids"]], layers, [])], info))
    if not params:
        raise PiMoEExportError(f"{fp32_onnx} has no PiMoEExpertMLP node to quantise")
    return params


def read_quant_params(onnx_path: str | Path) -> QuantParams:
    """The quantisation parameters stored in an INT8 ONNX (codes, scales, activation scales)."""
    proto = read_onnx(onnx_path, external_data=True)
    inits = {t.name: t for t in proto.graph.initializer}
    meta = {p.key: p.value for p in proto.metadata_props}
    groups = []
    mode = meta.get(META_PRECISION, "")
    for node in proto.graph.node:
        if node.domain != schema.DOMAIN or node.op_type != schema.EXPERT_MLP:
            continue
        attrs = _attrs(node)
        mode = attrs["quant_mode"].decode() if isinstance(attrs["quant_mode"], bytes) else attrs["quant_mode"]
        n_layers = len(attrs["widths"]) - 1
        named = dict(zip(schema.expert_mlp_param_layout(n_layers, bool(attrs.get("layer_norm", 1)), mode,
                                                        bias=bool(attrs.get("bias", 1))), node.input[2:], strict=True))
        layers = [LayerQuant(numpy_helper.to_array(inits[named[(layer, "weight")]]),
                             numpy_helper.to_array(inits[named[(layer, "w_scale")]]),
                             numpy_helper.to_array(inits[named[(layer, "act_smooth")]])) for layer in range(n_layers)]
        groups.append(GroupQuant(list(attrs["expert_ids"]), layers, list(attrs.get("act_scales", []))))
    if mode not in QUANT_MODES:
        raise PiMoEExportError(f"{onnx_path} is not a W8A8 pimoe graph (quant_mode {mode!r})")
    info = json.loads(meta.get(META_QUANT, "{}"))
    return QuantParams(mode, info.get("method", ""), groups, info)


# ------------------------------------------------------------------------------------------ fake quant
class FakeQuantPiMoE(CustomOpPiMoE):
    """The PiMoE layer with W8A8 experts computed by the fake-quant reference (same codes and scales as the
    INT8 ONNX); router and everything else in fp32. Outputs like CustomOpPiMoE."""

    def __init__(self, model: PiMoESystem, params: QuantParams) -> None:
        super().__init__(model, "fp32")
        self.quant = params
        by_ids = {tuple(g.expert_ids): g for g in params.groups}
        self._qparams: list[tuple[list[torch.Tensor], str, list[float]]] = []
        for group in self.groups:
            gq = by_ids.get(tuple(group.expert_ids))
            if gq is None:
                raise PiMoEExportError(f"no quantisation parameters for expert group {group.expert_ids}")
            tensors = []
            layout = schema.expert_mlp_param_layout(group.spec.num_layers, group.spec.layer_norm, params.mode)
            for layer, role in layout:
                if role == "weight":
                    tensors.append(torch.from_numpy(gq.layers[layer].weight.copy()))
                elif role == "w_scale":
                    tensors.append(torch.from_numpy(gq.layers[layer].w_scale.astype(np.float32)))
                elif role == "act_smooth":
                    tensors.append(torch.from_numpy(gq.layers[layer].act_smooth.astype(np.float32)))
                else:
                    tensors.append(getattr(group, f"{role}_{layer}"))
            self._qparams.append((tensors, params.mode, list(gq.act_scales)))

    def group_params(self, index: int) -> tuple[list[torch.Tensor], str, list[float]]:
        return self._qparams[index]


class FakeQuantBlock(CustomOpBlock):
    """A MoE block with its W8A8 expert groups computed by the fake-quant reference (the INT8 ONNX's codes and
    scales); router, gates and everything else in fp32. Outputs like CustomOpBlock."""

    def __init__(self, block: MoEBlock, params: QuantParams) -> None:
        super().__init__(block, "fp32")
        groups = block.groups()
        if len(params.groups) != len(groups):
            raise PiMoEExportError(f"the quantisation parameters cover {len(params.groups)} expert groups, the block "
                                   f"has {len(groups)}")
        self._params = []
        for group, gq in zip(groups, params.groups, strict=True):
            biases = group.biases()
            tensors = []
            for layer, role in schema.expert_mlp_param_layout(group.num_layers, False, params.mode,
                                                             bias=group.spec.bias):
                quant = gq.layers[layer]
                if role == "weight":
                    tensors.append(torch.from_numpy(quant.weight.copy()))
                elif role in ("w_scale", "act_smooth"):
                    tensors.append(torch.from_numpy(getattr(quant, role).astype(np.float32)))
                else:
                    assert biases is not None
                    tensors.append(biases[layer].float())
            self._params.append((tensors, params.mode, list(gq.act_scales)))


def fake_quant_form(layer: PiMoESystem | MoEBlock, params: QuantParams) -> CustomOpPiMoE | CustomOpBlock:
    """The layer computed with W8A8 experts by the fake-quant reference (FakeQuantPiMoE or FakeQuantBlock)."""
    return FakeQuantBlock(layer, params) if isinstance(layer, MoEBlock) else FakeQuantPiMoE(layer, params)
