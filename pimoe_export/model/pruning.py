"""Expert pruning: unstructured magnitude pruning and structured removal of hidden units.

Both act in place on a :class:`PiMoESystem`, one-shot (re-run after fine-tuning, which regrows zeros),
and return a before/after report. Structured pruning really shrinks the experts' Linear and LayerNorm
modules and records the new widths in ``model.config.expert_widths``, so export and checkpoints follow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from pimoe_export.errors import PiMoEConfigError
from pimoe_export.model.experts import PiMoEExpert
from pimoe_export.model.system import PiMoESystem


@dataclass
class PruningReport:
    method: str
    amount: float
    params_before: int
    params_after: int
    nonzero_before: int
    nonzero_after: int
    per_expert: list[dict[str, Any]] = field(default_factory=list)
    output_rel_l2_change: float | None = None  # on the probe input, when one was given

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero_after / max(1, self.params_after)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["sparsity"] = self.sparsity
        return data


def merge_reports(reports: dict[str, PruningReport]) -> PruningReport:
    """One report over several PiMoE layers (by module path): counts summed, the largest output change, each
    per-expert row tagged with its layer's path (a bare layer's, path "", untagged)."""
    first, every = next(iter(reports.values())), list(reports.values())
    changes = [r.output_rel_l2_change for r in every if r.output_rel_l2_change is not None]
    rows = [{**row, "layer": path} if path else row for path, r in reports.items() for row in r.per_expert]
    return PruningReport(first.method, first.amount, sum(r.params_before for r in every),
                         sum(r.params_after for r in every), sum(r.nonzero_before for r in every),
                         sum(r.nonzero_after for r in every), rows, max(changes) if changes else None)


def _expert_counts(experts: nn.ModuleList) -> tuple[int, int]:
    params = [p for ex in experts for p in ex.parameters()]
    return sum(p.numel() for p in params), sum(int((p != 0).sum()) for p in params)


def _check_amount(amount: float) -> float:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount < 1.0:
        raise PiMoEConfigError("pruning_amount", f"must be a number in [0, 1), got {amount!r}")
    return float(amount)


def _probe_output(model: PiMoESystem, probe: torch.Tensor | None) -> torch.Tensor | None:
    if probe is None:
        return None
    was_training, tracking = model.training, model.track_stats
    model.eval()
    model.track_stats = False
    try:
        with torch.no_grad():
            out = model(probe)
    finally:
        model.train(was_training)
        model.track_stats = tracking
    assert isinstance(out, torch.Tensor)
    return out


def _rel_change(before: torch.Tensor | None, after: torch.Tensor | None) -> float | None:
    if before is None or after is None:
        return None
    return float((after - before).float().norm() / before.float().norm().clamp_min(1e-30))


@torch.no_grad()
def magnitude_prune(model: PiMoESystem, amount: float, probe: torch.Tensor | None = None) -> PruningReport:
    """Zero the ``amount`` share of smallest-magnitude weights in every expert Linear (per layer)."""
    amount = _check_amount(amount)
    before_out = _probe_output(model, probe)
    params_before, nonzero_before = _expert_counts(model.experts)
    per_expert = []
    for index, expert in enumerate(model.experts):
        zeroed = 0
        for layer in expert.layers:
            w = layer.weight
            n_prune = round(amount * w.numel())
            if n_prune == 0:
                continue
            threshold_idx = torch.argsort(w.abs().reshape(-1), stable=True)[:n_prune]
            w.view(-1)[threshold_idx] = 0.0
            zeroed += n_prune
        per_expert.append({"expert": index, "weights_zeroed": zeroed})
    params_after, nonzero_after = _expert_counts(model.experts)
    return PruningReport("magnitude", amount, params_before, params_after, nonzero_before, nonzero_after,
                         per_expert, _rel_change(before_out, _probe_output(model, probe)))


def _unit_importance(expert: PiMoEExpert, layer: int) -> torch.Tensor:
    """Importance of hidden unit u after layer ``layer``: scale entering the next layer x its outgoing norm.

    With LayerNorm the unit's scale is |gamma_u| (LN re-normalises the incoming row); without it, the
    incoming row norm.
    """
    nxt = expert.layers[layer + 1].weight  # [out, units]
    outgoing = nxt.float().norm(dim=0)
    if expert.norms is not None:
        incoming = expert.norms[layer].weight.float().abs()
    else:
        incoming = expert.layers[layer].weight.float().norm(dim=1)
    return incoming * outgoing


@torch.no_grad()
def structured_prune(model: PiMoESystem, amount: float, probe: torch.Tensor | None = None) -> PruningReport:
    """Remove the ``amount`` share of least important hidden units of every hidden layer of every expert.

    Shrinks Linear l (rows, bias), LayerNorm l (gamma, beta) and Linear l+1 (columns); at least one unit
    per layer stays. With LayerNorm the remaining units are re-normalised over fewer units, so outputs
    change even where removed units contributed little; the report's ``output_rel_l2_change`` (with a
    probe) measures the effect.
    """
    amount = _check_amount(amount)
    before_out = _probe_output(model, probe)
    params_before, nonzero_before = _expert_counts(model.experts)
    per_expert = []
    new_widths = []
    for index, expert in enumerate(model.experts):
        keep_sets = []
        widths = list(expert.widths)
        for layer in range(len(expert.layers) - 1):
            units = widths[layer + 1]
            n_keep = max(1, units - round(amount * units))
            importance = _unit_importance(expert, layer)
            # keep the most important units, in their original order (ties: lower index)
            order = torch.sort(importance, descending=True, stable=True).indices[:n_keep]
            keep_sets.append(torch.sort(order).values)
            widths[layer + 1] = n_keep
        new_expert = PiMoEExpert(
            expert.widths[0], expert.expert_type, activation=expert.activation, dropout=expert.dropout,
            layer_norm=expert.norms is not None, layer_norm_eps=expert.layer_norm_eps, widths=widths,
        ).to(device=expert.layers[0].weight.device, dtype=expert.layers[0].weight.dtype)
        for layer, (old, new) in enumerate(zip(expert.layers, new_expert.layers, strict=True)):
            w, b = old.weight, old.bias
            if layer < len(keep_sets):
                w, b = w[keep_sets[layer]], b[keep_sets[layer]]
            if layer > 0:
                w = w[:, keep_sets[layer - 1]]
            new.weight.copy_(w)
            new.bias.copy_(b)
        if expert.norms is not None and new_expert.norms is not None:
            for layer, (old_n, new_n) in enumerate(zip(expert.norms, new_expert.norms, strict=True)):
                new_n.weight.copy_(old_n.weight[keep_sets[layer]])
                new_n.bias.copy_(old_n.bias[keep_sets[layer]])
        new_expert.train(expert.training)
        per_expert.append({
            "expert": index,
            "widths_before": list(expert.widths),
            "widths_after": widths,
            "params_before": sum(p.numel() for p in expert.parameters()),
            "params_after": sum(p.numel() for p in new_expert.parameters()),
        })
        model.experts[index] = new_expert
        new_widths.append(tuple(widths))
    model.config = model.config.replace(expert_widths=tuple(new_widths))
    model.router.config = model.config
    params_after, nonzero_after = _expert_counts(model.experts)
    return PruningReport("structured", amount, params_before, params_after, nonzero_before, nonzero_after,
                         per_expert, _rel_change(before_out, _probe_output(model, probe)))
