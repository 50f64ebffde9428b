"""`AdaptivePiMoE`: a PiMoE layer that steers its own load balance from observed routing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pimoe_export.errors import PiMoEConfigError
from pimoe_export.model.config import ExpertType, PiMoEConfig
from pimoe_export.model.router import RouterDecision
from pimoe_export.model.system import PiMoESystem, load_balance_ratio


class AdaptivePiMoE(PiMoESystem):
    """PiMoE layer with deterministic, explicit adaptation of routing.

    Every forward (tracked tokens only) adds to an observation window: assignments per expert and the
    top-1 confidence. :meth:`adapt` turns the window into a score (seed formula)
    ``0.4 * utilisation + 0.4 * load_balance_ratio + 0.2 * mean top-1 confidence``; below
    ``performance_threshold`` it

    - moves the router's ``selection_bias``: ``bias_e += adaptation_rate * (1/E - load_e)`` (under-used
      experts up, over-used down; clamped to ±``max_bias``). The bias only steers selection, it never
      enters the combine weights;
    - nudges ``temperature`` by ``adaptation_rate``: up when the balance ratio is below the threshold
      (softer routing), down otherwise (sharper, for low confidence); clamped to
      [``min_temperature``, ``max_temperature``] (a narrow band: a hot router makes the bias dominate
      selection and the loads oscillate);
    - raises the router's ``load_balance_weight`` by ``adaptation_rate`` when the balance is poor.

    Each call appends a record to :attr:`history` and clears the window. Nothing changes unless
    :meth:`adapt` is called (or ``auto_adapt=True`` and the module is training), so eval-mode outputs are
    stable.
    """

    def __init__(
        self,
        hidden_size: int | None = None,
        num_experts: int = 8,
        adaptation_rate: float = 0.01,
        performance_threshold: float = 0.8,
        expert_types: Sequence[ExpertType | str] | None = None,
        router_config: Mapping[str, Any] | None = None,
        expert_config: Mapping[str, Any] | None = None,
        *,
        config: PiMoEConfig | None = None,
        auto_adapt: bool = False,
        max_bias: float = 1.0,
        min_temperature: float = 0.5,
        max_temperature: float = 2.0,
    ) -> None:
        super().__init__(hidden_size, num_experts, expert_types, router_config, expert_config, config=config)
        if not 0.0 < adaptation_rate <= 1.0:
            raise PiMoEConfigError("adaptation_rate", f"must be in (0, 1], got {adaptation_rate}")
        if not 0.0 <= performance_threshold <= 1.0:
            raise PiMoEConfigError("performance_threshold", f"must be in [0, 1], got {performance_threshold}")
        if not 0.0 < min_temperature <= max_temperature:
            raise PiMoEConfigError("min_temperature", "must satisfy 0 < min_temperature <= max_temperature")
        self.adaptation_rate = float(adaptation_rate)
        self.performance_threshold = float(performance_threshold)
        self.auto_adapt = bool(auto_adapt)
        self.max_bias = float(max_bias)
        self.min_temperature = float(min_temperature)
        self.max_temperature = float(max_temperature)
        self.register_buffer("window_counts", torch.zeros(self.num_experts, dtype=torch.int64))
        self.register_buffer("window_confidence", torch.zeros((), dtype=torch.float64))
        self.register_buffer("window_tokens", torch.zeros((), dtype=torch.int64))
        self.history: list[dict[str, Any]] = []

    def observe(self, counts: torch.Tensor, decision: RouterDecision) -> None:
        super().observe(counts, decision)
        self.window_counts += counts
        if decision.probs.shape[0]:
            top1 = decision.ids[:, 0].long().unsqueeze(1)
            self.window_confidence += decision.probs.detach().gather(1, top1).double().sum()
        self.window_tokens += decision.probs.shape[0]

    def forward(self, hidden_states, attention_mask=None, return_routing_info=False):  # type: ignore[override]
        out = super().forward(hidden_states, attention_mask, return_routing_info)
        if self.auto_adapt and self.training:
            self.adapt()
        return out

    def performance_score(self) -> dict[str, float]:
        """Score of the current observation window (0 when it is empty)."""
        counts = self.window_counts.detach().cpu()
        tokens = int(self.window_tokens)
        utilization = float((counts > 0).double().mean())
        ratio = load_balance_ratio(counts)
        confidence = float(self.window_confidence) / tokens if tokens else 0.0
        return {
            "utilization": utilization,
            "load_balance_ratio": ratio,
            "confidence": confidence,
            "score": 0.4 * utilization + 0.4 * ratio + 0.2 * confidence,
        }

    @torch.no_grad()
    def adapt(self) -> dict[str, Any] | None:
        """Adapt from the observation window; returns the history record, or None for an empty window."""
        tokens = int(self.window_tokens)
        if tokens == 0:
            return None
        counts = self.window_counts.detach().double().cpu()
        loads = counts / counts.sum()
        perf = self.performance_score()
        adapted = perf["score"] < self.performance_threshold
        router = self.router
        if adapted:
            e = self.num_experts
            delta = self.adaptation_rate * (1.0 / e - loads)
            bias = (router.selection_bias.double().cpu() + delta).clamp(-self.max_bias, self.max_bias)
            router.selection_bias.copy_(bias.to(router.selection_bias))
            poor_balance = perf["load_balance_ratio"] < self.performance_threshold
            temperature = float(router.temperature) + (self.adaptation_rate if poor_balance else -self.adaptation_rate)
            router.temperature.fill_(min(max(temperature, self.min_temperature), self.max_temperature))
            if poor_balance:
                router.load_balance_weight += self.adaptation_rate
        record = {
            "step": len(self.history),
            "tokens": tokens,
            "loads": loads.tolist(),
            **perf,
            "adapted": adapted,
            "temperature": float(router.temperature),
            "load_balance_weight": float(router.load_balance_weight),
            "selection_bias": router.selection_bias.detach().cpu().tolist(),
        }
        self.history.append(record)
        self.window_counts.zero_()
        self.window_confidence.zero_()
        self.window_tokens.zero_()
        return record

    # checkpoint hooks (pimoe_export.model.io)
    def extra_state_json(self) -> dict[str, Any]:
        return {
            "init_kwargs": {
                "adaptation_rate": self.adaptation_rate,
                "performance_threshold": self.performance_threshold,
                "auto_adapt": self.auto_adapt,
                "max_bias": self.max_bias,
                "min_temperature": self.min_temperature,
                "max_temperature": self.max_temperature,
            },
            "history": self.history,
        }

    def load_extra_state_json(self, extra: Mapping[str, Any]) -> None:
        self.history = list(extra.get("history", []))
