"""`PiMoEConfig`: the one validated description of a PiMoE layer.

The config drives model construction, export, quantisation and the engine manifest; nothing downstream
re-derives sizes from tensors. Invalid values raise :class:`~pimoe_export.errors.PiMoEConfigError` naming
the field and the allowed range.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pimoe_export.errors import PiMoEConfigError
from pimoe_export.interface import INT32_LIMIT, MAX_EXPERTS, MAX_LAYERS, MAX_TOP_K

#: the largest model this package builds (parameters): a config asking for more is refused before any allocation
MAX_PARAMETERS = 2**33

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "tanh")
LOAD_BALANCE_LOSSES = ("mse", "switch")


class ExpertType(str, enum.Enum):
    """The seven expert specialisations of the seed; the value is the lower-case name."""

    REASONING = "reasoning"
    COMPUTATION = "computation"
    LANGUAGE = "language"
    MATHEMATICAL = "mathematical"
    LOGICAL = "logical"
    CREATIVE = "creative"
    ANALYTICAL = "analytical"


#: The seed's default type order for `create_pimoe_system`.
DEFAULT_EXPERT_TYPES: tuple[ExpertType, ...] = (
    ExpertType.REASONING,
    ExpertType.COMPUTATION,
    ExpertType.MATHEMATICAL,
    ExpertType.LOGICAL,
    ExpertType.LANGUAGE,
    ExpertType.CREATIVE,
    ExpertType.ANALYTICAL,
)


@dataclass(frozen=True)
class ExpertSpec:
    """Structure of one expert: layer widths (input first, output last) and the hidden activation.

    Every hidden layer is Linear -> [LayerNorm] -> activation -> Dropout; the last layer is a plain Linear.
    Two experts with equal specs are structurally identical and can share one grouped op.
    """

    widths: tuple[int, ...]
    activation: str
    layer_norm: bool

    @property
    def num_layers(self) -> int:
        return len(self.widths) - 1

    def num_params(self) -> int:
        n = 0
        for i in range(self.num_layers):
            n += self.widths[i] * self.widths[i + 1] + self.widths[i + 1]
            if self.layer_norm and i < self.num_layers - 1:
                n += 2 * self.widths[i + 1]
        return n

    def flops_per_token(self) -> int:
        """Multiply-adds counted as 2 FLOPs; LayerNorm/activation/bias are ignored (GEMM FLOPs only)."""
        return sum(2 * self.widths[i] * self.widths[i + 1] for i in range(self.num_layers))


def expert_widths(expert_type: ExpertType, hidden_size: int, intermediate_size: int) -> tuple[int, ...]:
    """Layer widths (input first) of each expert type's stack, as in the original PiMoE seed.

    REASONING: H -> I -> I/2 -> H; COMPUTATION: H -> 2I -> I -> H; every other type: H -> I -> H.
    """
    h, i = hidden_size, intermediate_size
    if expert_type is ExpertType.REASONING:
        return (h, i, i // 2, h)
    if expert_type is ExpertType.COMPUTATION:
        return (h, 2 * i, i, h)
    return (h, i, h)


def default_activation(expert_type: ExpertType) -> str:
    return {
        ExpertType.COMPUTATION: "relu",
        ExpertType.MATHEMATICAL: "silu",
        ExpertType.LOGICAL: "tanh",
    }.get(expert_type, "gelu")


def _as_expert_type(value: Any) -> ExpertType:
    if isinstance(value, ExpertType):
        return value
    try:
        return ExpertType(str(value).lower())
    except ValueError:
        allowed = ", ".join(t.value for t in ExpertType)
        raise PiMoEConfigError("expert_types", f"unknown expert type {value!r}; allowed: {allowed}") from None


@dataclass(frozen=True)
class PiMoEConfig:
    """Validated configuration of a PiMoE layer.

    ``None`` defaults are resolved at construction: ``intermediate_size`` -> 4 * hidden_size,
    ``router_hidden_size`` -> hidden_size // 2 (at least 1), ``normalize`` -> ``top_k > 1``
    (Switch-style y = p * E(x) for k = 1, renormalised weights for k > 1).

    ``capacity_factor`` applies in training only: each expert keeps at most
    ``ceil(capacity_factor * tokens * top_k / num_experts)`` assignments, in priority order slot 0 of every
    token first (token order), then slot 1, and so on; dropped assignments contribute zero and their weight
    is not redistributed. Inference is always dropless.

    Raises:
        PiMoEConfigError: a field is of the wrong type or outside its allowed range.
    """

    hidden_size: int
    num_experts: int = 8
    expert_types: tuple[ExpertType, ...] = DEFAULT_EXPERT_TYPES
    top_k: int = 1
    normalize: bool | None = None
    intermediate_size: int | None = None
    router_hidden_size: int | None = None
    temperature: float = 1.0
    use_gating: bool = True
    use_auxiliary_loss: bool = True
    load_balance_weight: float = 0.1
    load_balance_loss: str = "mse"
    z_loss_weight: float = 1e-3
    type_consistency_weight: float = 0.01
    capacity_factor: float | None = None
    router_dropout: float = 0.1
    dropout: float = 0.1
    activation: str | None = None
    layer_norm: bool = True
    layer_norm_eps: float = 1e-5
    expert_widths: tuple[tuple[int, ...], ...] | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = object.__setattr__

        def check_int(name: str, lo: int, hi: int | None = None) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise PiMoEConfigError(name, f"must be an int, got {type(value).__name__} {value!r}")
            if value < lo or (hi is not None and value > hi):
                rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
                raise PiMoEConfigError(name, f"must be in {rng}, got {value}")
            return value

        def check_float(name: str, lo: float, hi: float | None = None, lo_open: bool = False,
                        hi_open: bool = False) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PiMoEConfigError(name, f"must be a number, got {type(value).__name__} {value!r}")
            value = float(value)
            bad = (
                not math.isfinite(value)
                or (value <= lo if lo_open else value < lo)
                or (hi is not None and (value >= hi if hi_open else value > hi))
            )
            if bad:
                left = "(" if lo_open else "["
                right = (")" if hi_open else "]") if hi is not None else ")"
                rng = f"{left}{lo}, {hi if hi is not None else 'inf'}{right}"
                raise PiMoEConfigError(name, f"must be a finite number in {rng}, got {value}")
            return value

        def check_bool(name: str) -> None:
            if not isinstance(getattr(self, name), bool):
                raise PiMoEConfigError(name, f"must be True or False, got {getattr(self, name)!r}")

        h = check_int("hidden_size", 1)
        e = check_int("num_experts", 1, MAX_EXPERTS)
        types = self.expert_types
        if isinstance(types, (str, ExpertType)) or not isinstance(types, Iterable):
            raise PiMoEConfigError("expert_types", f"must be a non-empty sequence of ExpertType, got {types!r}")
        types = tuple(_as_expert_type(t) for t in types)
        if not types:
            raise PiMoEConfigError("expert_types", "must name at least one expert type")
        if len(set(types)) != len(types):
            raise PiMoEConfigError("expert_types", f"must not repeat a type, got {[t.value for t in types]}")
        set_(self, "expert_types", types)
        check_int("top_k", 1, min(e, MAX_TOP_K))
        if self.normalize is None:
            set_(self, "normalize", self.top_k > 1)
        check_bool("normalize")
        if self.intermediate_size is None:
            set_(self, "intermediate_size", 4 * h)
        i = check_int("intermediate_size", 2 if ExpertType.REASONING in types else 1)
        if self.router_hidden_size is None:
            set_(self, "router_hidden_size", max(1, h // 2))
        check_int("router_hidden_size", 1)
        check_float("temperature", 0.0, lo_open=True)
        for name in ("use_gating", "use_auxiliary_loss", "layer_norm"):
            check_bool(name)
        check_float("load_balance_weight", 0.0)
        if self.load_balance_loss not in LOAD_BALANCE_LOSSES:
            raise PiMoEConfigError("load_balance_loss",
                                   f"must be one of {LOAD_BALANCE_LOSSES}, got {self.load_balance_loss!r}")
        check_float("z_loss_weight", 0.0)
        check_float("type_consistency_weight", 0.0)
        if self.capacity_factor is not None:
            check_float("capacity_factor", 0.0, lo_open=True)
        check_float("router_dropout", 0.0, 1.0, hi_open=True)
        check_float("dropout", 0.0, 1.0, hi_open=True)
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise PiMoEConfigError("activation", f"must be None (per-type) or one of {ACTIVATIONS}, "
                                                 f"got {self.activation!r}")
        check_float("layer_norm_eps", 0.0, lo_open=True)
        if self.expert_widths is not None:
            self._check_expert_widths()
        self._check_sizes(e, h)
        del i
        if not isinstance(self.metadata, Mapping):
            raise PiMoEConfigError("metadata", "must be a mapping of JSON-serialisable values")
        set_(self, "metadata", dict(self.metadata))

    # ------------------------------------------------------------------ structure
    def expert_type_of(self, expert_index: int) -> ExpertType:
        """Expert ``i`` has type ``expert_types[i % len(expert_types)]`` (seed rule)."""
        return self.expert_types[expert_index % len(self.expert_types)]

    def expert_spec(self, expert_type: ExpertType) -> ExpertSpec:
        assert self.intermediate_size is not None
        return ExpertSpec(
            widths=expert_widths(expert_type, self.hidden_size, self.intermediate_size),
            activation=self.activation or default_activation(expert_type),
            layer_norm=self.layer_norm,
        )

    def expert_specs(self) -> list[ExpertSpec]:
        """Spec of every expert in index order (``expert_widths`` applied)."""
        specs = [self.expert_spec(self.expert_type_of(i)) for i in range(self.num_experts)]
        if self.expert_widths is not None:
            specs = [dataclasses.replace(s, widths=w) for s, w in zip(specs, self.expert_widths, strict=True)]
        return specs

    def expert_groups(self) -> list[tuple[ExpertSpec, list[int]]]:
        """Experts grouped by identical structure, in order of first appearance.

        Each group becomes one `PiMoEExpertMLP` node; a uniform model is one group.
        """
        groups: dict[ExpertSpec, list[int]] = {}
        for index, spec in enumerate(self.expert_specs()):
            groups.setdefault(spec, []).append(index)
        return list(groups.items())

    def _check_sizes(self, experts: int, hidden: int) -> None:
        """The op contract's int32 limits and a bound on the total size, before anything is allocated."""
        specs = self.expert_specs()
        widest = max(max(spec.widths) for spec in specs)
        if experts * widest >= INT32_LIMIT or hidden * MAX_TOP_K >= INT32_LIMIT:
            raise PiMoEConfigError("intermediate_size", f"sizes overflow int32 indexing (widest layer {widest})")
        groups: dict[tuple, int] = {}
        for spec in specs:
            if len(spec.widths) - 1 > MAX_LAYERS:
                raise PiMoEConfigError("expert_widths", f"an expert has {len(spec.widths) - 1} layers; at most "
                                                        f"{MAX_LAYERS}")
            groups[tuple(spec.widths)] = groups.get(tuple(spec.widths), 0) + 1
        total = 0
        for widths, count in groups.items():
            for w_in, w_out in itertools.pairwise(widths):
                if count * w_in * w_out >= INT32_LIMIT:
                    raise PiMoEConfigError(
                        "intermediate_size", f"a {w_in}x{w_out} layer over {count} expert(s) holds >= 2^31 weights, "
                        "beyond the op contract's int32 indexing; use fewer or smaller experts")
                total += count * (w_in * w_out + w_out)
        if total > MAX_PARAMETERS:
            raise PiMoEConfigError("hidden_size", f"the experts would hold {total:,} parameters, more than the "
                                                  f"{MAX_PARAMETERS:,} this package builds; use a smaller model")

    def _check_expert_widths(self) -> None:
        widths = self.expert_widths
        if not isinstance(widths, (list, tuple)) or len(widths) != self.num_experts:
            raise PiMoEConfigError("expert_widths", f"must list the widths of all {self.num_experts} experts")
        resolved = []
        for index, w in enumerate(widths):
            base = self.expert_spec(self.expert_type_of(index)).widths
            w = tuple(w)
            ok = (
                len(w) == len(base)
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in w)
                and w[0] == base[0]
                and w[-1] == base[-1]
            )
            if not ok:
                raise PiMoEConfigError(
                    "expert_widths",
                    f"expert {index}: expected {len(base)} positive ints starting with {base[0]} and ending "
                    f"with {base[-1]} (its type's widths are {base}), got {w}",
                )
            resolved.append(w)
        object.__setattr__(self, "expert_widths", tuple(resolved))

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "expert_types":
                value = [t.value for t in value]
            elif f.name == "expert_widths" and value is not None:
                value = [list(w) for w in value]
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PiMoEConfig:
        if not isinstance(data, Mapping):
            raise PiMoEConfigError("<root>", f"expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PiMoEConfigError(unknown[0], f"unknown field(s) {unknown}; known fields: {sorted(known)}")
        if "hidden_size" not in data:
            raise PiMoEConfigError("hidden_size", "is required")
        return cls(**dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PiMoEConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PiMoEConfigError("<root>", f"config is not valid JSON ({exc})") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PiMoEConfig:
        return cls.from_json(Path(path).read_text())

    def replace(self, **changes: Any) -> PiMoEConfig:
        return dataclasses.replace(self, **changes)
