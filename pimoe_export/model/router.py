"""`TokenLevelRouter`: per-token expert selection with the seed's gated router network."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pimoe_export.model import functional
from pimoe_export.model.config import ExpertType, PiMoEConfig


@dataclass
class RouterDecision:
    """What the router decided for N (unmasked) tokens."""

    logits: torch.Tensor  # [N, E] fp32, temperature and gate applied
    probs: torch.Tensor  # [N, E] fp32 softmax(logits)
    weights: torch.Tensor  # [N, k] fp32 combine weights (0 for capacity-dropped assignments)
    ids: torch.Tensor  # [N, k] int32 selected experts
    type_logits: torch.Tensor  # [N, n_types] expert-type classifier output
    kept: torch.Tensor | None = None  # [N, k] bool, training with capacity_factor only


class TokenLevelRouter(nn.Module):
    """Token-level router (seed API).

    logits = router_network(x) / temperature, times sigmoid(gate_network(x)) when ``use_gating``;
    router_network = Linear(H, Hr) -> ReLU -> Dropout -> Linear(Hr, E);
    gate_network = Linear(H, Hr) -> Tanh -> Linear(Hr, 1).
    Selection is :func:`pimoe_export.model.functional.route` over fp32 logits with the ``selection_bias``
    buffer (zeros unless :class:`AdaptivePiMoE` moves it). ``temperature`` is a buffer so that adaptation
    and checkpoints carry it. ``expert_type_classifier`` (Linear(H, n_types)) feeds the type-consistency
    loss only; it never changes outputs.

    ``expert_capacity_factor`` is the seed's name for :attr:`PiMoEConfig.capacity_factor` (training-only
    token dropping, documented there); the seed stored 1.25 and never applied it, here ``None`` (dropless)
    is the default and a value is really applied in training.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        expert_types: Sequence[ExpertType | str],
        router_hidden_size: int | None = None,
        temperature: float = 1.0,
        load_balance_weight: float = 0.1,
        expert_capacity_factor: float | None = None,
        use_gating: bool = True,
        use_auxiliary_loss: bool = True,
        dropout: float = 0.1,
        *,
        top_k: int = 1,
        normalize: bool | None = None,
        z_loss_weight: float = 1e-3,
        type_consistency_weight: float = 0.01,
        load_balance_loss: str = "mse",
        config: PiMoEConfig | None = None,
    ) -> None:
        super().__init__()
        if config is None:
            config = PiMoEConfig(
                hidden_size=hidden_size,
                num_experts=num_experts,
                expert_types=tuple(expert_types),
                router_hidden_size=router_hidden_size,
                temperature=temperature,
                load_balance_weight=load_balance_weight,
                capacity_factor=expert_capacity_factor,
                use_gating=use_gating,
                use_auxiliary_loss=use_auxiliary_loss,
                router_dropout=dropout,
                top_k=top_k,
                normalize=normalize,
                z_loss_weight=z_loss_weight,
                type_consistency_weight=type_consistency_weight,
                load_balance_loss=load_balance_loss,
            )
        self.config = config
        h, hr, e = config.hidden_size, config.router_hidden_size, config.num_experts
        assert hr is not None
        self.router_network = nn.Sequential(
            nn.Linear(h, hr), nn.ReLU(), nn.Dropout(config.router_dropout), nn.Linear(hr, e)
        )
        self.gate_network = nn.Sequential(nn.Linear(h, hr), nn.Tanh(), nn.Linear(hr, 1)) if config.use_gating else None
        self.expert_type_classifier = nn.Linear(h, len(config.expert_types))
        self.register_buffer("temperature", torch.tensor(float(config.temperature)))
        # a buffer, not a config read, so that AdaptivePiMoE can nudge it and checkpoints carry it
        self.register_buffer("load_balance_weight", torch.tensor(float(config.load_balance_weight)))
        self.register_buffer("selection_bias", torch.zeros(e))
        # type index of every expert, for the type-consistency loss
        self.register_buffer(
            "expert_type_index", torch.arange(e) % len(config.expert_types), persistent=False
        )

    @classmethod
    def from_config(cls, config: PiMoEConfig) -> TokenLevelRouter:
        return cls(config.hidden_size, config.num_experts, config.expert_types, config=config)

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits [N, E] in fp32 (what the exported graph computes with standard ops)."""
        dtype = functional.compute_dtype(x.dtype)
        logits = self.router_network(x).to(dtype) / self.temperature
        if self.gate_network is not None:
            logits = logits * torch.sigmoid(self.gate_network(x).to(dtype))
        return logits

    def forward(self, x: torch.Tensor) -> RouterDecision:
        """Route N tokens x [N, H]."""
        cfg = self.config
        logits = self.compute_logits(x)
        weights, ids = functional.route(logits, self.selection_bias, cfg.top_k, bool(cfg.normalize))
        probs = torch.softmax(logits, dim=-1)
        kept = None
        if self.training and cfg.capacity_factor is not None and x.shape[0] > 0:
            kept = capacity_keep_mask(ids, cfg.num_experts, cfg.capacity_factor)
            weights = weights * kept
        return RouterDecision(logits, probs, weights, ids, self.expert_type_classifier(x).to(logits.dtype), kept)

    def losses(self, decision: RouterDecision) -> dict[str, torch.Tensor]:
        """Auxiliary losses over the routed (unmasked) tokens; all zero for an empty batch.

        - ``load_balance_loss`` (seed): load_balance_weight * mean_e (mean_t probs[t, e] - 1/E)^2
        - ``switch_loss`` (Switch Transformer): load_balance_weight * E * sum_e f_e * P_e, f_e = share of
          the N*k assignments that went to e, P_e = mean_t probs[t, e]
        - ``z_loss`` (ST-MoE): z_loss_weight * mean_t logsumexp(logits[t])^2
        - ``type_consistency_loss`` (seed): type_consistency_weight * mean_t (1 - p_type[t, type(top1)])
          * probs[t, top1], p_type = softmax(expert_type_classifier(x))
        - ``aux_loss``: the configured load-balance form + z + type consistency (0 if use_auxiliary_loss is off)
        """
        cfg = self.config
        probs, logits, ids = decision.probs, decision.logits, decision.ids
        n, e = probs.shape
        zero = probs.new_zeros(())
        if n == 0:
            return dict.fromkeys(
                ("load_balance_loss", "switch_loss", "z_loss", "type_consistency_loss", "aux_loss"), zero
            )
        mean_probs = probs.mean(dim=0)
        lb_mse = self.load_balance_weight * torch.mean((mean_probs - 1.0 / e) ** 2)
        counts = torch.bincount(ids.reshape(-1).long(), minlength=e).to(probs.dtype)
        fraction = counts / float(ids.numel())
        switch = self.load_balance_weight * e * torch.sum(fraction * mean_probs)
        z = cfg.z_loss_weight * torch.mean(torch.logsumexp(logits, dim=-1) ** 2)
        top1 = ids[:, 0].long()
        p_type = torch.softmax(decision.type_logits, dim=-1)
        p_selected_type = p_type.gather(1, self.expert_type_index[top1].unsqueeze(1)).squeeze(1)
        confidence = probs.gather(1, top1.unsqueeze(1)).squeeze(1)
        type_consistency = cfg.type_consistency_weight * torch.mean((1.0 - p_selected_type) * confidence)
        balance = lb_mse if cfg.load_balance_loss == "mse" else switch
        aux = balance + z + type_consistency if cfg.use_auxiliary_loss else zero
        return {
            "load_balance_loss": lb_mse,
            "switch_loss": switch,
            "z_loss": z,
            "type_consistency_loss": type_consistency,
            "aux_loss": aux,
        }


def capacity_keep_mask(ids: torch.Tensor, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """Which assignments survive the training-time capacity limit (PiMoEConfig.capacity_factor).

    Capacity C = ceil(capacity_factor * N * k / E) per expert. Priority: slot 0 of every token in token
    order, then slot 1, ...; an expert keeps its first C assignments in that order.
    """
    n, k = ids.shape
    capacity = math.ceil(capacity_factor * n * k / num_experts)
    # slot-major priority p = j * N + t; rank of each assignment within its expert by p
    expert = ids.t().reshape(-1).long()  # [k*N] in priority order
    one_hot = F.one_hot(expert, num_experts)
    rank = (torch.cumsum(one_hot, dim=0) - 1).gather(1, expert.unsqueeze(1)).squeeze(1)
    return (rank < capacity).reshape(k, n).t()
