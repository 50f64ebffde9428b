"""Op contract v1: THE definition of the four `pimoe` ops (names, inputs, outputs, attributes, limits).

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
OPSET_VERSION = 1
CONTRACT_VERSION = 1
#: TensorRT plugin version string and namespace the ONNX parser looks up for our nodes.
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""

#: the limits: MAX_EXPERTS, MAX_TOP_K, MAX_LAYERS, and INT32_LIMIT, which every element count an op indexes
#: (N*k*max(H, I), G*out*in) stays below; defined in pimoe_export.interface (also read by the model config)

ROUTE = "PiMoERoute"
DISPATCH = "PiMoEDispatch"
EXPERT_MLP = "PiMoEExpertMLP"
COMBINE = "PiMoECombine"

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "tanh")  # index = C++ enum value
QUANT_MODES = ("none", "w8a8", "w8a8_dynamic")  # index = C++ enum value
SCORING = ("softmax",)

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
            return " \\| ".join(f'"{c}"' for c in self.choices)
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
                   doc="added to the probabilities for selection only"),
    ),
    outputs=(
        TensorSpec("weights", ("float32",), "[N, k]", doc="combine weights = probs[ids], renormalised if normalize"),
        TensorSpec("ids", ("int32",), "[N, k]", doc="selected experts, best first; always in [0, E)"),
    ),
    attributes=(
        AttrSpec("k", "int", doc="experts per token", minimum=1, maximum=MAX_TOP_K),
        AttrSpec("normalize", "int", 0, doc="1: divide the k weights by their sum", minimum=0, maximum=1, flag=True),
        AttrSpec("scoring", "string", "softmax", doc="probability function", choices=SCORING),
    ),
    doc="softmax(logits) in fp32 -> top-k of (probs + bias), ties to the lower index, NaN ranked lowest",
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
            doc="per layer l: W_l [G, out_l, in_l] (x_sorted's dtype, or int8 in w8a8 modes); w8a8 modes: "
                "w_scale_l [G, out_l] and act_smooth_l [G, in_l]; b_l [G, out_l]; hidden layers with layer_norm: "
                "ln_gamma_l, ln_beta_l [G, out_l]. Everything but W_l is float32.",
        ),
    ),
    outputs=(TensorSpec("y_sorted", FLOAT_TYPES, "[R, widths[-1]]", type_param="T",
                        doc="rows of other experts are 0"),),
    attributes=(
        AttrSpec("expert_ids", "ints", doc="the G experts of this group (distinct, in [0, E))", minimum=0,
                 maximum=MAX_EXPERTS - 1),
        AttrSpec("widths", "ints", doc="layer widths, input first (len = layers + 1, at most MAX_LAYERS + 1)",
                 minimum=1, maximum=INT32_LIMIT - 1),
        AttrSpec("activation", "string", "gelu", doc="hidden activation", choices=ACTIVATIONS),
        AttrSpec("layer_norm", "int", 1, doc="1: LayerNorm after every hidden Linear", minimum=0, maximum=1,
                 flag=True),
        AttrSpec("eps", "float", 1e-5, doc="LayerNorm epsilon", minimum=0.0, exclusive_minimum=True),
        AttrSpec("quant_mode", "string", "none", doc="weight/activation quantisation", choices=QUANT_MODES),
        AttrSpec("act_scales", "floats", [],
                 doc="w8a8: static input scale per (layer, expert): [L * G], layer-major", minimum=0.0,
                 exclusive_minimum=True),
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
    doc="y[t] = sum_j weights[t,j] * y_sorted[flat_to_sorted[t*k+j]], fp32, slot order, no atomics",
)

SCHEMAS: dict[str, OpSchema] = {s.name: s for s in (ROUTE_SCHEMA, DISPATCH_SCHEMA, EXPERT_MLP_SCHEMA, COMBINE_SCHEMA)}


def expert_mlp_param_layout(num_layers: int, layer_norm: bool, quant_mode: str) -> list[tuple[int, str]]:
    """Order of the variadic ``params`` of `PiMoEExpertMLP`: a list of (layer, role).

    Roles: "weight", "w_scale" and "act_smooth" (w8a8 modes), "bias", "ln_gamma", "ln_beta" (hidden layers with
    layer_norm). act_smooth divides the layer input per channel before quantisation (SmoothQuant); the int8
    weights carry the matching per-column multiplication.
    """
    if quant_mode not in QUANT_MODES:
        raise ValueError(f"quant_mode must be one of {QUANT_MODES}, got {quant_mode!r}")
    layout: list[tuple[int, str]] = []
    for layer in range(num_layers):
        layout.append((layer, "weight"))
        if quant_mode != "none":
            layout.append((layer, "w_scale"))
            layout.append((layer, "act_smooth"))
        layout.append((layer, "bias"))
        if layer_norm and layer < num_layers - 1:
            layout.append((layer, "ln_gamma"))
            layout.append((layer, "ln_beta"))
    return layout
