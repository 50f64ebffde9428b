"""`MoEBlock`: one generic MoE block in op-contract terms, described by a validated :class:`MoEBlockConfig`.

Every Hugging Face MoE family (pimoe_export.hf.families) and the gated presets (``mixtral-ffn``, ``qwen3-moe``)
are a config of this one module; the exporter, the quantiser and the checks know the block, never a family:

    x [.., H] ─► router Linear (fp32) ─► PiMoERoute (scoring, groups, scaling) ─┐
                                                                                 ├─► [x · weight: input scaling]
    x ───────────────────────────────────────────────────────────────────────► PiMoEDispatch
      ─► PiMoEExpertMLP per routed group (gated, bias or not) ─► PiMoECombine (order) ─► [+ output bias]
      ─► [+ shared group over every token, × sigmoid(shared gate · x)]  ─► y [.., H]

The routed experts are split into several groups (several PiMoEExpertMLP nodes) where one would index 2^31 weights
or more (the contract's int32 limit); a shared expert is a group of one expert over every token (offsets [0, N]).
The computation is written once (:func:`block_compute`) over an ``ops`` object with the signatures of
``torch.ops.pimoe``: eager execution uses :data:`REFERENCE_OPS` (pimoe_export.model.functional, the contract's
definition), the export passes the custom ops themselves, so the exported graph and this module compute the same.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pimoe_export.errors import PiMoEConfigError
from pimoe_export.interface import INT32_LIMIT, MAX_EXPERTS, MAX_TOP_K
from pimoe_export.model import functional

#: activations of an expert's hidden layer (swiglu_oai: gated layers only); the contract's, pimoe_export.ops.schema
GATED_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "tanh", "swiglu_oai")
SCORINGS = ("softmax", "softmax_topk", "sigmoid")
GROUP_SCORES = ("max", "sum_top2")
ORDERS = ("slot", "expert")
#: the largest block this package builds (parameters of one block)
MAX_BLOCK_PARAMETERS = 2**36
#: what the checkpoint's config.json records as the architecture, and MoEBlockConfig.to_dict as its kind
BLOCK_KIND = "moe-block"


def _check_int(owner: str, name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise PiMoEConfigError(f"{owner}.{name}" if owner else name, f"must be an int in {rng}, got {value!r}")
    return value


def _check_float(owner: str, name: str, value: Any, lo: float, *, open_low: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and \
        (value > lo if open_low else value >= lo)
    if not ok:
        raise PiMoEConfigError(f"{owner}.{name}" if owner else name,
                               f"must be a finite number {'>' if open_low else '>='} {lo}, got {value!r}")
    return float(value)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise PiMoEConfigError(name, f"must be one of {list(choices)}, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise PiMoEConfigError(name, f"must be true or false, got {value!r}")


@dataclass(frozen=True)
class ExpertsConfig:
    """The experts of one kind (routed or shared): H -> I -> H, the hidden layer a GLU over rows [gate; up] when
    ``gated`` (h = act(gate) * up), else act(W x + b); biases on every layer when ``bias``; ``alpha``/``limit``:
    the clamped OpenAI SwiGLU (``activation="swiglu_oai"``, gated only)."""

    intermediate_size: int
    activation: str = "silu"
    gated: bool = True
    bias: bool = False
    alpha: float = 1.702
    limit: float = 7.0

    def check(self, owner: str) -> None:
        _check_int(owner, "intermediate_size", self.intermediate_size, 1)
        _check_choice(f"{owner}.activation", self.activation, GATED_ACTIVATIONS)
        _check_bool(f"{owner}.gated", self.gated)
        _check_bool(f"{owner}.bias", self.bias)
        if self.activation == "swiglu_oai" and not self.gated:
            raise PiMoEConfigError(f"{owner}.activation", "swiglu_oai is the activation of gated experts only")
        _check_float(owner, "alpha", self.alpha, -math.inf)
        _check_float(owner, "limit", self.limit, 0.0, open_low=True)

    def widths(self, hidden: int) -> tuple[int, int, int]:
        return (hidden, self.intermediate_size, hidden)

    def rows(self, hidden: int, layer: int) -> int:
        """Weight rows of ``layer``: 2I for a gated hidden layer ([gate; up]), else the layer's output width."""
        out = self.widths(hidden)[layer + 1]
        return 2 * out if self.gated and layer == 0 else out

    def layer_shapes(self, hidden: int) -> list[tuple[int, int]]:
        """(rows, in) of each layer's weight."""
        widths = self.widths(hidden)
        return [(self.rows(hidden, layer), widths[layer]) for layer in range(2)]

    def params_per_expert(self, hidden: int) -> int:
        return sum(rows * cols + (rows if self.bias else 0) for rows, cols in self.layer_shapes(hidden))

    @classmethod
    def from_dict(cls, data: Any, owner: str) -> ExpertsConfig:
        if not isinstance(data, Mapping):
            raise PiMoEConfigError(owner, f"must be an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown or "intermediate_size" not in data:
            raise PiMoEConfigError(owner, f"unknown fields {unknown} or no intermediate_size; fields: {sorted(known)}")
        return cls(**dict(data))


@dataclass(frozen=True)
class MoEBlockConfig:
    """Validated description of one :class:`MoEBlock` (see the module docstring and docs/op_contract.md).

    Routing: ``scoring``, ``top_k``, ``normalize`` (+ ``normalize_eps``), grouped selection (``num_groups``,
    ``groups_kept``, ``group_score``), ``routed_scaling_factor``; ``router_bias``: the router Linear has a bias;
    ``correction_bias``: a learned [E] selection bias (DeepSeek-V3's e_score_correction_bias), passed to
    PiMoERoute; without it the route has no bias input (sigmoid scoring then ranks the logits).
    ``input_scaling``: the route weights scale each expert's input and the combine weights are 1 (Llama 4).
    ``order``: the combine's summation order. ``shared``: one shared expert over every token, times
    sigmoid(Linear(H, 1)) when ``shared_gate``. ``output_bias``: an [H] bias after the combine.
    ``max_group_weights``: split the routed experts into groups whose every weight tensor holds fewer elements.
    ``family``: where the block came from (a description); ``metadata``: deployment settings as for PiMoEConfig.
    """

    hidden_size: int
    num_experts: int
    top_k: int
    experts: ExpertsConfig
    scoring: str = "softmax"
    normalize: bool = False
    normalize_eps: float = 0.0
    num_groups: int = 1
    groups_kept: int = 1
    group_score: str = "max"
    routed_scaling_factor: float = 1.0
    router_bias: bool = False
    correction_bias: bool = False
    input_scaling: bool = False
    order: str = "expert"
    shared: ExpertsConfig | None = None
    shared_gate: bool = False
    output_bias: bool = False
    max_group_weights: int = INT32_LIMIT
    family: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        h = _check_int("", "hidden_size", self.hidden_size, 1)
        e = _check_int("", "num_experts", self.num_experts, 1, MAX_EXPERTS)
        k = _check_int("", "top_k", self.top_k, 1, min(e, MAX_TOP_K))
        if not isinstance(self.experts, ExpertsConfig):
            object.__setattr__(self, "experts", ExpertsConfig.from_dict(self.experts, "experts"))
        self.experts.check("experts")
        if self.shared is not None and not isinstance(self.shared, ExpertsConfig):
            object.__setattr__(self, "shared", ExpertsConfig.from_dict(self.shared, "shared"))
        if self.shared is not None:
            self.shared.check("shared")
        for name in ("normalize", "router_bias", "correction_bias", "input_scaling", "shared_gate", "output_bias"):
            _check_bool(name, getattr(self, name))
        _check_choice("scoring", self.scoring, SCORINGS)
        _check_choice("group_score", self.group_score, GROUP_SCORES)
        _check_choice("order", self.order, ORDERS)
        _check_float("", "normalize_eps", self.normalize_eps, 0.0)
        _check_float("", "routed_scaling_factor", self.routed_scaling_factor, 0.0, open_low=True)
        _check_int("", "max_group_weights", self.max_group_weights, 1, INT32_LIMIT)
        self._check_groups(e, k)
        if self.shared_gate and self.shared is None:
            raise PiMoEConfigError("shared_gate", "a shared gate needs a shared expert (shared)")
        if not isinstance(self.metadata, Mapping) or not isinstance(self.family, str):
            raise PiMoEConfigError("metadata", "metadata must be a mapping and family a string")
        object.__setattr__(self, "metadata", dict(self.metadata))
        self._check_sizes(h)

    def _check_groups(self, e: int, k: int) -> None:
        g = _check_int("", "num_groups", self.num_groups, 1, MAX_EXPERTS)
        kept = _check_int("", "groups_kept", self.groups_kept, 1, g)
        if e % g:
            raise PiMoEConfigError("num_groups", f"must divide num_experts={e}, got {g}")
        if g > 1 and self.scoring == "softmax_topk":
            raise PiMoEConfigError("num_groups", "grouped selection needs scoring softmax or sigmoid")
        if g > 1 and self.group_score == "sum_top2" and e // g < 2:
            raise PiMoEConfigError("group_score", f"sum_top2 needs groups of at least 2 experts, got {e // g}")
        if k > kept * (e // g):
            raise PiMoEConfigError("top_k", f"k={k} exceeds the experts of the kept groups ({kept} x {e // g}): "
                                            "outside the contract (Hugging Face would pick dropped experts)")

    def _check_sizes(self, h: int) -> None:
        """int32 limits of one expert's weights, and a bound on the block's size, before anything is allocated."""
        for name, spec in (("experts", self.experts), ("shared", self.shared)):
            if spec is None:
                continue
            largest = max(rows * cols for rows, cols in spec.layer_shapes(h))
            if largest >= self.max_group_weights:
                limit = ("the op contract's int32 indexing" if self.max_group_weights == INT32_LIMIT
                         else "max_group_weights")
                raise PiMoEConfigError(f"{name}.intermediate_size", f"one expert's weight holds {largest:,} "
                                       f"elements, not below {limit} ({self.max_group_weights:,})")
        if self.num_parameters() > MAX_BLOCK_PARAMETERS:
            raise PiMoEConfigError("hidden_size", f"the block would hold {self.num_parameters():,} parameters, "
                                                  f"more than the {MAX_BLOCK_PARAMETERS:,} this package builds")

    # ------------------------------------------------------------------ structure
    @property
    def widths(self) -> tuple[int, int, int]:
        return self.experts.widths(self.hidden_size)

    def routed_groups(self) -> list[list[int]]:
        """The routed experts' PiMoEExpertMLP groups: consecutive ids, as few groups as the int32 limit allows
        (each weight tensor [G, rows, in] below ``max_group_weights`` elements), of near-equal size."""
        largest = max(rows * cols for rows, cols in self.experts.layer_shapes(self.hidden_size))
        per_group = max(1, (self.max_group_weights - 1) // largest)
        count = -(-self.num_experts // per_group)
        bounds = [round(i * self.num_experts / count) for i in range(count + 1)]
        return [list(range(lo, hi)) for lo, hi in itertools.pairwise(bounds)]

    def num_parameters(self) -> int:
        h, e = self.hidden_size, self.num_experts
        n = h * e + (e if self.router_bias else 0) + (e if self.correction_bias else 0)
        n += e * self.experts.params_per_expert(h)
        if self.shared is not None:
            n += self.shared.params_per_expert(h) + (h if self.shared_gate else 0)
        return n + (h if self.output_bias else 0)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        out = {"kind": BLOCK_KIND, **dataclasses.asdict(self)}
        out["metadata"] = dict(self.metadata)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MoEBlockConfig:
        if not isinstance(data, Mapping) or data.get("kind", BLOCK_KIND) != BLOCK_KIND:
            raise PiMoEConfigError("<root>", f"expected a MoE block config (kind {BLOCK_KIND!r}), got {data!r:.120}")
        fields = dict(data)
        fields.pop("kind", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        missing = sorted({"hidden_size", "num_experts", "top_k", "experts"} - set(fields))
        if unknown or missing:
            raise PiMoEConfigError((unknown or missing)[0], f"unknown fields {unknown}, missing {missing}; known "
                                                            f"fields: {sorted(known)}")
        return cls(**fields)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> MoEBlockConfig:
        return dataclasses.replace(self, **changes)


def is_block_config(data: Any) -> bool:
    """Whether a layer config dict (a graph's or a checkpoint's) describes a MoE block."""
    return isinstance(data, Mapping) and data.get("kind") == BLOCK_KIND


# ------------------------------------------------------------------------------------------ the module
class ExpertGroup(nn.Module):
    """The stacked weights of the experts ``expert_ids`` (one PiMoEExpertMLP node): per layer ``weight_<l>``
    [G, rows, in] (rows [gate; up] for a gated hidden layer) and, with biases, ``bias_<l>`` [G, rows]."""

    def __init__(self, expert_ids: Sequence[int], hidden: int, spec: ExpertsConfig,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.expert_ids = list(expert_ids)
        self.spec = spec
        self.widths = list(spec.widths(hidden))
        g = len(self.expert_ids)
        for layer, (rows, cols) in enumerate(spec.layer_shapes(hidden)):
            self.register_parameter(f"weight_{layer}", nn.Parameter(torch.empty(g, rows, cols, device=device),
                                                                    requires_grad=False))
            if spec.bias:
                self.register_parameter(f"bias_{layer}", nn.Parameter(torch.empty(g, rows, device=device),
                                                                      requires_grad=False))

    @property
    def num_layers(self) -> int:
        return len(self.widths) - 1

    def weights(self) -> list[torch.Tensor]:
        return [getattr(self, f"weight_{layer}") for layer in range(self.num_layers)]

    def biases(self) -> list[torch.Tensor] | None:
        return [getattr(self, f"bias_{layer}") for layer in range(self.num_layers)] if self.spec.bias else None

    def params(self) -> list[torch.Tensor]:
        """The parameters in the contract's order (per layer: weight, then bias)."""
        out = []
        for layer in range(self.num_layers):
            out.append(getattr(self, f"weight_{layer}"))
            if self.spec.bias:
                out.append(getattr(self, f"bias_{layer}"))
        return out

    def reset(self, generator: torch.Generator | None = None) -> None:
        """nn.Linear's default initialisation, U(-1/sqrt(in), 1/sqrt(in)), for every weight and bias."""
        with torch.no_grad():
            for layer in range(self.num_layers):
                bound = 1.0 / math.sqrt(self.widths[layer])
                targets = [getattr(self, f"weight_{layer}")] + ([getattr(self, f"bias_{layer}")] if self.spec.bias
                                                                 else [])
                for t in targets:
                    t.copy_(torch.rand(t.shape, generator=generator) * (2 * bound) - bound)


class MoEBlock(nn.Module):
    """The generic MoE block (see the module docstring). ``forward(hidden_states [.., H]) -> [.., H]``.

    Parameters: ``router`` (Linear(H, E)), ``selection_bias`` [E] (with ``correction_bias``), ``routed[i]`` (the
    routed expert groups), ``shared`` (with a shared expert), ``shared_gate`` (Linear(H, 1), no bias),
    ``output_bias`` [H]. ``initialize=False`` leaves them uninitialised (an importer fills them)."""

    def __init__(self, config: MoEBlockConfig, *, initialize: bool = True,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config = config
        h, e = config.hidden_size, config.num_experts
        self.router = nn.Linear(h, e, bias=config.router_bias, device=device)
        if config.correction_bias:
            self.register_buffer("selection_bias", torch.zeros(e, device=device))
        else:
            self.selection_bias = None
        self.routed = nn.ModuleList(ExpertGroup(ids, h, config.experts, device) for ids in config.routed_groups())
        self.shared = ExpertGroup([0], h, config.shared, device) if config.shared is not None else None
        self.shared_gate = nn.Linear(h, 1, bias=False, device=device) if config.shared_gate else None
        self.output_bias = nn.Parameter(torch.zeros(h, device=device), requires_grad=False) \
            if config.output_bias else None
        self.track_stats = False  # a PiMoE layer's statistics switch, which calibration and checks set
        #: the host model unpacks (hidden, router_logits) from its MoE module (most Hugging Face families): forward
        #: then returns (y, None), and so does the exported layer that replaces the block
        self.returns_tuple = False
        for p in self.parameters():
            p.requires_grad_(False)
        if initialize:
            self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for group in self.groups():
            group.reset(generator)
        if self.output_bias is not None:
            nn.init.zeros_(self.output_bias)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def groups(self) -> list[ExpertGroup]:
        """Every expert group in the order the graph computes them: the routed groups, then the shared one."""
        return [*self.routed, *([self.shared] if self.shared is not None else [])]

    def group_of(self, expert: int) -> tuple[ExpertGroup, int]:
        """The routed group holding ``expert`` and the expert's index in it."""
        for group in self.routed:
            if group.expert_ids[0] <= expert <= group.expert_ids[-1]:
                return group, expert - group.expert_ids[0]
        raise IndexError(f"expert {expert} is not in [0, {self.num_experts})")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, None]:
        y, _, _ = block_compute(self, hidden_states, REFERENCE_OPS)
        return (y, None) if self.returns_tuple else y

    def routing(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [.., k] int32, weights [.., k] fp32) of every token, as the block routes them."""
        _, ids, weights = block_compute(self, hidden_states, REFERENCE_OPS)
        return ids, weights

    def expert_layer_inputs(self, x: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(expert key, layer, input rows) of every expert layer as inference computes them: routed experts are
        keys 0..E-1, the shared expert is key E (calibration statistics are kept per key)."""
        x2 = x.reshape(-1, self.hidden_size).float()
        weights, ids = route_tokens(self, x2, REFERENCE_OPS)
        routed_in, _ = _scaled_input(self, x2, weights)
        x_sorted, offsets, flat_to_sorted = functional.dispatch(routed_in, ids, self.num_experts)
        x_sorted = _scaled_rows(self, x_sorted, flat_to_sorted, weights)
        bounds = offsets.tolist()
        for group in self.routed:
            for g, e in enumerate(group.expert_ids):
                if bounds[e + 1] > bounds[e]:
                    yield from _layer_inputs(group, g, e, x_sorted[bounds[e]:bounds[e + 1]])
        if self.shared is not None and x2.shape[0]:
            yield from _layer_inputs(self.shared, 0, self.num_experts, x2)

    def save_pretrained(self, directory: Any) -> Any:
        from pimoe_export.model.io import save_pretrained

        return save_pretrained(self, directory)

    def layer_weight(self, key: int, layer: int) -> torch.Tensor:
        """The weight [rows, in] of ``layer`` of the expert with calibration key ``key`` (E: the shared one)."""
        if key == self.num_experts and self.shared is not None:
            return getattr(self.shared, f"weight_{layer}")[0]
        group, index = self.group_of(key)
        return getattr(group, f"weight_{layer}")[index]


def _layer_inputs(group: ExpertGroup, g: int, key: int, rows: torch.Tensor
                  ) -> Iterator[tuple[int, int, torch.Tensor]]:
    h = rows.float()
    spec = group.spec
    for layer in range(group.num_layers):
        yield key, layer, h
        if layer < group.num_layers - 1:
            bias = getattr(group, f"bias_{layer}")[g] if spec.bias else None
            h = F.linear(h, getattr(group, f"weight_{layer}")[g].float(), bias)
            h = functional.glu(h, spec.activation, spec.alpha, spec.limit) if spec.gated else \
                functional.activation_fn(spec.activation, h)


# ------------------------------------------------------------------------------------------ the computation
class _ReferenceOps:
    """``torch.ops.pimoe``'s signatures over pimoe_export.model.functional (the contract's definition)."""

    route = staticmethod(functional.route)
    dispatch = staticmethod(functional.dispatch)

    @staticmethod
    def expert_mlp(x_sorted: torch.Tensor, offsets: torch.Tensor, params: list[torch.Tensor], expert_ids: list[int],
                   widths: list[int], activation: str, layer_norm: bool, eps: float, quant_mode: str,
                   act_scales: list[float], gated: bool = False, bias: bool = True, alpha: float = 1.702,
                   limit: float = 7.0) -> torch.Tensor:
        per_layer = 2 if bias else 1
        weights = params[::per_layer]
        biases = params[1::per_layer] if bias else None
        if quant_mode != "none" or layer_norm:
            raise ValueError("the reference ops of a MoE block run float experts without LayerNorm")
        return functional.expert_mlp(x_sorted, offsets, expert_ids, weights, biases, None, None, activation, eps,
                                     gated=gated, alpha=alpha, limit=limit)

    @staticmethod
    def combine(y_sorted: torch.Tensor, flat_to_sorted: torch.Tensor, weights: torch.Tensor,
                order: str = "slot") -> torch.Tensor:
        return functional.combine(y_sorted, flat_to_sorted, weights, order)


REFERENCE_OPS = _ReferenceOps()


def route_tokens(block: MoEBlock, x: torch.Tensor, ops: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [N, k] fp32, ids [N, k] int32) of the tokens x [N, H]: the router Linear in fp32, then PiMoERoute."""
    cfg = block.config
    router = block.router
    logits = F.linear(x.float(), router.weight.float(), None if router.bias is None else router.bias.float())
    bias = None if block.selection_bias is None else block.selection_bias.float()
    return ops.route(logits, bias, cfg.top_k, cfg.normalize, cfg.scoring, cfg.num_groups, cfg.groups_kept,
                     cfg.group_score, cfg.routed_scaling_factor, cfg.normalize_eps)


def _scaled_input(block: MoEBlock, x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Input scaling (Llama 4): with k = 1 the token's one route weight scales its row before Dispatch; the
    combine weights become 1. Without input scaling: x and the route weights unchanged."""
    if not block.config.input_scaling:
        return x, weights
    ones = torch.ones_like(weights)
    if block.config.top_k == 1:
        return (x.float() * weights).to(x.dtype), ones
    return x, ones


def _scaled_rows(block: MoEBlock, x_sorted: torch.Tensor, flat_to_sorted: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
    """Input scaling with k > 1: each dispatched row times its own slot's weight (scattered into sorted order)."""
    if not block.config.input_scaling or block.config.top_k == 1:
        return x_sorted
    scale = torch.zeros(x_sorted.shape[0], dtype=torch.float32, device=x_sorted.device)
    scale = scale.scatter(0, flat_to_sorted.long(), weights.reshape(-1))
    return (x_sorted.float() * scale.unsqueeze(1)).to(x_sorted.dtype)


def _everyone(x: torch.Tensor) -> torch.Tensor:
    """offsets [0, N] of a group of one expert over all N rows of x."""
    count = torch.ones_like(x[:, 0], dtype=torch.int32).sum().to(torch.int32).reshape(1)
    return torch.cat([torch.zeros_like(count), count])


def _run_group(group: ExpertGroup, x_sorted: torch.Tensor, offsets: torch.Tensor, ops: Any,
               params: tuple[list[torch.Tensor], str, list[float]] | None) -> torch.Tensor:
    spec = group.spec
    tensors, quant_mode, act_scales = params if params is not None else (group.params(), "none", [])
    return ops.expert_mlp(x_sorted, offsets, tensors, group.expert_ids, group.widths, spec.activation, False, 1e-5,
                          quant_mode, act_scales, gated=spec.gated, bias=spec.bias, alpha=spec.alpha,
                          limit=spec.limit)


def block_compute(block: MoEBlock, hidden_states: torch.Tensor, ops: Any,
                  group_params: Sequence[tuple[list[torch.Tensor], str, list[float]]] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block on hidden_states [.., H] with ``ops`` (REFERENCE_OPS or torch.ops.pimoe): (y [.., H] in the input's
    dtype, ids [.., k] int32, route weights [.., k] fp32). ``group_params``: (params, quant_mode, act_scales) of
    every group of :meth:`MoEBlock.groups` in place of the block's own float weights (INT8)."""
    cfg = block.config
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, cfg.hidden_size)
    weights, ids = route_tokens(block, x, ops)
    routed_in, combine_weights = _scaled_input(block, x, weights)
    x_sorted, offsets, flat_to_sorted = ops.dispatch(routed_in, ids, cfg.num_experts)
    x_sorted = _scaled_rows(block, x_sorted, flat_to_sorted, weights)
    groups = block.groups()
    params = list(group_params) if group_params is not None else [None] * len(groups)
    y_sorted = None
    for group, given in zip(block.routed, params, strict=False):
        part = _run_group(group, x_sorted, offsets, ops, given)
        y_sorted = part if y_sorted is None else y_sorted + part
    y = ops.combine(y_sorted, flat_to_sorted, combine_weights, cfg.order)
    if block.output_bias is not None:
        y = (y.float() + block.output_bias.float()).to(y.dtype)
    if block.shared is not None:
        shared = _run_group(block.shared, x, _everyone(x), ops, params[len(block.routed)])
        if block.shared_gate is not None:
            gate = torch.sigmoid(F.linear(x.float(), block.shared_gate.weight.float()))
            shared = (gate * shared.float()).to(shared.dtype)
        y = y + shared
    k = cfg.top_k
    return y.reshape(shape), ids.reshape(*shape[:-1], k), weights.reshape(*shape[:-1], k)


def build_block(config: MoEBlockConfig, seed: int = 0) -> MoEBlock:
    """A freshly initialised block in eval mode; the same seed gives the same weights on every machine."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        block = MoEBlock(config, initialize=False)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(config.hidden_size)
            block.router.weight.copy_(torch.rand(block.router.weight.shape, generator=generator) * 2 * bound - bound)
            if block.router.bias is not None:
                block.router.bias.zero_()
            if block.shared_gate is not None:
                block.shared_gate.weight.copy_(torch.rand(block.shared_gate.weight.shape, generator=generator) *
                                               2 * bound - bound)
        block.reset_parameters(generator)
    return block.eval()
