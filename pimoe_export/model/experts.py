"""`PiMoEExpert`: one expert, the seed's per-type layer stack."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pimoe_export.model import functional
from pimoe_export.model.config import ExpertSpec, ExpertType, default_activation, expert_widths


class PiMoEExpert(nn.Module):
    """One expert: hidden layers Linear -> LayerNorm -> activation -> Dropout, then Linear back to H.

    Widths per type (I = intermediate_size, default 4 * hidden_size): REASONING H-I-I/2-H (GELU),
    COMPUTATION H-2I-I-H (ReLU), MATHEMATICAL H-I-H (SiLU), LOGICAL H-I-H (Tanh), LANGUAGE / CREATIVE /
    ANALYTICAL H-I-H (GELU). ``activation=None`` takes the type's activation; ``widths`` overrides the
    widths (structured pruning). The math is :func:`functional.mlp_rows`, the same function the
    `PiMoEExpertMLP` op reference runs, so the model and the op agree bit for bit in fp32.
    """

    def __init__(
        self,
        hidden_size: int,
        expert_type: ExpertType | str,
        intermediate_size: int | None = None,
        activation: str | None = None,
        dropout: float = 0.1,
        *,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        widths: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.expert_type = ExpertType(expert_type)
        intermediate = intermediate_size if intermediate_size is not None else 4 * hidden_size
        self.widths = tuple(widths) if widths is not None else expert_widths(
            self.expert_type, hidden_size, intermediate
        )
        self.activation = activation or default_activation(self.expert_type)
        self.dropout = float(dropout)
        self.layer_norm_eps = float(layer_norm_eps)
        self.layers = nn.ModuleList(
            nn.Linear(self.widths[i], self.widths[i + 1]) for i in range(len(self.widths) - 1)
        )
        self.norms = (
            nn.ModuleList(nn.LayerNorm(w, eps=layer_norm_eps) for w in self.widths[1:-1]) if layer_norm else None
        )

    @classmethod
    def from_spec(cls, spec: ExpertSpec, expert_type: ExpertType, dropout: float, eps: float) -> PiMoEExpert:
        return cls(
            spec.widths[0], expert_type, activation=spec.activation, dropout=dropout,
            layer_norm=spec.layer_norm, layer_norm_eps=eps, widths=spec.widths,
        )

    @property
    def spec(self) -> ExpertSpec:
        return ExpertSpec(self.widths, self.activation, self.norms is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, H] -> [R, H] (fp32 math, result in x's dtype)."""
        y = functional.mlp_rows(
            x,
            [layer.weight for layer in self.layers],
            [layer.bias for layer in self.layers],
            None if self.norms is None else [n.weight for n in self.norms],
            None if self.norms is None else [n.bias for n in self.norms],
            self.activation,
            self.layer_norm_eps,
            dropout=self.dropout,
            training=self.training,
        )
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"type={self.expert_type.value}, widths={self.widths}, activation={self.activation}"
