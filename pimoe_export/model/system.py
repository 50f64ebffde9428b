"""`PiMoESystem`: the PiMoE feed-forward layer (router + experts), vectorised and deterministic."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pimoe_export.errors import PiMoEConfigError, PiMoEInputError
from pimoe_export.model import functional
from pimoe_export.model.config import ExpertType, PiMoEConfig
from pimoe_export.model.experts import PiMoEExpert
from pimoe_export.model.router import RouterDecision, TokenLevelRouter

# seed names accepted in router_config / expert_config, mapped to PiMoEConfig fields
_ROUTER_KEYS = {
    "router_hidden_size": "router_hidden_size",
    "temperature": "temperature",
    "load_balance_weight": "load_balance_weight",
    "expert_capacity_factor": "capacity_factor",
    "capacity_factor": "capacity_factor",
    "use_gating": "use_gating",
    "use_auxiliary_loss": "use_auxiliary_loss",
    "dropout": "router_dropout",
    "top_k": "top_k",
    "normalize": "normalize",
    "z_loss_weight": "z_loss_weight",
    "type_consistency_weight": "type_consistency_weight",
    "load_balance_loss": "load_balance_loss",
}
_EXPERT_KEYS = {
    "intermediate_size": "intermediate_size",
    "activation": "activation",
    "dropout": "dropout",
    "layer_norm": "layer_norm",
    "layer_norm_eps": "layer_norm_eps",
}


def config_from_seed_args(
    hidden_size: int,
    num_experts: int,
    expert_types: Sequence[ExpertType | str] | None,
    router_config: Mapping[str, Any] | None,
    expert_config: Mapping[str, Any] | None,
    **overrides: Any,
) -> PiMoEConfig:
    """Build a PiMoEConfig from the seed-style (router_config, expert_config) dictionaries."""
    fields: dict[str, Any] = {"hidden_size": hidden_size, "num_experts": num_experts}
    if expert_types is not None:
        fields["expert_types"] = tuple(expert_types)
    for section, table in (("router_config", _ROUTER_KEYS), ("expert_config", _EXPERT_KEYS)):
        given = {"router_config": router_config, "expert_config": expert_config}[section] or {}
        for key, value in given.items():
            if key not in table:
                raise PiMoEConfigError(f"{section}[{key!r}]", f"unknown key; accepted keys: {sorted(table)}")
            fields[table[key]] = value
    fields.update(overrides)
    return PiMoEConfig(**fields)


@dataclass
class RoutingInfo:
    """Routing details returned with ``return_routing_info=True`` (tensors shaped like the input).

    Masked tokens were not routed: their ids are -1, weights 0 and probs 0.
    """

    ids: torch.Tensor  # [B, S, k] int32
    weights: torch.Tensor  # [B, S, k] fp32
    probs: torch.Tensor  # [B, S, E] fp32
    logits: torch.Tensor  # [B, S, E] fp32
    losses: dict[str, torch.Tensor]
    expert_counts: torch.Tensor  # [E] int64 assignments per expert in this call (kept ones)
    dropped_fraction: float = 0.0  # training with capacity_factor only
    extras: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:  # dict-style access, as the seed's routing info was a dict
        if key in self.losses:
            return self.losses[key]
        return getattr(self, key)


def load_balance_ratio(counts: torch.Tensor) -> float:
    """1 / (1 + coefficient of variation) of per-expert counts; 1.0 = perfectly even, 0.0 if no data."""
    counts = counts.double()
    mean = counts.mean()
    if counts.numel() == 0 or float(mean) == 0.0:
        return 0.0
    cv = counts.std(unbiased=False) / mean
    return float(1.0 / (1.0 + cv))


class PiMoESystem(nn.Module):
    """PiMoE layer: token-level router + typed experts, dropless sort-based dispatch in inference.

    ``forward(hidden_states [B, S, H], attention_mask [B, S] or None, return_routing_info=False)``.
    Masked tokens (mask == 0) are not routed, give 0 and count in no statistic or loss.
    Computation per call: route (fp32) -> stable sort of (token, slot) pairs by expert -> every expert runs
    once on its contiguous segment -> gather-combine in slot order. Eval mode is deterministic.

    After a training-mode forward, ``self.aux_loss`` holds the auxiliary loss to add to the task loss.
    """

    def __init__(
        self,
        hidden_size: int | None = None,
        num_experts: int = 8,
        expert_types: Sequence[ExpertType | str] | None = None,
        router_config: Mapping[str, Any] | None = None,
        expert_config: Mapping[str, Any] | None = None,
        *,
        config: PiMoEConfig | None = None,
    ) -> None:
        super().__init__()
        if config is None:
            if hidden_size is None:
                raise PiMoEConfigError("hidden_size", "is required (or pass config=PiMoEConfig(...))")
            config = config_from_seed_args(hidden_size, num_experts, expert_types, router_config, expert_config)
        self.config = config
        self.router = TokenLevelRouter.from_config(config)
        self.experts = nn.ModuleList(
            PiMoEExpert.from_spec(spec, config.expert_type_of(i), config.dropout, config.layer_norm_eps)
            for i, spec in enumerate(config.expert_specs())
        )
        e = config.num_experts
        self.register_buffer("expert_usage_count", torch.zeros(e, dtype=torch.int64))
        self.register_buffer("routed_prob_mass", torch.zeros(e, dtype=torch.float64))
        self.register_buffer("total_tokens", torch.zeros((), dtype=torch.int64))
        self.track_stats = True
        self.aux_loss: torch.Tensor | None = None

    # ------------------------------------------------------------------ properties
    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def expert_types(self) -> tuple[ExpertType, ...]:
        return self.config.expert_types

    # ------------------------------------------------------------------ checks
    def check_inputs(self, hidden_states: Any, attention_mask: Any = None) -> None:
        """Raise PiMoEInputError for a wrong rank, hidden size, dtype, device or mask shape."""
        if not isinstance(hidden_states, torch.Tensor):
            raise PiMoEInputError(f"hidden_states must be a torch.Tensor [batch, seq, {self.hidden_size}], "
                                  f"got {type(hidden_states).__name__}")
        if hidden_states.dim() != 3:
            raise PiMoEInputError(
                f"hidden_states must have rank 3 [batch, seq, hidden], got shape {tuple(hidden_states.shape)}; "
                f"for a flat [tokens, hidden] tensor use x.unsqueeze(0)"
            )
        if hidden_states.shape[-1] != self.hidden_size:
            raise PiMoEInputError(
                f"hidden_states last dimension must be hidden_size={self.hidden_size}, got "
                f"{hidden_states.shape[-1]} (shape {tuple(hidden_states.shape)})"
            )
        param = next(self.parameters())
        if hidden_states.dtype != param.dtype:
            raise PiMoEInputError(
                f"hidden_states dtype {hidden_states.dtype} does not match the model's {param.dtype}; cast the "
                f"input (x.to({param.dtype})) or the model (model.to({hidden_states.dtype}))"
            )
        if hidden_states.device != param.device:
            raise PiMoEInputError(f"hidden_states is on {hidden_states.device}, the model on {param.device}")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor):
                raise PiMoEInputError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
            if tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
                raise PiMoEInputError(
                    f"attention_mask must have shape [batch, seq] = {tuple(hidden_states.shape[:2])}, got "
                    f"{tuple(attention_mask.shape)}"
                )

    # ------------------------------------------------------------------ forward
    def route_and_compute(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterDecision]:
        """The MoE computation on N unmasked tokens x [N, H] -> y [N, H]."""
        decision = self.router(x)
        x_sorted, offsets, flat_to_sorted = functional.dispatch(x, decision.ids, self.num_experts)
        bounds = offsets.tolist()
        y_sorted = torch.cat(
            [expert(x_sorted[bounds[e] : bounds[e + 1]]) for e, expert in enumerate(self.experts)], dim=0
        )
        return functional.combine(y_sorted, flat_to_sorted, decision.weights), decision

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_routing_info: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, RoutingInfo]:
        self.check_inputs(hidden_states, attention_mask)
        b, s, h = hidden_states.shape
        x = hidden_states.reshape(b * s, h)
        token_index = None
        if attention_mask is not None:
            token_index = torch.nonzero(attention_mask.reshape(-1) != 0).squeeze(1)
            x = x.index_select(0, token_index)
        y, decision = self.route_and_compute(x)
        if token_index is not None:
            y = hidden_states.new_zeros((b * s, h)).index_copy(0, token_index, y)
        output = y.reshape(b, s, h)

        kept_ids = decision.ids if decision.kept is None else decision.ids[decision.kept]
        counts = torch.bincount(kept_ids.reshape(-1).long(), minlength=self.num_experts)
        if self.track_stats:
            with torch.no_grad():
                self.observe(counts, decision)
        losses = None
        if self.training or return_routing_info:
            losses = self.router.losses(decision)
            self.aux_loss = losses["aux_loss"]
        if not return_routing_info:
            return output
        assert losses is not None
        info = RoutingInfo(
            ids=self._scatter_tokens(decision.ids, b, s, token_index, fill=-1),
            weights=self._scatter_tokens(decision.weights, b, s, token_index, fill=0.0),
            probs=self._scatter_tokens(decision.probs, b, s, token_index, fill=0.0),
            logits=self._scatter_tokens(decision.logits, b, s, token_index, fill=0.0),
            losses=losses,
            expert_counts=counts,
            dropped_fraction=0.0 if decision.kept is None or decision.kept.numel() == 0
            else float(1.0 - decision.kept.float().mean()),
        )
        return output, info

    @staticmethod
    def _scatter_tokens(
        values: torch.Tensor, b: int, s: int, token_index: torch.Tensor | None, fill: float
    ) -> torch.Tensor:
        width = values.shape[-1]
        if token_index is None:
            return values.reshape(b, s, width)
        out = values.new_full((b * s, width), fill)
        return out.index_copy(0, token_index, values).reshape(b, s, width)

    # ------------------------------------------------------------------ statistics
    def observe(self, counts: torch.Tensor, decision: RouterDecision) -> None:
        """Fold one call's routing into the statistics buffers (called under no_grad)."""
        self.expert_usage_count += counts
        self.routed_prob_mass += decision.probs.detach().sum(dim=0).double()
        self.total_tokens += decision.probs.shape[0]

    def reset_stats(self) -> None:
        self.expert_usage_count.zero_()
        self.routed_prob_mass.zero_()
        self.total_tokens.zero_()

    def get_system_stats(self) -> dict[str, Any]:
        """Lifetime routing statistics (since construction or :meth:`reset_stats`).

        - ``expert_usage_counts``: assignments per expert; ``total_usage``: their sum (tokens * k)
        - ``expert_loads``: share of assignments per expert (sums to 1; zeros before any token)
        - ``usage_distribution``: share of assignments per expert type
        - ``load_balance_ratio``: 1 / (1 + CV of the counts)
        - ``system_efficiency``: 0.7 * load_balance_ratio + 0.3 * min(1, total_usage / (E * 100)) (seed)
        """
        counts = self.expert_usage_count.detach().cpu()
        total_usage = int(counts.sum())
        loads = (counts.double() / total_usage) if total_usage else torch.zeros(self.num_experts, dtype=torch.float64)
        by_type: dict[str, float] = {t.value: 0.0 for t in self.expert_types}
        for e in range(self.num_experts):
            by_type[self.config.expert_type_of(e).value] += float(loads[e])
        tokens = int(self.total_tokens)
        ratio = load_balance_ratio(counts)
        return {
            "num_experts": self.num_experts,
            "total_tokens": tokens,
            "total_usage": total_usage,
            "expert_usage_counts": counts.tolist(),
            "expert_loads": loads.tolist(),
            "usage_distribution": by_type,
            "mean_router_probs": (self.routed_prob_mass.cpu() / tokens).tolist() if tokens else
            [0.0] * self.num_experts,
            "load_balance_ratio": ratio,
            "system_efficiency": 0.7 * ratio + 0.3 * min(1.0, total_usage / (self.num_experts * 100)),
        }

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        from pimoe_export.model.io import save_pretrained

        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> PiMoESystem:
        from pimoe_export.model.io import load_pretrained

        model = load_pretrained(directory, map_location=map_location)
        if not isinstance(model, cls):
            found = type(model).__name__
            raise PiMoEConfigError("architecture", f"{directory} holds a checkpoint of {found}, not of {cls.__name__}; "
                                                   f"load it with {found}.from_pretrained")
        return model
