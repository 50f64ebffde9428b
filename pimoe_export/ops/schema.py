"""Op contract v2: THE definition of the four `pimoe` ops (names, inputs, outputs, attributes, limits).

v2 extends v1 (the MoE families of docs/op_contract.md): every attribute v2 added defaults to the v1 behaviour, so a
v1 node (opset ``pimoe`` 1) computes bit for bit what it computed under v1. ``AttrSpec.since`` / ``choice_since``
name the contract version that introduced an attribute or an allowed value; a node of a graph importing an older
``pimoe`` opset may not use them (:mod:`pimoe_export.ops.validation`).

Every implementation mirrors this module: the torch custom ops (:mod:`pimoe_export.ops.torch_ops`), the
ONNX translations (:mod:`pimoe_export.ops.onnx_translation`), the ONNX Runtime kernels and the TensorRT
plugins (through ``plugins/common/pimoe_contract.h``, generated from this file by
``python -m pimoe_export.ops.codegen`` and checked for drift by the test-suite).

This module imports nothing heavy (no torch, no onnx), so runtime-only installs can read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pimoe_export.interface import INT32_LIMIT, MAX_EXPERTS, MAX_LAYERS, MAX_TOP_K  # noqa: F401  (part of the contract)

DOMAIN = "pimoe"
OPSET_VERSION = 2
CONTRACT_VERSION = 2
#: TensorRT plugin version string and namespace the ONNX parser looks up for our nodes. It stays "1": the plugins
#: of contract v2 are a superset of v1's (every new field defaults to v1), so v1 and v2 graphs find the same creators;
#: the library's own contract version (pimoe_trt_contract_version) keeps a v1 library away from v2 graphs.
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""

#: the limits: MAX_EXPERTS, MAX_TOP_K, MAX_LAYERS, and INT32_LIMIT, which every element count an op indexes
#: (N*k*max(H, I), G*out*in) stays below; defined in pimoe_export.interface (also read by the model config)

ROUTE = "PiMoERoute"
DISPATCH = "PiMoEDispatch"
EXPERT_MLP = "PiMoEExpertMLP"
COMBINE = "PiMoECombine"

#: activations of any hidden layer (plain or gated)
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "tanh")
#: activations of gated (GLU) layers only: the clamped OpenAI SwiGLU of GPT-OSS (alpha, limit)
GLU_ONLY_ACTIVATIONS = ("swiglu_oai",)
ALL_ACTIVATIONS = ACTIVATIONS + GLU_ONLY_ACTIVATIONS  # index = C++ enum value
QUANT_MODES = ("none", "w8a8", "w8a8_dynamic")  # index = C++ enum value
SCORING = ("softmax", "softmax_topk", "sigmoid")  # index = C++ enum value
GROUP_SCORES = ("max", "sum_top2")  # index = C++ enum value
COMBINE_ORDERS = ("slot", "expert")  # index = C++ enum value
#: GPT-OSS's clamped SwiGLU constants (the defaults of the alpha and limit attributes)
SWIGLU_OAI_ALPHA = 1.702
SWIGLU_OAI_LIMIT = 7.0

FLOAT_TYPES = ("float32", "float16")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtypes: tuple[str, ...]
    shape: str  # symbolic, for documentation
    optional: bool = False
    variadic: bool = False
    doc: str = ""
    type_param: str | None = None  # inputs/outputs sharing a type parameter have the same dtype


@dataclass(frozen=True)
class AttrSpec:
    name: str
    kind: str  # "int", "ints", "float", "floats", "string"
    default: object = None  # None = required
    doc: str = ""
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False  # the value must be greater than ``minimum`` (eps > 0)
    flag: bool = False  # a boolean carried as an int: exactly 0 or 1
    since: int = 1  # the contract (= pimoe opset) version that introduced the attribute
    choice_since: tuple[int, ...] = ()  # per choice, the version that introduced it (empty: every choice since 1)

    def introduced(self, value: object) -> int:
        """The contract version a node needs to carry this attribute with ``value``."""
        if self.choice_since and value in self.choices:
            return max(self.since, self.choice_since[self.choices.index(value)])
        return self.since

    def accepts(self, value: object) -> str:
        """Empty when ``value`` (as read from an ONNX attribute) satisfies this spec, else the problem."""
        kind = self.kind
        values = list(value) if kind in ("ints", "floats") and isinstance(value, (list, tuple)) else [value]
        if kind in ("int", "ints") and not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return f"must be {'an integer' if kind == 'int' else 'a list of integers'}, got {value!r}"
        if kind in ("float", "floats") and not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in values):
            return f"must be {'a number' if kind == 'float' else 'a list of numbers'}, got {value!r}"
        if kind == "string" and not isinstance(value, str):
            return f"must be a string, got {value!r}"
        if self.choices and value not in self.choices:
            return f"must be one of {list(self.choices)}, got {value!r}"
        for v in values if kind != "string" else []:
            if kind.startswith("float") and not math.isfinite(v):
                return f"must be finite, got {v!r}"
            if self.minimum is not None and (v <= self.minimum if self.exclusive_minimum else v < self.minimum):
                return f"must be {'>' if self.exclusive_minimum else '>='} {self.minimum:g}, got {v!r}"
            if self.maximum is not None and v > self.maximum:
                return f"must be <= {self.maximum:g}, got {v!r}"
        return ""

    def range_text(self) -> str:
        """The allowed values, for documentation."""
        if self.flag:
            return "0 or 1"
        if self.choices:
            since = self.choice_since or (1,) * len(self.choices)
            return " \\| ".join(f'"{c}"' + (f" (v{v})" if v > self.since else "")
                                  for c, v in zip(self.choices, since, strict=True))
        def text(v: float) -> str:
            return str(int(v)) if float(v).is_integer() and self.kind in ("int", "ints") else f"{v:g}"

        lo = "" if self.minimum is None else f"{'>' if self.exclusive_minimum else '≥'} {text(self.minimum)}"
        hi = "" if self.maximum is None else f"≤ {text(self.maximum)}"
        bounds = ", ".join(b for b in (lo, hi) if b)
        return (f"each {bounds}" if self.kind in ("ints", "floats") and bounds else bounds) or "any"


@dataclass(frozen=True)
class OpSchema:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attributes: tuple[AttrSpec, ...] = ()
    doc: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def attribute(self, name: str) -> AttrSpec:
        for attr in self.attributes:
            if attr.name == name:
                return attr
        raise KeyError(f"{self.name} has no attribute {name!r}")


ROUTE_SCHEMA = OpSchema(
    ROUTE,
    inputs=(
        TensorSpec("logits", FLOAT_TYPES, "[N, E]", type_param="T", doc="router logits (temperature and gate applied)"),
        TensorSpec("selection_bias", ("float32",), "[E]", optional=True,
                   doc="added to the selection scores only (softmax: probs; softmax_topk: logits; sigmoid: sigma); "
                       "sigmoid without it ranks the logits"),
    ),
    outputs=(
        TensorSpec("weights", ("float32",), "[N, k]",
                   doc="combine weights (see scoring), renormalised if normalize, times routed_scaling_factor"),
        TensorSpec("ids", ("int32",), "[N, k]", doc="selected experts, best first; always in [0, E)"),
    ),
    attributes=(
        AttrSpec("k", "int", doc="experts per token", minimum=1, maximum=MAX_TOP_K),
        AttrSpec("normalize", "int", 0, doc="1: divide the k weights by (their sum + normalize_eps)", minimum=0,
                 maximum=1, flag=True),
        AttrSpec("scoring", "string", "softmax", choices=SCORING, choice_since=(1, 2, 2),
                 doc="softmax: top-k of softmax(logits) + bias, weights = probs; softmax_topk: top-k of logits + bias, "
                     "weights = softmax over the k logits; sigmoid: top-k of sigma(logits) + bias, weights = sigma"),
        AttrSpec("num_groups", "int", 1, since=2, minimum=1, maximum=MAX_EXPERTS,
                 doc="grouped selection: E/num_groups consecutive experts per group (1: no groups)"),
        AttrSpec("groups_kept", "int", 1, since=2, minimum=1, maximum=MAX_EXPERTS,
                 doc="groups whose experts may be selected (the best by group score; others score 0)"),
        AttrSpec("group_score", "string", "max", since=2, choices=GROUP_SCORES,
                 doc="a group's score: the max of its selection scores, or the sum of its best two"),
        AttrSpec("routed_scaling_factor", "float", 1.0, since=2, minimum=0.0, exclusive_minimum=True,
                 doc="multiplies the final weights"),
        AttrSpec("normalize_eps", "float", 0.0, since=2, minimum=0.0,
                 doc="added to the sum of the k weights before normalize divides by it"),
    ),
    doc="fp32 scores -> [groups] -> top-k, ties to the lower index, NaN ranked lowest -> weights",
)

DISPATCH_SCHEMA = OpSchema(
    DISPATCH,
    inputs=(
        TensorSpec("x", FLOAT_TYPES, "[N, H]", type_param="T"),
        TensorSpec("ids", ("int32",), "[N, k]"),
    ),
    outputs=(
        TensorSpec("x_sorted", FLOAT_TYPES, "[N*k, H]", type_param="T", doc="x_sorted[flat_to_sorted[t*k+j]] = x[t]"),
        TensorSpec("offsets", ("int32",), "[E+1]", doc="expert e owns rows offsets[e]:offsets[e+1]"),
        TensorSpec("flat_to_sorted", ("int32",), "[N*k]"),
    ),
    attributes=(AttrSpec("num_experts", "int", doc="E", minimum=1, maximum=MAX_EXPERTS),),
    doc="stable counting sort of the (token, slot) pairs by expert id (ties in flat order t*k+j)",
)

EXPERT_MLP_SCHEMA = OpSchema(
    EXPERT_MLP,
    inputs=(
        TensorSpec("x_sorted", FLOAT_TYPES, "[R, widths[0]]", type_param="T"),
        TensorSpec("offsets", ("int32",), "[E+1]"),
        TensorSpec(
            "params", ("float32", "float16", "int8"), "per layer", variadic=True, type_param="P",
            doc="per layer l, rows_l = 2*out_l for a gated hidden layer (rows [gate; up]), else out_l: W_l [G, rows_l, "
                "in_l] (x_sorted's dtype, or int8 in w8a8 modes); w8a8 modes: w_scale_l [G, rows_l] and act_smooth_l "
                "[G, in_l]; with bias: b_l [G, rows_l]; hidden layers with layer_norm: ln_gamma_l, ln_beta_l "
                "[G, out_l]. Everything but W_l is float32.",
        ),
    ),
    outputs=(TensorSpec("y_sorted", FLOAT_TYPES, "[R, widths[-1]]", type_param="T",
                        doc="rows of other experts are 0"),),
    attributes=(
        AttrSpec("expert_ids", "ints", doc="the G experts of this group (distinct, in [0, E))", minimum=0,
                 maximum=MAX_EXPERTS - 1),
        AttrSpec("widths", "ints", doc="layer widths, input first (len = layers + 1, at most MAX_LAYERS + 1)",
                 minimum=1, maximum=INT32_LIMIT - 1),
        AttrSpec("activation", "string", "gelu", choices=ALL_ACTIVATIONS, choice_since=(1, 1, 1, 1, 1, 2),
                 doc="hidden activation (of the gate half when gated; swiglu_oai: gated only)"),
        AttrSpec("layer_norm", "int", 1, doc="1: LayerNorm after every hidden Linear", minimum=0, maximum=1,
                 flag=True),
        AttrSpec("eps", "float", 1e-5, doc="LayerNorm epsilon", minimum=0.0, exclusive_minimum=True),
        AttrSpec("quant_mode", "string", "none", doc="weight/activation quantisation", choices=QUANT_MODES),
        AttrSpec("act_scales", "floats", [],
                 doc="w8a8: static input scale per (layer, expert): [L * G], layer-major", minimum=0.0,
                 exclusive_minimum=True),
        AttrSpec("gated", "int", 0, since=2, minimum=0, maximum=1, flag=True,
                 doc="1: every hidden layer is a GLU: h = act(gate) * up over its rows [gate; up] (no LayerNorm)"),
        AttrSpec("bias", "int", 1, since=2, minimum=0, maximum=1, flag=True,
                 doc="0: the layers have no bias (no b_l inputs)"),
        AttrSpec("alpha", "float", SWIGLU_OAI_ALPHA, since=2,
                 doc="swiglu_oai: h = (clamp(up, -limit, limit) + 1) * g * sigma(alpha * g), g = min(gate, limit)"),
        AttrSpec("limit", "float", SWIGLU_OAI_LIMIT, since=2, minimum=0.0, exclusive_minimum=True,
                 doc="swiglu_oai: the clamp bound"),
    ),
    doc="one group of structurally identical experts over their contiguous row segments",
)

COMBINE_SCHEMA = OpSchema(
    COMBINE,
    inputs=(
        TensorSpec("y_sorted", FLOAT_TYPES, "[N*k, H]", type_param="T"),
        TensorSpec("flat_to_sorted", ("int32",), "[N*k]"),
        TensorSpec("weights", ("float32",), "[N, k]"),
    ),
    outputs=(TensorSpec("y", FLOAT_TYPES, "[N, H]", type_param="T"),),
    attributes=(
        AttrSpec("order", "string", "slot", since=2, choices=COMBINE_ORDERS,
                 doc="slot: acc = w_0*y_0, then + w_j*y_j in slot order; expert: acc = 0, then + w_j*y_j by ascending "
                     "expert id (= ascending flat_to_sorted row; Hugging Face's index_add_ order)"),
    ),
    doc="y[t] = sum_j weights[t,j] * y_sorted[flat_to_sorted[t*k+j]], fp32, fixed order, no atomics",
)

SCHEMAS: dict[str, OpSchema] = {s.name: s for s in (ROUTE_SCHEMA, DISPATCH_SCHEMA, EXPERT_MLP_SCHEMA, COMBINE_SCHEMA)}


def expert_mlp_param_layout(num_layers: int, layer_norm: bool, quant_mode: str, *, bias: bool = True
                            ) -> list[tuple[int, str]]:
    """Order of the variadic ``params`` of `PiMoEExpertMLP`: a list of (layer, role).

    Roles: "weight", "w_scale" and "act_smooth" (w8a8 modes), "bias" (unless ``bias`` is off), "ln_gamma", "ln_beta"
    (hidden layers with layer_norm). act_smooth divides the layer input per channel before quantisation
    (SmoothQuant); the int8 weights carry the matching per-column multiplication. Gated layers have the same roles
    (their weight, w_scale and bias cover the 2*out rows [gate; up]: :func:`expert_mlp_param_rows`).
    """
    if quant_mode not in QUANT_MODES:
        raise ValueError(f"quant_mode must be one of {QUANT_MODES}, got {quant_mode!r}")
    layout: list[tuple[int, str]] = []
    for layer in range(num_layers):
        layout.append((layer, "weight"))
        if quant_mode != "none":
            layout.append((layer, "w_scale"))
            layout.append((layer, "act_smooth"))
        if bias:
            layout.append((layer, "bias"))
        if layer_norm and layer < num_layers - 1:
            layout.append((layer, "ln_gamma"))
            layout.append((layer, "ln_beta"))
    return layout


def expert_mlp_param_rows(widths: list[int] | tuple[int, ...], layer: int, gated: bool) -> int:
    """Rows of layer ``layer``'s weight (and of its w_scale and bias): 2*out for a gated hidden layer, else out."""
    out = int(widths[layer + 1])
    return 2 * out if gated and layer < len(widths) - 2 else out
